"""The training loop: data → jitted step → metrics → evaluation → checkpoint → report."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from iclm_jax import checkpoint, config_check, evaluate, report, sharding
from iclm_jax.data import pipeline, sources
from iclm_jax.data.reference import fit_reference, score_reference
from iclm_jax.train import build
from iclm_jax.train.step import make_steps


class Run:
    """A built run: mesh, data, jitted steps and the current (sharded) state."""

    def __init__(self, config, workdir: str, data: sources.RunData):
        self.config, self.workdir, self.data = config, workdir, data
        self.mesh = sharding.make_mesh(dict(config.mesh))
        ts = build.train_state(config, data.tokenizer.vocab_size)
        self.num_modules = ts.model.cfg.num_modules
        self.loss_cfg = build.loss_config(config)
        graphdef, state = _split(ts)
        self.state_sharding = sharding.state_shardings(state, self.mesh)
        self.graphdef, _, self.train_step, self.eval_step = make_steps(
            ts, self.loss_cfg, num_domains=config.data.num_domains, num_slots=data.num_slots,
            mine_decay=config.mi.ema_decay, mine_clip=config.mi.clip,
            state_sharding=self.state_sharding, batch_sharding=sharding.batch_sharding(self.mesh))
        self.state = jax.device_put(state, self.state_sharding)

    def evaluate(self, examples) -> dict:
        res = evaluate.run_eval_set(self.eval_step, self.state, examples, tok=self.data.tokenizer,
                                    mesh=self.mesh, max_len=self.data.max_len,
                                    num_slots=self.data.num_slots, batch_size=self.config.eval.batch_size)
        return evaluate.summarise(res, self.num_modules)


def _split(ts):
    from flax import nnx
    return nnx.split(ts)


def train(config, workdir: str, *, quiet: bool = False) -> dict:
    """Train per ``config`` in ``workdir``; returns the final summary (also written to summary.json)."""
    config_check.validate(config)
    os.makedirs(workdir, exist_ok=True)
    _check_writable(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    t0 = time.time()
    data = sources.build(config.data, config.seed)
    if is_main:
        data.tokenizer.save(os.path.join(workdir, "tokenizer"))
        with open(os.path.join(workdir, "data.json"), "w") as f:
            json.dump({"max_len": data.max_len, "num_slots": data.num_slots,
                       "train_examples": len(data.train_examples)}, f)
    run = Run(config, workdir, data)
    t = config.train
    ds = pipeline.make_dataset(
        data.train_examples, data.tokenizer, max_len=data.max_len,
        batch_size=t.batch_size // jax.process_count(), num_slots=data.num_slots, seed=config.seed,
        shuffle=True, repeat=True, process_index=jax.process_index(), process_count=jax.process_count(),
        worker_count=config.data.workers)
    it = iter(ds)
    writer = report.MetricsWriter(workdir)
    mngr = checkpoint.manager(workdir, config.checkpoint.keep)
    setup_s = time.time() - t0

    bar = tqdm(total=t.steps, desc="train", disable=quiet or not is_main, dynamic_ncols=True)
    tokens, tok_t0, last = 0, time.time(), {}
    train_t0 = time.time()
    step = 0
    for step in range(1, t.steps + 1):
        batch = next(it)
        tokens += int(np.sum(batch["segments"] > 0)) * jax.process_count()
        run.state, metrics = run.train_step(run.state, sharding.put_batch(batch, run.mesh))
        if step % t.log_every == 0 or step == t.steps:
            last = jax.device_get(metrics)
            now = time.time()
            last["tokens_per_s"] = tokens / max(now - tok_t0, 1e-9)
            tokens, tok_t0 = 0, now
            writer.write(step, last)
            bar.set_postfix(loss=f"{last['loss']:.3f}", mi=f"{last['mi']:.3f}",
                            tok_s=f"{last['tokens_per_s']:.0f}")
        bar.update(1)
        if config.checkpoint.every and step % config.checkpoint.every == 0:
            checkpoint.save(mngr, step, run.state, _meta(config, data, step))
        if config.eval.every and step % config.eval.every == 0 and step < t.steps:
            for es in data.eval_sets:
                writer.write(step, _eval_scalars(run.evaluate(es.examples)), prefix=f"eval/{es.name}")
        if t.time_limit_s and time.time() - train_t0 > t.time_limit_s:
            break
    bar.close()
    train_s = time.time() - train_t0
    checkpoint.save(mngr, step, run.state, _meta(config, data, step))

    results, refs = {}, {}
    ref_predictors = fit_reference(data.train_problems) if data.train_problems else {}
    for es in data.eval_sets:
        results[es.name] = run.evaluate(es.examples)
        writer.write(step, _eval_scalars(results[es.name]), prefix=f"eval/{es.name}")
        if es.problems is not None and ref_predictors:
            refs[es.name] = {k: score_reference(p, es.problems) for k, p in ref_predictors.items()}
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    plots = report.plot_training(workdir)
    summary = {"steps": step, "setup_s": setup_s, "train_s": train_s, "final_train": _floats(last),
               "eval": results, "reference": refs, "plots": plots}
    if is_main:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=float)
        if not quiet:
            print()
            print(evaluate.results_table(results, refs))
            print()
            print(evaluate.modules_table(results, run.num_modules))
            print(f"\ntrained {step} steps in {train_s:.0f}s (setup {setup_s:.0f}s); workdir {workdir}")
    return summary


def _eval_scalars(r: dict) -> dict:
    return {k: v for k, v in r.items() if isinstance(v, float) and not np.isnan(v)}


def _floats(d: dict) -> dict:
    return {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in d.items()}


def _meta(config, data, step: int) -> dict:
    import importlib.metadata as md
    versions = {p: md.version(p) for p in ("jax", "flax", "optax", "orbax-checkpoint", "grain")}
    return {"step": step, "max_len": data.max_len, "num_slots": data.num_slots,
            "vocab_size": data.tokenizer.vocab_size, "versions": versions,
            "mesh": dict(config.mesh), "num_devices": jax.device_count()}


def _check_writable(workdir: str) -> None:
    probe = os.path.join(workdir, ".write_probe")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OSError(f"workdir {workdir!r} is not writable: {e}") from e
