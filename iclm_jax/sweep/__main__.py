"""Sweeps from the command line (also installed as ``iclm-sweep``):

    python -m iclm_jax.sweep --config=experiments/configs/acre.py:cpu --workdir=runs/sweep \\
        [--launcher=local|slurm|tpu] [--dry-run] [--only=REGEX] [--set=FIELD=VALUE ...] [--jobs=N] [--sbatch=ARG ...]
    python -m iclm_jax.sweep intervene runs/sweep [--spec=all] [--sets=IID,Sys] [--only=REGEX] [--redo]
    python -m iclm_jax.sweep collect runs/sweep

The config file's ``get_sweep(arg)`` lists the points (see ``points``). ``local`` trains them here in
sequence, or ``--jobs`` at once on their own cores (rerun the same command to resume: finished points are
skipped); ``slurm`` writes
``<workdir>/sweep.sbatch`` and submits it with sbatch (``--dry-run``: writes and prints it only);
``tpu`` runs ``launch/tpu_pod.sh`` once per point (``--dry-run``: prints the commands). ``intervene``
evaluates every finished point with two or more modules under interventions on its modules
(``intervene.py``; resumable). ``collect`` writes results.md, results.csv and results.png (with the
intervention tables and interventions.png once ``intervene`` ran). Exit status: 0, 1 if a point failed, 2 refused input.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys

from iclm_jax import intervene as iv_lib
from iclm_jax.sweep import collect as collect_lib
from iclm_jax.sweep import intervene as sweep_iv
from iclm_jax.sweep import launchers, points

LAUNCHERS = ("local", "slurm", "tpu")


def _refuse(message: str) -> None:
    print(f"iclm-sweep: {message}", file=sys.stderr)
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, exit 2 (argparse prints usage first)
        _refuse(message)


def _parse(argv):
    if argv[:1] == ["collect"]:
        p = _Parser(prog="iclm-sweep collect")
        p.add_argument("workdir")
        p.add_argument("--out", default="", help="also copy results.md to this file (e.g. experiments/results/...)")
        return "collect", p.parse_args(argv[1:])
    if argv[:1] == ["intervene"]:
        p = _Parser(prog="iclm-sweep intervene")
        p.add_argument("workdir")
        p.add_argument("--spec", default="all", help="the interventions (iclm-eval --intervene's SPEC; default all)")
        p.add_argument("--sets", default="", help="comma-separated eval set names (default: every test set, "
                                                  "not the validation set)")
        p.add_argument("--only", default="", help="a regular expression: only the points whose name matches")
        p.add_argument("--redo", action="store_true", help="evaluate points that have a report again")
        return "intervene", p.parse_args(argv[1:])
    p = _Parser(prog="iclm-sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="file.py[:arg] defining get_sweep(arg) and get_config(arg)")
    p.add_argument("--workdir", required=True, help="the sweep's directory: one subdirectory per point")
    p.add_argument("--launcher", choices=LAUNCHERS, default="local")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="list the points and what would run; run nothing")
    p.add_argument("--only", default="", help="a regular expression: only the points whose name matches")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a config override for every point, after its own (repeatable), e.g. "
                        "--set=train.steps=100 for a quick pass over a grid")
    p.add_argument("--jobs", type=int, default=1,
                   help="local launcher: train this many points at once, each pinned to its share of the CPU cores")
    p.add_argument("--sbatch", action="append", default=[],
                   help="an #SBATCH line for each task, e.g. --sbatch=--nodes=1 (repeatable)")
    return "run", p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    what, a = _parse(argv)
    try:
        if what == "intervene":
            return _intervene(a)
        if what == "collect":
            out = collect_lib.collect(a.workdir)
            print(open(os.path.join(a.workdir, "results.md")).read(), end="")
            print(f"wrote {a.workdir}/results.md, results.csv" + (", results.png" if out["png"] else ""))
            if a.out:
                os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
                shutil.copyfile(os.path.join(a.workdir, "results.md"), a.out)
                print(f"copied to {a.out}")
            return 0
        pts = points.load(a.config, tuple(a.set))
        chosen = points.select(pts, a.only)
        if a.jobs != 1 and a.launcher != "local":
            raise points.SweepError(f"--jobs={a.jobs} is for --launcher=local (a {a.launcher} job runs its own points)")
        launchers.core_slices(a.jobs)
    except (points.SweepError, FileNotFoundError, ValueError) as e:
        _refuse(str(e))
    command = "python -m iclm_jax.sweep " + " ".join(shlex.quote(x) for x in argv)
    if not a.dry_run or a.launcher == "slurm":
        os.makedirs(a.workdir, exist_ok=True)
        with open(os.path.join(a.workdir, collect_lib.SWEEP_FILE), "w") as f:
            json.dump({"config": a.config, "command": command, "set": a.set,
                       "points": [{"name": p.name, "dirname": p.dirname, "group": p.group, "seed": p.seed,
                                   "values": p.values, "args": p.train_args(a.workdir)} for p in pts]},
                      f, indent=2, default=str)
    print(f"{len(chosen)} of {len(pts)} points, launcher {a.launcher}{' (dry run)' if a.dry_run else ''}")
    if a.launcher == "local":
        if a.dry_run:
            for p in chosen:
                state = "finished" if launchers.finished(a.workdir, p) else "to run"
                print(f"[{p.index + 1}/{len(pts)}] {p.name} ({state}): iclm-train "
                      + " ".join(shlex.quote(x) for x in p.train_args(a.workdir)))
            return 0
        failed = launchers.run_local(chosen, a.workdir, len(pts), jobs=a.jobs)
        print(f"{len(chosen) - len(failed)} of {len(chosen)} points done; collect with: "
              f"python -m iclm_jax.sweep collect {a.workdir}")
        return 1 if failed else 0
    if a.launcher == "slurm":
        script = os.path.join(a.workdir, "sweep.sbatch")
        with open(script, "w") as f:
            f.write(launchers.slurm_script(chosen, a.workdir, a.sbatch))
        if a.dry_run:
            print(open(script).read(), end="")
            print(f"wrote {script}; submit with: sbatch {script}")
            return 0
        return _call(["sbatch", script])
    cmds = launchers.tpu_commands(chosen, a.workdir)
    for c in cmds:
        print(shlex.join(c))
    if a.dry_run:
        return 0
    for c in cmds:
        if _call(c) != 0:
            return 1
    return 0


def _intervene(a) -> int:
    try:
        iv_lib.parse(a.spec)
    except ValueError as e:
        _refuse(f"--spec: {e}")
    sweep = collect_lib.read_sweep(a.workdir)
    sets = [s.strip() for s in a.sets.split(",") if s.strip()] or None
    failed = sweep_iv.run_all(a.workdir, sweep, spec=a.spec, sets=sets, only=a.only, redo=a.redo)
    print(("failed: " + "; ".join(failed) + "\n" if failed else "")
          + f"collect the tables with: python -m iclm_jax.sweep collect {a.workdir}")
    return 1 if failed else 0


def _call(cmd: list[str]) -> int:
    try:
        return subprocess.call(cmd)
    except FileNotFoundError:
        _refuse(f"{cmd[0]}: command not found (--dry-run writes and prints what would run)")


def cli() -> None:
    """Console script ``iclm-sweep``."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
