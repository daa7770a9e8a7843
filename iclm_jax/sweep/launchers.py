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


def run_local(points: list[Point], workdir: str, total: int, say=print, extra: list[str] = ()) -> list[Point]:
    """Train each unfinished point in turn (output in ``<point>/train.log``); returns the failed points."""
    failed = []
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": compile_cache_dir(workdir)}
    for p in points:
        head = f"[{p.index + 1}/{total}] {p.name}"
        if finished(workdir, p):
            say(f"{head}: finished, skipped")
            continue
        os.makedirs(os.path.join(workdir, p.dirname), exist_ok=True)
        log = os.path.join(workdir, p.dirname, "train.log")
        t0 = time.time()
        with open(log, "a") as f:
            code = subprocess.call([sys.executable, "-m", "iclm_jax.main", *p.train_args(workdir), "--quiet",
                                    *extra], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        took = time.time() - t0
        if code != 0:
            failed.append(p)
            last = _last_line(log)
            say(f"{head}: FAILED (exit {code}) after {took:.0f}s: {last} (log: {log})")
        else:
            say(f"{head}: done in {took:.0f}s")
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
