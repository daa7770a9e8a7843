"""Section "padding": what ``data.length_bucket`` saves on the CPU recipe's real batches.

The ICLM K = 2 train step of ``acre.py:cpu`` (compact renderings with extra queries, both renderings, canon
layer; generated problems instead of the stream, so both arms see the same batches) on the same batches,
padded to ``data.max_len`` (the default) or each to the smallest multiple of 16 that holds its longest row
(``data.length_bucket=16``). One timed call is a pass over all the batches; the two arms are interleaved
after a warm-up pass (which compiles each distinct length once). The losses are the same either way
(``tests/test_length_bucket.py``); only the padded positions go.
"""
from __future__ import annotations

from benchmarks import harness as H

BUCKET = 16


def _config(bucket: int, quick: bool):
    c = H.acre_config("cpu")
    c.data.update(stream=False, train_problems=16 if quick else 512, val_problems=0, eval_problems=8,
                  eval_splits="IID", length_bucket=bucket)
    return c


def run(quick: bool = False) -> H.Section:
    n = 2 if quick else 16
    arms = {"padded to max_len": _config(0, quick), f"length_bucket={BUCKET}": _config(BUCKET, quick)}
    benches = {name: H.step_bench(c, n_batches=n) for name, c in arms.items()}

    def one_pass(b):
        def fn():
            for _ in range(len(b.batches)):
                b()
        return fn

    times = H.interleaved({name: one_pass(b) for name, b in benches.items()}, 2 if quick else 6, warmup=1)
    ref = H.med(times["padded to max_len"])
    rows = []
    for name, b in benches.items():
        lengths = sorted({int(x["inputs"].shape[1]) for x in b.batches})
        per_step = [t / len(b.batches) for t in times[name]]
        rows.append([name, H.fmt_time(per_step), f"{ref / H.med(times[name]):.2f} x",
                     f"{b.real_tokens / b.padded_tokens:.0%}", ", ".join(map(str, lengths))])
    c = arms["padded to max_len"]
    text = (__doc__.split("\n\n", 1)[1].strip() + "\n\n"
            + f"Shape: d={c.model.d_model} x {c.model.n_layers} layers, batch {c.train.batch_size}, {n} batches, "
            f"data.max_len {benches['padded to max_len'].run.data.max_len}.\n\n"
            + H.table(["batches", "step (mean over a pass)", "speed-up", "real tokens", "row lengths"], rows))
    return H.Section("padding", "Padding: length buckets", text,
                     "python -m benchmarks.run --only padding" + (" --quick" if quick else ""))
