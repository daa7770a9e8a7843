"""The benchmark suite: ``python -m benchmarks.run [--quick] [--only NAME[,NAME]] [--out BENCHMARKS.md]``.

Each section (a module of this package with ``run(quick) -> harness.Section``) measures side by side in
one process, interleaved; the file written holds the machine line, each section's text, tables and
exact command. ``--quick`` runs every section at its smallest size (seconds, to prove it works: ``make
test`` runs it once); the numbers worth quoting come from a full run.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

SECTIONS = ("routed", "vs_torch", "mfu", "matmul_rows", "padding", "attention", "generation", "compile_depth",
            "data_speed", "sweep_jobs")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smallest sizes: proves the suite runs")
    p.add_argument("--only", default="", help=f"comma list of sections: {', '.join(SECTIONS)}")
    p.add_argument("--out", default="BENCHMARKS.md", help="the markdown file to write")
    a = p.parse_args(argv)
    names = [s.strip() for s in a.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"error: --only: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    from benchmarks import harness as H
    head = H.machine()
    print(head, flush=True)
    parts = [f"# Benchmarks\n\nMachine: {head}.\n\nCommand: `python -m benchmarks.run"
             + (" --quick" if a.quick else "") + (f" --only {a.only}" if a.only else "") + "`\n"]
    for name in names:
        t0 = time.time()
        mod = importlib.import_module(f"benchmarks.{name}")
        s = mod.run(quick=a.quick)
        print(f"== {s.title} ({time.time() - t0:.0f} s)\n{s.text}\n", flush=True)
        parts.append(f"## {s.title}\n\n{s.text}\n\nCommand: `{s.command}` ({time.time() - t0:.0f} s)\n")
        with open(a.out, "w") as f:        # after every section: a long run interrupted keeps what it measured
            f.write("\n".join(parts))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
