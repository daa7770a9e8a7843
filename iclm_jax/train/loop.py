"""The training loop: data → jitted step → metrics → evaluation → checkpoint → report.

A run resumes automatically from the latest finalized checkpoint in its workdir (state, data position,
RNG: the continuation is bit-identical to an uninterrupted run on one device). SIGTERM saves and exits
with ``preemption.EXIT_PREEMPTED``; a non-finite loss term stops the run naming step and term, keeping
the last good checkpoint (or skips the step with ``train.nonfinite='skip'``).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from iclm_jax import checkpoint, config_check, evaluate, hf, report, sharding, sharding_report
from iclm_jax.data import pipeline, sources
from iclm_jax.data.reference import fit_reference, score_reference
from iclm_jax.fields import csv
from iclm_jax.train import build
from iclm_jax.train.optim import effective_warmup
from iclm_jax.train.preemption import EXIT_PREEMPTED, PreemptionWatcher
from iclm_jax.train.step import FINITE_TERMS, make_steps


class NonFiniteError(FloatingPointError):
    """A loss term or the gradient norm was NaN/Inf (the message names the step and the terms)."""


class Preempted(SystemExit):
    def __init__(self, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.step = step


class Run:
    """A built run: mesh, data, jitted steps and the current (sharded) state."""

    def __init__(self, config, workdir: str, data: sources.RunData):
        self.config, self.workdir, self.data = config, workdir, data
        self.mesh = sharding.make_mesh(dict(config.mesh))
        self.rules = sharding.rules_from_config(config.get("rules"))
        vocab = data.tokenizer.vocab_size

        def init():
            return nnx.state(build.train_state(config, vocab))

        # Built abstractly, then created directly in its shardings by a jitted init: no full copy on
        # one device, and it works when the mesh spans several processes.
        ts = nnx.eval_shape(lambda: build.train_state(config, vocab))
        self.num_modules = ts.model.cfg.num_modules
        self.loss_cfg = build.loss_config(config)
        self.state_sharding = sharding.state_shardings(nnx.state(ts), self.mesh, self.rules)
        self.graphdef, _, self.train_step, self.eval_step = make_steps(
            ts, self.loss_cfg, num_domains=config.data.num_domains, num_slots=data.num_slots,
            skip_nonfinite=config.train.nonfinite == "skip",
            state_sharding=self.state_sharding, batch_sharding=sharding.batch_sharding(self.mesh, self.rules),
            rules=self.rules)
        self.state = jax.jit(init, out_shardings=self.state_sharding)()

    def evaluate(self, examples) -> dict:
        res = evaluate.run_eval_set(self.eval_step, self.state, examples, tok=self.data.tokenizer,
                                    mesh=self.mesh, rules=self.rules, max_len=self.data.max_len,
                                    num_slots=self.data.num_slots, batch_size=self.config.eval.batch_size)
        return evaluate.summarise(res, self.num_modules)

    def derive_heads(self) -> None:
        """``ICLM.derive_heads`` on the placed state, in its shardings: after the base was replaced, the
        heads derived from it (the concat head) become what the new base gives at construction."""
        def derive(state):
            ts = nnx.merge(self.graphdef, state)
            ts.model.derive_heads()
            return nnx.state(ts)
        self.state = jax.jit(derive, out_shardings=self.state_sharding, donate_argnums=0)(self.state)

    def state_bytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(checkpoint.to_storable(self.state)))


def train(config, workdir: str, *, quiet: bool = False) -> dict:
    """Train per ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the summary."""
    config_check.validate(config)
    is_main = jax.process_index() == 0
    stored_config = _prepare_workdir(config, workdir)
    # Resume and preemption notices go to stderr even with quiet (which hides the bar and tables).
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if is_main else (lambda *a: None)
    warmup = effective_warmup(config.train.warmup_steps, config.train.steps)
    if warmup != config.train.warmup_steps:
        say(f"train.warmup_steps={config.train.warmup_steps} exceeds train.steps={config.train.steps}: "
            f"warming up over {warmup} steps (a tenth of the run)")

    t0 = time.time()
    data = sources.build(config.data, config.seed)
    config_check.validate_loaded(config, data)
    if is_main:
        data.tokenizer.save(os.path.join(workdir, "tokenizer"))
        with open(os.path.join(workdir, "data.json"), "w") as f:
            json.dump({"max_len": data.max_len, "num_slots": data.num_slots,
                       "train_examples": len(data.train_examples)}, f)
    run = Run(config, workdir, data)
    _check_disk(workdir, run.state_bytes(), config.checkpoint.keep)
    if not quiet:
        say(sharding_report.summary_line(run.state, run.mesh, run.rules))
    t = config.train
    stream = bool(config.data.get("stream", False))   # an endless source is read in order, once
    ds = pipeline.make_dataset(
        data.train_examples, data.tokenizer, max_len=data.max_len,
        batch_size=t.batch_size, num_slots=data.num_slots, seed=config.seed, shuffle=not stream,
        repeat=not stream, stream=stream, rows=sharding.process_rows(run.mesh, t.batch_size, run.rules),
        worker_count=config.data.workers)
    it = iter(ds)
    mngr = checkpoint.manager(workdir, config.checkpoint.keep)
    best = (checkpoint.manager(workdir, 1, "best", config.checkpoint.best_metric)
            if config.checkpoint.best_metric else None)

    start = 0
    latest = mngr.latest_step()
    if latest is not None:
        diffs = checkpoint.config_mismatch(stored_config or {}, json.loads(config.to_json_best_effort()))
        if diffs:
            raise config_check.ConfigError(
                f"workdir {workdir} holds a checkpoint (step {latest}) of an incompatible config:\n  "
                + "\n  ".join(diffs) + "\nuse a new --workdir, or --config.init_from to start from "
                "its parameters")
        run.state, _, start, data_state = checkpoint.restore(
            mngr, checkpoint.abstract_of(run.state), with_data=True)
        if data_state is not None:
            it.set_state(checkpoint.from_jsonable(data_state))
        say(f"resuming from step {start}: the latest finalized checkpoint in {mngr.directory}")
    else:
        started = start_fresh(run, config)
        if started:
            say(started)

    if is_main and latest is None:      # a fresh run (re)writes its config; a resumed one keeps it
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    writer = report.MetricsWriter(workdir)
    watcher = PreemptionWatcher()
    setup_s = time.time() - t0

    def save(step: int, force: bool = False) -> None:
        checkpoint.save(mngr, step, run.state, _meta(config, data, step), it.get_state(), force=force)

    bar = tqdm(total=t.steps, initial=start, desc="train", disable=quiet or not is_main,
               dynamic_ncols=True)
    tokens, tok_t0, last, step = [], time.time(), {}, start
    interval = []       # per-step answer count sums (losses.answer_counts), summed when logging
    train_t0 = time.time()
    # time_s in metrics.jsonl: seconds of training (setup excluded), continued across resumes.
    time_offset = report.last_time_s(workdir, start) if start else 0.0

    eval_s = 0.0        # periodic evaluation time, kept out of the training clock and time limit

    def clock() -> float:
        return time_offset + time.time() - train_t0 - eval_s

    def evaluate_during(step: int, best_mngr, time_s: float) -> None:
        """The eval sets of ``eval.during``, kept out of the training clock and of tokens/s."""
        nonlocal eval_s, tok_t0
        e0 = time.time()
        _evaluate_all(run, data, writer, step, best_mngr, config, time_s,
                      only=csv(config.eval.get("during", "")))
        eval_s += time.time() - e0
        tok_t0 += time.time() - e0

    if config.eval.get("at_start", False) and start == 0:   # the untrained (e.g. zero-shot) model
        evaluate_during(0, None, 0.0)

    try:
        for step in range(start + 1, t.steps + 1):
            batch = next(it)
            run.state, metrics = run.train_step(run.state, sharding.put_batch(batch, run.mesh, run.rules))
            tokens.append(metrics["tokens"])  # of the GLOBAL batch (ours is a block); read when logging
            interval.append({k: v for k, v in metrics.items() if k.startswith("n/")})
            if t.nonfinite == "stop" and not bool(metrics["finite"]):
                bad = [k for k in FINITE_TERMS if not bool(metrics[f"finite/{k}"])]
                raise NonFiniteError(
                    f"step {step}: non-finite {', '.join(bad)}; stopped without saving this step "
                    f"(last good checkpoint: {mngr.latest_step()}). Lower train.lr or set "
                    "train.nonfinite='skip' to skip such steps.")
            if step % t.log_every == 0 or step == t.steps:
                last = {k: v for k, v in jax.device_get(metrics).items()
                        if not k.startswith("n/") and k not in ("answer_acc", "answer_ce")}
                # Answer metrics over the whole log interval, not just its last step.
                sums = jax.tree.map(lambda *xs: np.sum(xs, axis=0), *jax.device_get(interval))
                last.update(report.answer_metrics(sums))
                interval = []
                now = time.time()
                last["time_s"] = clock()
                last["tokens_per_s"] = int(np.sum(jax.device_get(tokens), dtype=np.int64)) / max(
                    now - tok_t0, 1e-9)
                last["skipped_steps"] = int(nnx.to_pure_dict(run.state)["skipped"])
                tokens, tok_t0 = [], now
                writer.write(step, {k: v for k, v in last.items() if not k.startswith("finite")})
                bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last.get('answer_acc', float('nan')):.2f}",
                                mi=f"{last['mi']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            bar.update(1)
            if config.checkpoint.every and step % config.checkpoint.every == 0:
                save(step)
            if config.eval.every and step % config.eval.every == 0 and step < t.steps:
                evaluate_during(step, best, clock())
            if watcher.should_stop(step, mngr):
                save(step, force=True)
                mngr.wait_until_finished()
                say(f"preemption notice: saved step {step}, exiting with status {EXIT_PREEMPTED}")
                raise Preempted(step)
            if t.time_limit_s and time.time() - train_t0 - eval_s > t.time_limit_s:
                break
        train_s = time.time() - train_t0 - eval_s
        wall_s = time.time() - train_t0
        bar.close()
        if mngr.latest_step() != step:
            save(step)
        results = _evaluate_all(run, data, writer, step, best, config, clock())
    finally:
        watcher.close()
        mngr.wait_until_finished()
        mngr.close()
        if best is not None:
            best.wait_until_finished()
            best.close()
        writer.close()

    refs = {}
    ref_predictors = fit_reference(data.train_problems) if data.train_problems else {}
    for es in data.eval_sets:
        if es.problems is not None and ref_predictors:
            refs[es.name] = {k: score_reference(p, es.problems) for k, p in ref_predictors.items()}
    majority_loss = {}
    if is_main:
        sample = data.train_sample if data.train_sample is not None else data.train_examples
        majority_loss = {es.name: evaluate.answer_prior_loss(sample, es.examples, data.tokenizer)
                         for es in data.eval_sets}
        with open(os.path.join(workdir, "references.json"), "w") as f:    # read by plot_learning_curve
            json.dump({**refs, "majority_loss": majority_loss}, f, indent=2)
    plots = report.plot_training(workdir) + report.plot_learning_curve(workdir)
    summary = {"steps": step, "resumed_from": start, "setup_s": setup_s, "train_s": train_s,
               "train_wall_s": wall_s,
               "final_train": _floats(last), "eval": results, "reference": refs,
               "majority_loss": majority_loss, "plots": plots}
    if is_main:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=float)
        if not quiet:
            print()
            print(evaluate.results_table(results, refs))
            print()
            print(evaluate.modules_table(results, run.num_modules))
            print(f"\ntrained steps {start + 1}..{step} in {train_s:.0f}s (+ {wall_s - train_s:.0f}s of "
                  f"periodic evaluation; setup {setup_s:.0f}s, "
                  f"{last.get('tokens_per_s', 0):.0f} tokens/s at the end); workdir {workdir}")
    return summary


def _evaluate_all(run: Run, data, writer, step: int, best, config, time_s: float | None = None,
                  only: list[str] | None = None) -> dict:
    """Evaluate every eval set (or those named in ``only``, when any of them exists); each metrics.jsonl
    record carries ``time_s`` (training seconds at ``step``)."""
    results = {}
    sets = [es for es in data.eval_sets if es.name in (only or ())] or data.eval_sets
    if best is not None:    # the best-checkpoint metric needs its set
        sets += [es for es in data.eval_sets
                 if es.name == config.checkpoint.best_metric.partition("/")[0] and es not in sets]
    for es in sets:
        results[es.name] = run.evaluate(es.examples)
        extra = {} if time_s is None else {"time_s": time_s}
        writer.write(step, {**_eval_scalars(results[es.name]), **extra}, prefix=f"eval/{es.name}")
    if best is not None:
        name = config.checkpoint.best_metric
        split, _, key = name.partition("/")
        if split not in results or key not in results[split]:
            raise config_check.ConfigError(f"checkpoint.best_metric={name!r}: no such eval metric; "
                                           f"have {sorted(results)} x {sorted(results[next(iter(results))])}")
        checkpoint.save(best, step, run.state, _meta(config, data, step),
                        metrics={name: results[split][key]})
    return results


def start_fresh(run: Run, config) -> str:
    """A new run's starting parameters: another run's (``init_from``), else a pretrained base
    (``model.init``, with the heads derived from it), else the random init. Returns what it did."""
    if config.init_from:
        run.state = _init_from(run, config.init_from)
        return f"initialised parameters from {config.init_from}"
    if config.model.get("init"):
        _load_pretrained_base(run, config)
        return f"loaded the pretrained base {config.model.init}"
    return ""


def _init_from(run: Run, other: str):
    """Parameters (model only) of another run's latest checkpoint; optimiser etc. start fresh."""
    mngr = checkpoint.manager(other)
    try:
        restored, _, _, _ = checkpoint.restore(mngr, checkpoint.abstract_of(run.state))
    except ValueError as e:
        raise config_check.ConfigError(f"init_from={other!r}: its state does not fit this config ({e})")
    finally:
        mngr.close()
    cur = nnx.to_pure_dict(run.state)
    cur["model"] = nnx.to_pure_dict(restored)["model"]
    state = run.state
    nnx.replace_by_pure_dict(state, cur)
    return state


