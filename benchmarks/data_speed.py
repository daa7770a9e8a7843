"""Section "data_speed": can the input pipeline bound the tiny train step?

The CPU recipe's streamed training data (``experiments/configs/acre.py:cpu`` data group: compact form,
extra queries, both renderings, ``stream=True``; built by ``sources.build``), stage by stage, each on
fresh stream positions every round: the problem generator alone (``acre_generate.generate_problem``,
problems/s), rendering (``pipeline.acre_examples`` of a problem in one style: examples/s, one packed row
each), tokenising a rendered example into a batch-format row (``pipeline.tokenize_example``:
examples/s), then the whole grain pipeline (``pipeline.make_dataset(AcreStream, stream=True)`` at the
recipe's batch size: generation + rendering + tokenising + batching) with ``worker_count`` 0 and 2. A
pipeline's first batch (worker start-up) is reported apart; grain reads ahead (``to_iter_dataset``'s
default ReadOptions: 16 threads and 500 elements in each process), so short timed chunks mostly drain
what was read ahead while the consumer paused: a pipeline's rate is the sustained one, hundreds of
consecutive batches after the first over the time since it, one measurement (no min-max). Stage rows
report the median (min-max) over interleaved rounds. Against it: the batches/s the tiny ICLM train step
consumes (``harness.step_bench(bench_config("tiny", "iclm"))``, batch 8, the real jitted step). The data
path is pure Python and numpy on the host: in a run it competes with the step for the same cores unless
workers take it elsewhere.
"""
from __future__ import annotations

import os
import time

from benchmarks import harness as H


def _recipe_data():
    """The cpu recipe's data (``sources.build``), set-up only: no validation or test sets."""
    from iclm_jax.data import sources
    c = H.acre_config("cpu")
    c.data.val_problems, c.data.eval_splits, c.data.eval_files = 0, "", ""
    return c, sources.build(c.data, c.seed)


def _pipeline_rate(data, batch: int, workers: int, n: int, start: int):
    """(first-batch seconds, sustained batches/s over the ``n`` batches after the first) of the grain
    pipeline reading a fresh part of the stream (``start``: as if a run had reached it)."""
    from iclm_jax.data import pipeline
    from iclm_jax.data.stream import AcreStream
    s = data.train_examples
    stream = AcreStream(s.split, s.part, s.seed + 1 + start, s.styles, s.packed, **s.render_kwargs)
    ds = pipeline.make_dataset(stream, data.tokenizer, max_len=data.max_len, batch_size=batch,
                               num_slots=data.num_slots, seed=0, shuffle=False, repeat=False,
                               stream=True, worker_count=workers)
    it = iter(ds)
    t0 = time.perf_counter()
    next(it)
    t1 = time.perf_counter()
    for _ in range(n):
        next(it)
    sustained = n / (time.perf_counter() - t1)
    del it, ds
    return t1 - t0, sustained


