"""The training loop: data → jitted step → metrics → evaluation → checkpoint → report.

A run resumes automatically from the latest finalized checkpoint in its workdir (state, data position,
RNG: the continuation is bit-identical to an uninterrupted run on one device). SIGTERM saves and exits
with ``preemption.EXIT_PREEMPTED``; a non-finite loss term stops the run naming step and term, keeping
the last good checkpoint (or skips the step with ``train.nonfinite='skip'``).

``train`` reads as its four phases: ``_Training.build`` (data, run, dataset, checkpoint managers),
``restore_or_init``, ``steps`` (the step loop with logging, periodic evaluation, saving, preemption) and
``finish`` (final evaluation, reference predictors, plots, summary).
"""
from __future__ import annotations

import collections
import json
import os
import sys
import time

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from iclm_jax import checkpoint, config_check, evaluate, report, run_report, sharding, sharding_report
from iclm_jax.data import pipeline, sources, tasks
from iclm_jax.data.reference import fit_majority_answer, score_majority_answer
from iclm_jax.data.sources import DataConfig
from iclm_jax.fields import csv, typed
from iclm_jax.model.codebook import collapse_report
from iclm_jax.train import build, continual, disk_space, resume, workdir_lock
from iclm_jax.train.build import CheckpointConfig, EvalConfig, LoopConfig
from iclm_jax.train.optim import effective_warmup
from iclm_jax.train.preemption import EXIT_PREEMPTED, PreemptionWatcher
from iclm_jax.train.run import Run, start_fresh
from iclm_jax.train.step import FINITE_TERMS

SKIP_WINDOW, SKIP_MIN = 20, 5   # train.skip_limit: the fraction of the last 20 steps (once 5 have run)


class NonFiniteError(FloatingPointError):
    """A loss term or the gradient norm was NaN/Inf (the message names the step and the terms)."""