def _load_pretrained_base(run: Run, config) -> None:
    """Pretrained weights (``model.init``: smollm2 | HF dir | .gguf) into the sharded base, in place."""
    pcfg, weights = hf.load_pretrained(config.model.init, lazy=True)
    m = config.model
    ours = build.model_config(config, run.data.tokenizer.vocab_size).base
    diffs = [f"model.{f}: {config.model.init} has {getattr(pcfg, f)!r}, config has {getattr(ours, f)!r}"
             for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
                       "tie_embeddings", "rope_theta")
             if getattr(pcfg, f) != getattr(ours, f)]
    if diffs:
        raise config_check.ConfigError(f"model.init={m.init!r} does not fit the config:\n  "
                                       + "\n  ".join(diffs))
    base = run.state["model"]["base"]
    hf.load_into(base, weights)
    run.state["model"]["base"] = base
    run.derive_heads()


def _prepare_workdir(config, workdir: str) -> dict | None:
    """Create/validate the workdir before anything expensive; return a stored config, if any."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OSError(f"workdir {workdir!r} is not writable: {e}") from e
    return checkpoint.read_config(workdir)


def _check_disk(workdir: str, state_bytes: int, keep: int) -> None:
    free = shutil.disk_usage(workdir).free
    need = state_bytes * (keep + 1)
    if free < need:
        raise OSError(f"workdir {workdir!r}: {free / 2**20:.1f} MiB free, checkpoints need about "
                      f"{need / 2**20:.1f} MiB ({keep + 1} x {state_bytes / 2**20:.1f} MiB state)")


def _eval_scalars(r: dict) -> dict:
    return {k: v for k, v in r.items() if isinstance(v, float) and not np.isnan(v)}


def _floats(d: dict) -> dict:
    return {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in d.items()}


def _meta(config, data, step: int) -> dict:
    import importlib.metadata as md
    versions = {p: md.version(p) for p in ("jax", "flax", "optax", "orbax-checkpoint", "grain")}
    return {"step": step, "max_len": data.max_len, "num_slots": data.num_slots,
            "vocab_size": data.tokenizer.vocab_size, "versions": versions,
            "mesh": dict(config.mesh), "num_devices": jax.device_count(),
            "config": json.loads(config.to_json_best_effort())}
