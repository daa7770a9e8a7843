"""Section "routed": is routed compute flat in K?

The real train step (``Run.train_step``, frozen base, real ACRE batches) of the single-LoRA baseline, the
ICLM at K = 2, 4, 8 (one invariant + the ONE routed module per row), and the original design emulated:
every specific module run on every input (``router.mode=soft`` with ``mi.apply_to=all``: K + 1 adapter
passes per row, mixed by the router's weights). Targets (issue ``perf``): ICLM <= 2.1 x the baseline (two
adapter passes), K = 8 within 5% of K = 2.
"""
from __future__ import annotations

from benchmarks import harness as H

KS = (2, 4, 8)


def _variants(shape: str, ks) -> dict:
    out = {"baseline (1 LoRA)": H.bench_config(shape, "baseline")}
    for k in ks:
        out[f"ICLM K={k}"] = H.bench_config(shape, f"iclm,k{k}")
    for k in ks:
        c = H.bench_config(shape, f"iclm,k{k}")
        c.router.mode, c.mi.apply_to = "soft", "all"
        out[f"every module on every input, K={k}"] = c
    return out


def run(quick: bool = False) -> H.Section:
    shapes = ("tiny",) if quick else ("tiny", "large")
    ks = (2,) if quick else KS
    parts = []
    for shape in shapes:
        benches = {name: H.step_bench(c) for name, c in _variants(shape, ks).items()}
        times = H.interleaved(benches, 3 if quick else (10 if shape == "tiny" else 4), warmup=1 if quick else 2)
        base = H.med(times["baseline (1 LoRA)"])
        k2 = H.med(times[f"ICLM K={ks[0]}"])
        rows = []
        for name, ts in times.items():
            rel_k2 = f"{H.med(ts) / k2:.2f}" if name.startswith("ICLM") else "-"
            rows.append([name, H.fmt_time(ts), f"{H.med(ts) / base:.2f} x", rel_k2])
        b = next(iter(benches.values()))
        dims = H.SHAPES[shape]
        parts.append(f"**{shape}** (d={dims['d_model']} x {dims['n_layers']} layers, batch "
                     f"{b.batches[0]['inputs'].shape[0]} x {b.batches[0]['inputs'].shape[1]} tokens, "
                     f"{b.real_tokens} real):\n\n"
                     + H.table(["step", "median (min-max)", "vs baseline", "vs ICLM K=2"], rows))
    return H.Section("routed", "Routed compute: ICLM vs the single-LoRA baseline and K",
                     __doc__.split("\n\n", 1)[1].strip() + "\n\n" + "\n\n".join(parts),
                     "python -m benchmarks.run --only routed" + (" --quick" if quick else ""))
