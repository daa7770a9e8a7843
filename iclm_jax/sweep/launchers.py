"""Where the points of a sweep run: ``local`` (in sequence, here), ``slurm`` (one array job, a task per
point) or ``tpu`` (one ``launch/tpu_pod.sh`` run per point, in sequence on one slice).

Every launcher starts the same ``iclm-train`` command per point, in the point's own workdir, so every
launcher resumes the same way: a finished point (its ``summary.json`` exists) is skipped, an interrupted
one resumes from its last checkpoint.

SLURM: a plain ``sbatch --array`` script that hands each task's arguments to ``launch/slurm.sbatch``
(its environment, srun line, SIGTERM-before-timeout and requeue), rather than submitit: submitit ships
each job as a pickled Python callable into its own log layout, while this script is one readable file
that ``--dry-run`` writes for inspection and that runs with nothing but SLURM and the checkout.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

from iclm_jax.sweep.points import Point

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUMMARY = "summary.json"
#: The sweep's persistent XLA compilation cache, under its workdir: points of one structure (seeds,
#: protocols) share compiled steps, so only the first compiles them. ``JAX_COMPILATION_CACHE_DIR`` wins.
COMPILE_CACHE = "xla_cache"


def compile_cache_dir(workdir: str) -> str:
    """The cache directory the sweep's points use: ``$JAX_COMPILATION_CACHE_DIR`` or ``<workdir>/xla_cache``."""
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(os.path.abspath(workdir), COMPILE_CACHE)


def finished(workdir: str, p: Point) -> bool:
    return os.path.isfile(os.path.join(workdir, p.dirname, SUMMARY))


def core_slices(jobs: int, cores=None) -> list[list[int]]:
    """This process's CPU cores (``os.sched_getaffinity``) cut into ``jobs`` contiguous, equal-as-possible
    slices, one per concurrent point; refused (ValueError, one line) if there are fewer cores than jobs."""
    cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs={jobs!r}: expected an integer >= 1")
    if jobs > len(cores):
        raise ValueError(f"--jobs={jobs}: only {len(cores)} CPU cores here, so at most {len(cores)} points at once")
    q, r = divmod(len(cores), jobs)
    out, i = [], 0
    for j in range(jobs):
        n = q + (j < r)
        out.append(cores[i:i + n])
        i += n
    return out


def run_local(points: list[Point], workdir: str, total: int, say=print, extra: list[str] = (),
              jobs: int = 1) -> list[Point]:
    """Train each unfinished point (output in ``<point>/train.log``); returns the failed points.

    ``jobs > 1`` trains that many points at once, each pinned to its own slice of the CPU cores
    (``core_slices``), in the sweep's order: on a CPU where one step does not keep every core busy (XLA's
    small ops), two pinned points train faster together than one after the other on all cores."""
    slices = core_slices(jobs) if jobs > 1 else [None]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": compile_cache_dir(workdir)}
    failed, running = [], {}                # slot -> (Popen, point, start time, log path, log file)
    todo = []
    for p in points:
        if finished(workdir, p):
            say(f"[{p.index + 1}/{total}] {p.name}: finished, skipped")
        else:
            todo.append(p)

    def start(slot: int, p: Point) -> None:
        os.makedirs(os.path.join(workdir, p.dirname), exist_ok=True)
        log = os.path.join(workdir, p.dirname, "train.log")
        f = open(log, "a")
        cores = slices[slot]
        proc = subprocess.Popen([sys.executable, "-m", "iclm_jax.main", *p.train_args(workdir), "--quiet", *extra],
                                stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        running[slot] = (proc, p, time.time(), log, f)
        if cores is not None:     # before the interpreter has started: its threads (XLA's) inherit the cores
            os.sched_setaffinity(proc.pid, cores)
            say(f"[{p.index + 1}/{total}] {p.name}: started on cores {','.join(map(str, cores))}")

    try:
        while todo or running:
            for slot in range(len(slices)):
                if slot not in running and todo:
                    start(slot, todo.pop(0))
            time.sleep(0.2)
            for slot, (proc, p, t0, log, f) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                f.close()
                del running[slot]
                head, took = f"[{p.index + 1}/{total}] {p.name}", time.time() - t0
                if code != 0:
                    failed.append(p)
                    say(f"{head}: FAILED (exit {code}) after {took:.0f}s: {_last_line(log)} (log: {log})")
                else:
                    say(f"{head}: done in {took:.0f}s")
    finally:                                # interrupted: the points still training stop with the sweep
        for proc, *_ in running.values():
            proc.terminate()
    return failed


def _last_line(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [x.strip() for x in f if x.strip()]
    return lines[-1][:300] if lines else "(no output)"


def slurm_script(points: list[Point], workdir: str, sbatch_args: list[str] = ()) -> str:
    """An array job: task i runs point i through ``launch/slurm.sbatch`` (so its #SBATCH resources, given
    here as ``sbatch_args`` lines, apply to each task)."""
    cases = "\n".join(f"  {i}) args=({' '.join(shlex.quote(a) for a in p.train_args(workdir))}) ;;"
                      for i, p in enumerate(points))
    extra = "".join(f"#SBATCH {a}\n" for a in sbatch_args)
    return f"""#!/usr/bin/env bash
# {len(points)} points of a sweep as one SLURM array job (written by `python -m iclm_jax.sweep`).
# Task i trains point i with launch/slurm.sbatch; a requeued or resubmitted task resumes its point.
#SBATCH --job-name=iclm-sweep
#SBATCH --array=0-{len(points) - 1}
#SBATCH --output={os.path.abspath(workdir)}/slurm-%A_%a.out
#SBATCH --signal=TERM@120
#SBATCH --requeue
{extra}set -euo pipefail
REPO=${{REPO:-{shlex.quote(REPO)}}}
case "${{SLURM_ARRAY_TASK_ID:?not inside a SLURM array task}}" in
{cases}
  *) echo "no point $SLURM_ARRAY_TASK_ID in this sweep" >&2; exit 64 ;;
esac
if [[ -f "${{args[1]#--workdir=}}/{SUMMARY}" ]]; then echo "point $SLURM_ARRAY_TASK_ID finished: skipped"; exit 0; fi
exec bash "$REPO/launch/slurm.sbatch" "${{args[@]}}"
"""


def tpu_commands(points: list[Point], workdir: str) -> list[list[str]]:
    """One ``launch/tpu_pod.sh`` command per point (TPU_NAME, ZONE, ... come from the environment)."""
    return [["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), *p.train_args(workdir)] for p in points]
