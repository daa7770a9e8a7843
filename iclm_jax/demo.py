"""``make demo`` and ``make demo-iclm``: the CPU recipe, cut to a demo, trained and evaluated.

``make demo`` (~4 minutes): the single-module baseline on the symbolic compact rendering,
``python -m iclm_jax.main --config=experiments/configs/acre.py:cpu,baseline,symbolic,short --workdir=runs/demo``.
It learns the blicket rule (beats the majority and object-count predictors) within the budget.

``make demo-iclm`` (~14 minutes): the ICLM (K = 2 modules + invariant module, MINE penalty) on both
renderings, the ``cpu`` recipe stopped after 12 minutes of training,
``python -m iclm_jax.main --config=experiments/configs/acre.py:cpu --workdir=runs/demo_iclm
--config.train.time_limit_s=720``.

Both evaluate on generated IID, Comp and Sys test sets, print the tables and write plots. Any further
``--config.*`` flag is passed on. Each demo starts fresh: a run already in its ``--workdir`` (an earlier
demo) is deleted first, and the console says so.
"""
from __future__ import annotations

import os
import shutil
import sys

from iclm_jax import main as _main

DEMOS = {
    False: ["--config={config}:cpu,baseline,symbolic,short"],
    True: ["--config={config}:cpu", "--config.train.time_limit_s=720"],
}


def run() -> None:
    args = sys.argv[1:]
    iclm = "--iclm" in args
    args = [a for a in args if a != "--iclm"]
    demo = [a.format(config=_main._DEFAULT_CONFIG) for a in DEMOS[iclm]]
    workdir = next((a.split("=", 1)[1] for a in args if a.startswith("--workdir=")), None)
    if workdir and os.path.isfile(os.path.join(workdir, "config.json")):   # an earlier demo's run
        print(f"demo: starting fresh, deleting the earlier demo run in {workdir}", file=sys.stderr, flush=True)
        shutil.rmtree(workdir)
    # The training command line itself, so that --config.* overrides parse exactly as they do there.
    os.execv(sys.executable, [sys.executable, "-m", "iclm_jax.main", *demo, *args])


if __name__ == "__main__":
    run()