def run(quick: bool = False) -> H.Section:
    from iclm_jax.data import acre_generate, pipeline

    config, data = _recipe_data()
    s = data.train_examples
    batch = config.train.batch_size
    styles = s.styles
    n_items = 20 if quick else 400       # problems (or examples) per round of a stage
    rounds = 2 if quick else 7
    counter = iter(range(10 ** 9))

    # Fresh problem indices every call (the stream's problems are pure functions of the index).
    def fresh(n):
        base = 10 ** 6 + next(counter) * n
        return range(base, base + n)

    pool = [acre_generate.generate_problem(s.split, s.part, i, s.seed) for i in fresh(n_items)]
    rendered = pipeline.acre_examples(pool, styles=styles, packed=s.packed, **s.render_kwargs)

    def gen():
        for i in fresh(n_items):
            acre_generate.generate_problem(s.split, s.part, i, s.seed)

    def rend():
        pipeline.acre_examples(pool, styles=styles, packed=s.packed, **s.render_kwargs)

    def tok():
        for e in rendered:
            pipeline.tokenize_example(e, data.tokenizer, data.max_len, data.num_slots)

    def stream_items():     # AcreStream[i]: generation + rendering, as the pipeline reads it
        base = next(counter) * 10 ** 5 * len(styles)
        for i in range(base, base + n_items * len(styles)):
            s[i]

    times = H.interleaved({"gen": gen, "render": rend, "tok": tok, "stream": stream_items}, rounds, warmup=1)
    n_ex = len(rendered)                  # examples per round of render / tokenise / stream

    def fmt_rate(ts, n):
        return f"{n / H.med(ts):,.0f} ({n / max(ts):,.0f}-{n / min(ts):,.0f})"

    # The tiny ICLM step: what the data must keep up with.
    step = H.step_bench(H.bench_config("tiny", "iclm"))
    step_ts = H.interleaved({"step": step}, 3 if quick else 10, warmup=2)["step"]
    step_batch = step.batches[0]["inputs"].shape[0]
    need = 1.0 / H.med(step_ts)           # batches/s the step consumes

    need_ex = need * step_batch           # examples/s the step consumes (a problem gives len(styles))
    rows = []
    for key, label, n, per_ex in (("gen", "generator alone (problems/s)", n_items, len(styles)),
                                  ("render", "rendering (examples/s)", n_ex, 1),
                                  ("tok", "tokenising (examples/s)", n_ex, 1),
                                  ("stream", "AcreStream[i]: generation + rendering (examples/s)", n_ex, 1)):
        rows.append([label, fmt_rate(times[key], n), "-", "-",
                     f"{n * per_ex / H.med(times[key]) / need_ex:,.0f} x"])
    n_batches = 200 if quick else 800
    piped_rate = {}
    for w in (0, 2):
        first, sustained = _pipeline_rate(data, batch, w, n_batches, start=10 ** 7 * (w + 1))
        piped_rate[w] = sustained
        rows.append([f"grain pipeline, worker_count={w} (examples/s; batches of {batch})",
                     f"{sustained * batch:,.0f} sustained", f"{sustained:,.1f}",
                     f"{first:.2f} s", f"{sustained / need:,.0f} x"])
    piped = [r for r in rows if r[0].startswith("grain")]
    worst = min(float(r[4].split()[0].replace(",", "")) for r in piped)   # sustained / need
    verdict = ("the data pipeline does not bound the tiny step: even its slowest setting here delivers "
               f"{worst:.1f} x the batches the step consumes" if worst > 1.5 else
               f"the data pipeline COULD bound the tiny step (slowest setting: {worst:.1f} x its need)")
    text = (__doc__.split("\n\n", 1)[1].strip()
            + f"\n\nRow length {data.max_len} tokens, {data.num_slots} answer slots per row, "
            f"{len(styles)} renderings ({', '.join(styles)}); {n_items} problems "
            f"({n_ex} examples) per round, {rounds} rounds after 1 warm-up; each pipeline: its first "
            f"batch, then {n_batches} batches timed.\n\n"
            + H.table(["stage", "rate: median (min-max)", "batches/s", "first batch",
                       "vs the step's need (examples)"], rows)
            + f"\n\nThe tiny ICLM train step (batch {step_batch}): {H.fmt_time(step_ts)} per step, i.e. "
            f"**{need:.1f} batches/s ({need_ex:.0f} examples/s) needed**. "
            f"Verdict: {verdict}."
            + (f" Two spawned workers deliver {piped_rate[2] / piped_rate[0]:.2f} x the in-process rate here: "
               f"with {os.cpu_count()} cores (and whatever else runs on them) they add process start-up and "
               "inter-process copies without adding free cores; grain's in-process read-ahead threads "
               "already overlap the data with the step." if piped_rate[2] < piped_rate[0] else ""))
    return H.Section("data_speed", "Data: generation, rendering, tokenising and the grain pipeline", text,
                     "python -m benchmarks.run --only data_speed" + (" --quick" if quick else ""))
