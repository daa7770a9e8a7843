"""Section "sweep_jobs": what ``iclm-sweep --jobs=2`` buys on this CPU.

The ``acre.py:cpu`` ICLM K = 2 train step (the reproduction grid's point; generated problems, batches padded
to their bucket) timed in separate processes, as sweep points run: one process on every core (``--jobs=1``)
against two processes at once, each pinned to its own half of the cores (``--jobs=2``). Each process
compiles every batch length first, then all the processes of an arm start timing together (a file
barrier); the arms alternate. Throughput is steps per second summed over the arm's processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import harness as H


def _worker(variant: str, steps: int, n_batches: int, bucket: int, ready: str, go: str) -> None:
    c = H.acre_config(variant)
    c.data.update(stream=False, train_problems=8 * n_batches, val_problems=0, eval_problems=8, eval_splits="IID",
                  length_bucket=bucket)
    b = H.step_bench(c, n_batches=n_batches)
    for _ in range(2 * len(b.batches)):       # every distinct length compiled
        b()
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.01)
    t0 = time.perf_counter()
    for _ in range(steps):
        b()
    print(json.dumps({"step_s": (time.perf_counter() - t0) / steps}), flush=True)


def _arm(slices: list, worker_args: list[str], tmp: str, env: dict) -> list[float]:
    """Seconds per step of each process of one arm (``None`` in ``slices``: not pinned)."""
    go = os.path.join(tmp, f"go.{time.time_ns()}")
    procs, readies = [], []
    for i, cores in enumerate(slices):
        ready = f"{go}.ready{i}"
        readies.append(ready)
        procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.sweep_jobs", "worker", *worker_args,
                                       ready, go], cwd=H.REPO, env=env, stdout=subprocess.PIPE, text=True))
        if cores is not None:
            os.sched_setaffinity(procs[-1].pid, cores)
    while not all(os.path.exists(r) for r in readies):
        if any(p.poll() not in (None, 0) for p in procs):
            raise RuntimeError("a benchmark worker failed")
        time.sleep(0.05)
    open(go, "w").close()
    out = [p.communicate()[0] for p in procs]
    return [json.loads(o.strip().splitlines()[-1])["step_s"] for o in out]


def run(quick: bool = False) -> H.Section:
    from iclm_jax.sweep.launchers import core_slices
    variant = "demo" if quick else "cpu"
    steps, rounds = (4, 1) if quick else (200, 3)
    # --quick: 2 batches padded to max_len (one compile per process) instead of 8 in length buckets of 16
    n_batches, bucket = (2, 0) if quick else (8, 16)
    worker_args = [variant, str(steps), str(n_batches), str(bucket)]
    cores = sorted(os.sched_getaffinity(0))
    arms = {"--jobs=1": [None]}
    if len(cores) >= 2:
        arms["--jobs=2"] = core_slices(2, cores)
    with tempfile.TemporaryDirectory(prefix="iclm_jobs_") as tmp:
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(tmp, "xla_cache")}
        times = {k: [] for k in arms}
        for _ in range(rounds):
            for name, slices in arms.items():
                times[name].append(_arm(slices, worker_args, tmp, env))
    rows = []
    base = None
    for name, runs in times.items():
        per_step = [t for r in runs for t in r]
        rate = H.med([sum(1 / t for t in r) for r in runs])
        base = base or rate
        rows.append([name, len(arms[name]), H.fmt_time(per_step), f"{rate:.2f}", f"{rate / base:.2f} x"])
    text = (__doc__.split("\n\n", 1)[1].strip() + "\n\n"
            + f"Config `acre.py:{variant}`, {n_batches} batches (length_bucket={bucket}), {steps} timed steps per "
            f"process, {rounds} round(s); cores {cores}.\n\n"
            + H.table(["arm", "processes", "step per process", "steps/s (sum)", "throughput"], rows))
    return H.Section("sweep_jobs", "Sweep points at once: --jobs", text,
                     "python -m benchmarks.run --only sweep_jobs" + (" --quick" if quick else ""))


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7])