class Preempted(SystemExit):
    def __init__(self, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.step = step


def train(config, workdir: str, *, quiet: bool = False) -> dict:
    """Train per ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the summary. A full
    disk at any point (before training, a save, a metrics write) raises ``disk_space.DiskFull``."""
    config_check.validate(config)
    config, notes = continual.prepare(config)      # the config itself unless continual.from_run is set
    if notes:
        config_check.validate(config)              # the fields it set (the adapter stack over mesh.module)
    for note in notes if jax.process_index() == 0 else ():
        print(note, file=sys.stderr, flush=True)
    try:
        return _train(config, workdir, quiet)
    except (OSError, ValueError) as e:   # a full disk surfaces as either, from our files or orbax's
        full = disk_space.as_disk_full(e, workdir, checkpoint.finalized_steps(os.path.join(workdir, "checkpoints")))
        if full is None or full is e:
            raise
        raise full from None


def _train(config, workdir: str, quiet: bool) -> dict:
    _prepare_workdir(workdir)
    with workdir_lock.hold(workdir, enabled=jax.process_index() == 0):
        resume.check(config, workdir)
        done = resume.finished_summary(config, workdir)
        if done is not None:
            return done
        tr = _Training.build(config, workdir, quiet)
        tr.restore_or_init()
        try:
            tr.steps()
            results = _evaluate_all(tr.run, tr.data, tr.writer, tr.step, tr.best, tr.ckpt.best_metric, tr.clock(),
                                    views=True)
        except BaseException:     # close, but keep the first error (a failed save's, not the writer's)
            tr.close(raising=False)
            raise
        tr.close()
        return tr.finish(results)


class _Training:
    """One ``train`` call's state: the run, its data iterator, checkpoint managers and clocks."""

    @classmethod
    def build(cls, config, workdir: str, quiet: bool) -> "_Training":
        tr = cls()
        tr.config, tr.workdir, tr.quiet = config, workdir, quiet
        tr.loop, tr.eval = typed(LoopConfig, config.train), typed(EvalConfig, config.eval)
        tr.ckpt, data_cfg = typed(CheckpointConfig, config.checkpoint), typed(DataConfig, config.data)
        tr.is_main = jax.process_index() == 0
        # Resume and preemption notices go to stderr even with quiet (which hides the bar and tables).
        tr.say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if tr.is_main else (lambda *a: None)
        optim = build.optim_config(config)
        warmup = effective_warmup(optim.warmup_steps, optim.steps)
        if warmup != optim.warmup_steps:
            tr.say(f"train.warmup_steps={optim.warmup_steps} exceeds train.steps={optim.steps}: "
                   f"warming up over {warmup} steps (a tenth of the run)")
        tr.t0 = time.time()
        data = tr.data = sources.build(data_cfg, config.seed)
        config_check.validate_loaded(config, data)
        if tr.is_main:
            data.tokenizer.save(os.path.join(workdir, "tokenizer"))
            with open(os.path.join(workdir, "data.json"), "w") as f:
                json.dump({"max_len": data.max_len, "num_slots": data.num_slots,
                           "train_examples": len(data.train_examples)}, f)
        run = tr.run = Run(config, workdir, data)
        tr.state_bytes = run.state_bytes()
        disk_space.check_before_training(workdir, tr.state_bytes, tr.ckpt.keep)
        if not quiet:
            tr.say(sharding_report.summary_line(run.state, run.mesh, run.rules))
        stream, batch = data_cfg.stream, tr.loop.batch_size   # an endless source is read in order, once
        ds = pipeline.make_dataset(
            data.train_examples, data.tokenizer, max_len=data.max_len,
            batch_size=batch, num_slots=data.num_slots, seed=config.seed, shuffle=not stream,
            repeat=not stream, stream=stream, rows=sharding.process_rows(run.mesh, batch, run.rules),
            worker_count=data_cfg.workers, length_bucket=data_cfg.length_bucket)
        tr.it = iter(ds)
        tr.mngr = checkpoint.manager(workdir, tr.ckpt.keep)
        tr.best = (checkpoint.manager(workdir, 1, "best", tr.ckpt.best_metric) if tr.ckpt.best_metric else None)
        return tr

    def restore_or_init(self) -> None:
        """Resume from the workdir's latest finalized checkpoint (``resume.check`` has accepted its config),
        else start fresh; write the config; open the metrics writer and the preemption watcher."""
        config, workdir = self.config, self.workdir
        self.start, self.saved_step, self.unrecorded = 0, None, []
        latest = self.mngr.latest_step()
        self.resumed = latest is not None
        if latest is not None:
            self.run.state, _, self.start, data_state = checkpoint.restore(
                self.mngr, checkpoint.abstract_of(self.run.state), with_data=True, say=self.say,
                quarantine=os.path.join(workdir, "corrupt_checkpoints"))
            if data_state is not None:
                self.it.set_state(checkpoint.from_jsonable(data_state))
            self.say(f"resuming from step {self.start}: the latest finalized checkpoint in {self.mngr.directory}")
        else:
            started = start_fresh(self.run, config)
            if started:
                self.say(started)
        if self.is_main:   # a resumed run differs from its stored config in resume.RESUMABLE fields at most
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
        self.writer = report.MetricsWriter(workdir)
        self.watcher = PreemptionWatcher()
        self.setup_s = time.time() - self.t0
        self.step, self.last = self.start, {}
        self.train_t0 = time.time()
        # time_s in metrics.jsonl: seconds of training (setup excluded), continued across resumes.
        self.time_offset = report.last_time_s(workdir, self.start) if self.start else 0.0
        self.eval_s = 0.0        # periodic evaluation time, kept out of the training clock and time limit
        self.tok_t0 = time.time()

    def clock(self) -> float:
        return self.time_offset + time.time() - self.train_t0 - self.eval_s

    def save(self, step: int, force: bool = False) -> None:
        """Save ``step`` unless it is saved already (a preemption notice on a periodic save's step)."""
        if step in (self.saved_step, self.start if self.resumed else None):
            return
        self.record_integrity()      # of the previous save, finished by now (saves are asynchronous)
        disk_space.check_before_save(os.fspath(self.mngr.directory), self.state_bytes, step,
                                     checkpoint.finalized_steps(os.fspath(self.mngr.directory)))
        if checkpoint.save(self.mngr, step, self.run.state, _meta(self.config, self.data, step),
                           self.it.get_state(), force=force):
            self.unrecorded.append((self.mngr, step))
        self.saved_step = step

    def record_integrity(self) -> None:
        for mngr, step in self.unrecorded:
            checkpoint.record_integrity(mngr, step)
        self.unrecorded = []

    def evaluate_during(self, step: int, best_mngr, time_s: float) -> None:
        """The eval sets of ``eval.during``, kept out of the training clock and of tokens/s."""
        e0 = time.time()
        _evaluate_all(self.run, self.data, self.writer, step, best_mngr, self.ckpt.best_metric, time_s,
                      only=csv(self.eval.during))
        self.eval_s += time.time() - e0
        self.tok_t0 += time.time() - e0

    def steps(self) -> None:
        """Steps ``start + 1 ..`` to ``train.steps`` (or the time limit); saves the last one."""
        run, t = self.run, self.loop
        if self.eval.at_start and self.start == 0:   # the untrained (e.g. zero-shot) model
            self.evaluate_during(0, None, 0.0)
        bar = tqdm(total=t.steps, initial=self.start, desc="train", disable=self.quiet or not self.is_main,
                   dynamic_ncols=True)
        tokens, interval = [], []   # interval: per-step answer count sums (losses.answer_counts)
        skipped = collections.deque(maxlen=SKIP_WINDOW)   # nonfinite=skip: was each recent step skipped
        for step in range(self.start + 1, t.steps + 1):
            self.step = step
            batch = next(self.it)
            run.state, metrics = run.train_step(run.state, sharding.put_batch(batch, run.mesh, run.rules))
            tokens.append(metrics["tokens"])  # of the GLOBAL batch (ours is a block); read when logging
            interval.append({k: v for k, v in metrics.items() if k.startswith("n/")})
            if t.nonfinite == "stop" and not bool(metrics["finite"]):
                raise NonFiniteError(
                    f"step {step}: non-finite {_bad_terms(metrics)}; stopped without saving this step "
                    f"(last good checkpoint: {self.mngr.latest_step()}). Lower train.lr or set "
                    "train.nonfinite='skip' to skip such steps.")
            if t.nonfinite == "skip":
                skipped.append(not bool(metrics["finite"]))
                if len(skipped) >= SKIP_MIN and sum(skipped) > t.skip_limit * len(skipped):
                    raise NonFiniteError(
                        f"step {step}: {sum(skipped)} of the last {len(skipped)} steps were skipped (non-finite "
                        f"{_bad_terms(metrics)}), above train.skip_limit={t.skip_limit}; stopped without saving "
                        f"this step (last good checkpoint: {self.mngr.latest_step()}). Lower train.lr.")
            if step % t.log_every == 0 or step == t.steps:
                self.log(step, metrics, tokens, interval, bar)
                tokens, interval = [], []
            bar.update(1)
            if self.ckpt.every and step % self.ckpt.every == 0:
                self.save(step)
            if self.eval.every and step % self.eval.every == 0 and step < t.steps:
                self.evaluate_during(step, self.best, self.clock())
            if self.watcher.should_stop(step, self.mngr):
                self.save(step, force=True)
                self.mngr.wait_until_finished()
                self.say(f"preemption notice: saved step {step}, exiting with status {EXIT_PREEMPTED}")
                raise Preempted(step)
            if t.time_limit_s and time.time() - self.train_t0 - self.eval_s > t.time_limit_s:
                break
        self.train_s = time.time() - self.train_t0 - self.eval_s
        self.wall_s = time.time() - self.train_t0
        bar.close()
        self.save(self.step)

    def log(self, step: int, metrics: dict, tokens: list, interval: list, bar) -> None:
        """One metrics.jsonl record: the last step's metrics, answer metrics over the whole interval."""
        last = {k: v for k, v in jax.device_get(metrics).items()
                if not k.startswith("n/") and k not in ("answer_acc", "answer_ce")}
        sums = jax.tree.map(lambda *xs: np.sum(xs, axis=0), *jax.device_get(interval))
        last.update(report.answer_metrics(sums))
        now = time.time()
        last["time_s"] = self.clock()
        last["tokens_per_s"] = int(np.sum(jax.device_get(tokens), dtype=np.int64)) / max(now - self.tok_t0, 1e-9)
        last["skipped_steps"] = int(nnx.to_pure_dict(self.run.state)["skipped"])
        self.tok_t0, self.last = now, last
        self.writer.write(step, {k: v for k, v in last.items() if not k.startswith("finite")})
        bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last.get('answer_acc', float('nan')):.2f}",
                        mi=f"{last['mi']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")

    def close(self, raising: bool = True) -> None:
        """Finish pending saves and close everything; every part is tried, the first failure re-raised
        (``raising``) or dropped (a save that failed for a full disk must not leave the rest open)."""
        parts = [self.watcher.close, self.mngr.wait_until_finished, self.record_integrity, self.mngr.close]
        if self.best is not None:
            parts += [self.best.wait_until_finished, self.best.close]
        errors = []
        for part in parts + [self.writer.close]:
            try:
                part()
            except Exception as e:   # noqa: BLE001  (re-raised below, after the rest is closed)
                errors.append(e)
        if errors and raising:
            raise errors[0]

    def finish(self, results: dict) -> dict:
        """Reference predictors, plots and ``summary.json`` (and the tables, unless quiet)."""
        data, workdir, step, last = self.data, self.workdir, self.step, self.last
        refs = {}
        task = tasks.get(self.run.config.data.get("task", "acre"))
        ref_predictors = task.fit_reference(data.train_problems) if data.train_problems else {}
        sample = data.train_sample if data.train_sample is not None else data.train_examples
        train_answers = None
        for es in data.eval_sets:
            if es.problems is not None and ref_predictors:
                refs[es.name] = {k: task.score_reference(p, es.problems) for k, p in ref_predictors.items()}
            elif es.problems is None:        # evals JSONL: the answer priors, from training and from itself
                train_answers = train_answers or fit_majority_answer(sample)
                refs[es.name] = {"majority answer (train)": score_majority_answer(train_answers, es.examples),
                                 "majority answer (this set)": score_majority_answer(
                                     fit_majority_answer(es.examples), es.examples)}
        majority_loss = {}
        if self.is_main:
            majority_loss = {es.name: evaluate.answer_prior_loss(sample, es.examples, data.tokenizer)
                             for es in data.eval_sets}
            with open(os.path.join(workdir, "references.json"), "w") as f:    # read by plot_learning_curve
                json.dump({**refs, "majority_loss": majority_loss}, f, indent=2)
        for name, r in results.items():     # modules the router (almost) never uses: say so, once per set
            line = collapse_report([r.get(f"module_{m}_rows", 0) for m in range(self.run.num_modules)],
                                   self.run.config.data.num_domains)
            if line:
                r["collapse"] = line

        plots = (report.plot_training(workdir, self.run.config.data.num_domains) + report.plot_learning_curve(workdir)
                 + run_report.plot_routing(workdir, results) + run_report.plot_similarity(workdir, results))
        summary = {"steps": step, "resumed_from": self.start, "setup_s": self.setup_s, "train_s": self.train_s,
                   "train_wall_s": self.wall_s,
                   # Unix times of this process's start and of this summary: a sweep's wall time is their union
                   "started_at": self.t0, "finished_at": time.time(),
                   "final_train": _floats(last), "eval": results, "reference": refs,
                   "majority_loss": majority_loss, "plots": plots}
        if self.is_main:
            with open(os.path.join(workdir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2, default=float)
            summary["report"] = run_report.write_markdown(workdir, results, refs, self.run.num_modules, summary,
                                                          self.run.config)
            if not self.quiet:
                print()
                print(evaluate.results_table(results, refs))
                print()
                print(evaluate.modules_table(results, self.run.num_modules))
                if any("views" in r for r in results.values()):
                    print()
                    print(evaluate.views_table(results))
                    print()
                    print(evaluate.independence_table(results))
                print(f"\ntrained steps {self.start + 1}..{step} in {self.train_s:.0f}s (+ "
                      f"{self.wall_s - self.train_s:.0f}s of periodic evaluation; setup {self.setup_s:.0f}s, "
                      f"{last.get('tokens_per_s', 0):.0f} tokens/s at the end); workdir {workdir}")
                for name, r in results.items():
                    if "collapse" in r:
                        print(f"{name}: {r['collapse']}")
                moved = int(last.get("router_relocations", 0) or 0)
                line = run_report.relocation_report(moved, self.run.num_modules, step)
                if line:
                    print(line)
                print(run_report.outputs_line(workdir, summary["report"], plots))
        return summary


def _evaluate_all(run: Run, data, writer, step: int, best, best_metric: str, time_s: float | None = None,
                  only: list[str] | None = None, views: bool = False) -> dict:
    """Evaluate every eval set (or those named in ``only``, when any of them exists); each metrics.jsonl
    record carries ``time_s`` (training seconds at ``step``)."""
    results = {}
    sets = [es for es in data.eval_sets if es.name in (only or ())] or data.eval_sets
    if best is not None:    # the best-checkpoint metric needs its set
        sets += [es for es in data.eval_sets
                 if es.name == best_metric.partition("/")[0] and es not in sets]
    for es in sets:
        results[es.name] = run.evaluate(es.examples, views=views)
        extra = {} if time_s is None else {"time_s": time_s}
        writer.write(step, {**_eval_scalars(results[es.name]), **extra}, prefix=f"eval/{es.name}")
    if best is not None:
        name = best_metric
        split, _, key = name.partition("/")
        if split not in results or key not in results[split]:
            raise config_check.ConfigError(f"checkpoint.best_metric={name!r}: no such eval metric; "
                                           f"have {sorted(results)} x {sorted(results[next(iter(results))])}")
        if checkpoint.save(best, step, run.state, _meta(run.config, data, step),
                           metrics={name: results[split][key]}):
            checkpoint.record_integrity(best, step)
    return results


def _prepare_workdir(workdir: str) -> None:
    """Create the workdir and check that it is writable, before anything expensive."""
    probe = os.path.join(workdir, f".write_probe.{os.getpid()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        if os.path.exists(probe):
            os.remove(probe)
        raise OSError(f"workdir {workdir!r} is not writable: {e}") from e


def _bad_terms(metrics) -> str:
    return ", ".join(k for k in FINITE_TERMS if not bool(metrics[f"finite/{k}"])) or "none"


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
