"""Section "matmul_rows": the model's weight matmuls on flattened rows, before and after in one process.

``iclm_jax/model/rows.py``: every weight matmul (the base kernel of each
``LoRALinear``, the LM head, the concat aggregator) takes ``x`` as ``[B*L, in]``, so its weight gradient is
one plain matmul; the contraction over ``[B, L]`` kept apart was the slower one on XLA:CPU. It matters
where those weights train: the from-scratch CPU recipes (``model.train_base=True``), the aggregator. The
same values either way (tests/test_rows.py). "before" is the same config traced with ``rows.matmul``
swapped for ``rows.unflattened`` (what the model computed until this landed).

Also measured, in one earlier run of this section on the same idle machine (2026-12-02): the passes
whose rows all use one adapter (the baseline's adapter, the ICLM's invariant pass) given one slot, plain
matmuls on its A and B instead of the per-row gather. Alone it was slower than before (tiny baseline,
frozen base: 58.8 -> 77.0 ms; large baseline, trained base: 2,533 -> 3,156 ms: unflattened weight
gradients); with flattened rows it was within noise of flattened rows alone at every shape (61.0 vs
57.3 ms; 2,019 vs 2,048 ms), so it was not kept.
"""
from __future__ import annotations

import contextlib

from benchmarks import harness as H


@contextlib.contextmanager
def unflattened():
    """While active, the model's matmuls contract ``x`` as it is (the form before ``rows.matmul``)."""
    from iclm_jax.model import rows
    matmul = rows.matmul
    rows.matmul = rows.unflattened
    try:
        yield
    finally:
        rows.matmul = matmul


def run(quick: bool = False) -> H.Section:
    cases = ([("tiny", "baseline", True)] if quick else
             [(s, v, tb) for s in ("tiny", "large") for tb in (True, False) for v in ("baseline", "iclm")])
    rows = []
    for shape, variant, train_base in cases:
        with unflattened():
            old = H.step_bench(H.bench_config(shape, variant, train_base=train_base))
            old()                             # traced and compiled with the old form in place
        new = H.step_bench(H.bench_config(shape, variant, train_base=train_base))
        ts = H.interleaved({"before": old, "after": new}, 3 if quick else (10 if shape == "tiny" else 5),
                           warmup=1)
        rows.append([shape, variant, "trained" if train_base else "frozen", H.fmt_time(ts["before"]),
                     H.fmt_time(ts["after"]), f"{H.med(ts['before']) / H.med(ts['after']):.2f}"])
    return H.Section("matmul_rows", "Weight matmuls on flattened rows",
                     __doc__.split("\n\n", 1)[1].strip() + "\n\n"
                     + H.table(["shape", "variant", "base", "before (unflattened)", "after (flattened rows)",
                                "faster by (x)"], rows),
                     "python -m benchmarks.run --only matmul_rows" + (" --quick" if quick else ""))
