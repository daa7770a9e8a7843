"""Section "mfu": how close a train step gets to this machine's limit.

The dense float32 matmul peak (n x n x n) is timed interleaved with each step, so both see the
same load; each row's MFU uses the peak measured beside it. A step's *needed* FLOPs
are counted from the config, per adapter pass (the baseline makes one, the ICLM two: invariant + routed):
the frozen base's matmuls forward + input gradient (2 x 2 x MACs; no weight gradient), the adapters'
forward + input + weight gradients (3 x 2 x MACs), the attention's two matmuls forward + both input
gradients (3 x 2 x MACs, materialised over the row's length), and the tied LM head at answer positions.
MFU = needed FLOPs / step time / peak, counted on the real tokens (what the work is) and on all padded
tokens (what the step computes); their ratio is the padding waste. XLA's own count
(``compiled.cost_analysis()``) is shown beside ours.
"""
from __future__ import annotations

from benchmarks import harness as H

LORA_DIMS = {"q": ("d", "hq"), "k": ("d", "hkv"), "v": ("d", "hkv"), "o": ("hq", "d"),
             "gate": ("d", "f"), "up": ("d", "f"), "down": ("f", "d")}


def needed_flops(c, tokens: int, seq_len: int, passes: int, answers: int, vocab: int) -> float:
    """FLOPs a frozen-base step needs for ``tokens`` tokens of rows of ``seq_len`` (module docstring)."""
    m = c.model
    dims = {"d": m.d_model, "hq": m.n_heads * m.head_dim, "hkv": m.n_kv_heads * m.head_dim, "f": m.mlp_dim}
    base = sum(dims[i] * dims[o] for i, o in LORA_DIMS.values())
    lora = sum(c.lora.rank * (dims[LORA_DIMS[t][0]] + dims[LORA_DIMS[t][1]])
               for t in c.lora.targets.split(","))
    attn = 2 * seq_len * dims["hq"]
    per_token = m.n_layers * (2 * 2 * base + 3 * 2 * lora + 3 * 2 * attn)
    head = 2 * 2 * m.d_model * vocab * answers
    return passes * (tokens * per_token + head)


def run(quick: bool = False) -> H.Section:
    mm, mm_flops = H.matmul_fn(512 if quick else 1024)
    shapes = ("tiny",) if quick else ("tiny", "large")
    rows = []
    for shape in shapes:
        for name, variant, passes in (("baseline", "baseline", 1), ("ICLM K=2", "iclm", 2)):
            c = H.bench_config(shape, variant)
            b = H.step_bench(c)
            both = H.interleaved({"step": b, "mm": mm}, 3 if quick else (10 if shape == "tiny" else 4), warmup=2)
            ts, t, peak = both["step"], H.med(both["step"]), mm_flops / H.med(both["mm"])
            rows_, seq = b.batches[0]["inputs"].shape
            answers = int(sum(int((x["loss_mask"] > 0).sum()) for x in b.batches) / len(b.batches))
            vocab = b.run.data.tokenizer.vocab_size
            real = needed_flops(c, b.real_tokens, seq, passes, answers, vocab)
            padded = needed_flops(c, b.padded_tokens, seq, passes, answers, vocab)
            xla = (b.compiled().cost_analysis() or {}).get("flops", float("nan"))
            rows.append([shape, name, H.fmt_time(ts), f"{real / 1e9:.2f} / {padded / 1e9:.2f}",
                         f"{xla / 1e9:.2f}", f"{peak / 1e9:.0f}", f"{real / t / peak:.0%}", f"{padded / t / peak:.0%}",
                         f"{b.real_tokens / b.padded_tokens:.0%}"])
    text = (__doc__.split("\n\n", 1)[1].strip() + "\n\n"
            + H.table(["shape", "step", "time", "needed GFLOP real / padded", "XLA GFLOP", "peak GFLOP/s",
                       "MFU real", "MFU padded", "real tokens"], rows))
    return H.Section("mfu", "Machine limit: model FLOPs utilisation", text,
                     "python -m benchmarks.run --only mfu" + (" --quick" if quick else ""))
