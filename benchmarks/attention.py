"""Section "attention": the attention kernel (``model.attention``).

The ICLM K=2 train step (frozen base, real batches) with the materialised kernel (``attend``'s einsums,
the default) against ``jax.nn.dot_product_attention``'s XLA kernel: the same values (tested), so the
faster one can be the default. The cuDNN fused kernel (``model.attention=cudnn``) needs an NVIDIA GPU and
a 16-bit dtype; on a CPU it is refused by name.
"""
from __future__ import annotations

from benchmarks import harness as H


def run(quick: bool = False) -> H.Section:
    shapes = ("tiny",) if quick else ("tiny", "large")
    rows = []
    for shape in shapes:
        benches = {}
        for kernel in ("materialised", "xla"):
            c = H.bench_config(shape, "iclm")
            c.model.attention = kernel
            benches[kernel] = H.step_bench(c)
        ts = H.interleaved(benches, 3 if quick else (10 if shape == "tiny" else 4), warmup=2)
        rows.append([shape, H.fmt_time(ts["materialised"]), H.fmt_time(ts["xla"]),
                     f"{H.med(ts['xla']) / H.med(ts['materialised']):.2f}"])
    return H.Section("attention", "Attention kernel", __doc__.split("\n\n", 1)[1].strip() + "\n\n"
                     + H.table(["shape", "materialised", "xla (dot_product_attention)", "xla / materialised"], rows),
                     "python -m benchmarks.run --only attention" + (" --quick" if quick else ""))
