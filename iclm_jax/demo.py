"""``make demo``: train the tiny CPU ICLM (K = 2) on generated ACRE in both compact renderings with the
``cpu`` recipe's data and loss, cut to ~5 minutes; evaluate on IID, Comp and Sys test sets, print the
tables and write plots. Same as
``python -m iclm_jax.main --config=experiments/configs/acre.py:cpu,short --workdir=runs/demo``.
"""
from __future__ import annotations

import sys

from absl import app

from iclm_jax import main as _main


def run() -> None:
    argv = sys.argv[:1] + [f"--config={_main._DEFAULT_CONFIG}:cpu,short", "--workdir=runs/demo"] + sys.argv[1:]
    app.run(_main.main, argv=argv)


if __name__ == "__main__":
    run()
