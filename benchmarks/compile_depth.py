"""Section "compile_depth": compile seconds against depth.

First-step compile seconds of the ICLM train step (K = 2, frozen base, tiny width) against depth, the
blocks unrolled (default) and stacked on a ``layers`` axis and run as one ``lax.scan``
(``model.scan_layers=True``), with the size of the step's lowered program (StableHLO lines): a number
that does not depend on the machine's load. An unrolled stack compiles every block and updates every
layer's weights separately; a stacked one compiles one block and updates one array per kind of weight,
so its program, and its compile time, should stay flat in depth. The persistent compilation cache is off
while it measures (a cache hit would time a file read, not a compile)."""
from __future__ import annotations

import time

import jax

from benchmarks import harness as H


def run(quick: bool = False) -> H.Section:
    depths = (2,) if quick else (4, 8, 16, 32)
    cache_was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        rows = [_row(n) for n in depths]
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was)
    return H.Section("compile_depth", "Compile time against depth", __doc__.split("\n\n", 1)[1].strip() + "\n\n"
                     + H.table(["layers", "unrolled: lower + compile", "unrolled: HLO lines",
                                "stacked: lower + compile", "stacked: HLO lines"], rows),
                     "python -m benchmarks.run --only compile_depth" + (" --quick" if quick else ""))


def _row(n: int) -> list:
    """Depth, then (compile seconds, HLO lines) unrolled and stacked."""
    row = [n]
    for scan in (False, True):
        c = H.bench_config("tiny", "iclm")
        c.model.n_layers, c.model.scan_layers = n, scan
        b = H.step_bench(c, n_batches=1)
        t0 = time.perf_counter()
        lowered = b.run.train_step.lower(b.run.state, b.batches[0])
        lowered.compile()
        row += [f"{time.perf_counter() - t0:.1f} s", f"{lowered.as_text().count(chr(10)):,}"]
    return row
