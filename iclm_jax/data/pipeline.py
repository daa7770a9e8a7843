"""grain input pipeline: examples -> fixed-shape rows of the batch format (docs/conventions.md).

Row layout (L = ``max_len``; ``[bos]`` only if the tokenizer has one; every row is padded to L so
a run compiles once):

* unpacked ``Example``: tokens ``[bos] prompt answer eos``; ``inputs`` all but the final EOS,
  ``targets`` the next token; segment 1 on every real token. ``loss_mask``/``answer_slot`` (= 0) on
  targets that are answer tokens or the EOS; ``prompt_mask`` on the ``[bos] prompt`` inputs.
* ``PackedExample``: ``[bos] prefix`` is segment 1 (its last target is 0: the next token lies in
  another segment); query j's ``query answer eos`` is segment 2+j with positions continuing from
  ``len([bos] prefix)``, as in the unpacked row of that query: under the attention rule every query
  token sees the same inputs at the same positions in both rows. ``prompt_mask`` covers prefix and
  queries.

Sharding: the stream of GLOBAL batches is a function of (examples, seed, batch_size) alone, not of
the process count or ``worker_count``: examples are ordered over the whole set, then grouped into
global batches of example indices, and each process tokenizes only its contiguous block ``rows = [lo,
hi)`` of every batch (``sharding.process_rows``: the rows its devices hold), so a 2-process run sees
the same global batches as a 1-process run. With ``repeat=True`` every epoch is reshuffled and nothing
is dropped; a single pass (``repeat=False``) drops the last partial global batch unless
``pad_last_batch``, which completes it with empty rows (segments 0; domain, query_type, query_label
-1), so every process gets the same number of batches, as multi-host evaluation needs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import grain
import numpy as np

from iclm_jax.data.render import DOMAINS, Example, PackedExample, render_problem
from iclm_jax.data.tokenizer import Tokenizer

_INT_KEYS = ("inputs", "targets", "positions", "segments", "answer_slot")
#: The keys with a position axis (the others are per row or per query slot); ``length_bucket`` trims these.
POSITION_KEYS = _INT_KEYS + ("loss_mask", "prompt_mask")
STREAM_MIN_LEN = 2 ** 31     # longer sequences are streams: read in order, never indexed as an array


def _empty_row(max_len: int, num_slots: int, pad_id: int) -> dict[str, np.ndarray]:
    """A row without tokens (segments 0; domain/query_type/query_label -1): eval batch filler."""
    row = {k: np.zeros(max_len, np.int32) for k in _INT_KEYS}
    row["inputs"][:] = pad_id
    row["answer_slot"][:] = -1
    row["loss_mask"] = np.zeros(max_len, np.float32)
    row["prompt_mask"] = np.zeros(max_len, np.float32)
    row["domain"] = np.array(-1, np.int32)
    row["query_type"] = np.full(num_slots, -1, np.int32)
    row["query_label"] = np.full(num_slots, -1, np.int32)
    return row


def _name(ex, index: int | None) -> str:
    parts = [f"#{index}"] if index is not None else []
    if getattr(ex, "source", ""):
        parts.append(f"({ex.source})")
    return "example " + " ".join(parts) if parts else "example"


def _put(row: dict, at: int, tokens: list[int], n_prompt: int, segment: int, slot: int,
         position0: int, last_target: int | None) -> int:
    """Write one segment: inputs ``tokens[:-1]`` (or all, if ``last_target`` is given) from ``at``.

    Targets are the next token of the same segment; those past the first ``n_prompt`` tokens are
    answer targets of ``slot`` (slot < 0: none). Returns the next free index.
    """
    inputs = tokens if last_target is not None else tokens[:-1]
    targets = tokens[1:] + ([last_target] if last_target is not None else [])
    n, end = len(inputs), at + len(inputs)
    row["inputs"][at:end] = inputs
    row["targets"][at:end] = targets
    row["positions"][at:end] = np.arange(position0, position0 + n)
    row["segments"][at:end] = segment
    k = np.arange(n)
    answer = (k + 1 >= n_prompt) if slot >= 0 else np.zeros(n, bool)
    row["loss_mask"][at:end] = answer
    row["answer_slot"][at:end] = np.where(answer, slot, -1)
    row["prompt_mask"][at:end] = k < n_prompt
    return end


def tokenize_example(ex: Example | PackedExample, tok: Tokenizer, max_len: int, num_slots: int,
                     index: int | None = None) -> dict[str, np.ndarray]:
    """One row of the batch format (every key, no batch dimension).

    Raises ValueError naming the example (``index``, ``ex.source``) when it needs more than
    ``max_len`` positions, has more queries than ``num_slots``, or has an empty part.
    """
    name = _name(ex, index)
    bos = [] if tok.bos_id is None else [tok.bos_id]
    packed = isinstance(ex, PackedExample)
    if packed:
        if len(ex.queries) > num_slots:
            raise ValueError(f"{name} packs {len(ex.queries)} queries but num_slots={num_slots}")
        prefix = bos + tok.encode(ex.prefix)
        segs = [(tok.encode(q), tok.encode(a)) for q, a in ex.queries]
        types, labels = ex.query_types, ex.labels
    else:
        prefix, segs = [], [(bos + tok.encode(ex.prompt), tok.encode(ex.answer))]
        types, labels = (ex.query_type,), (ex.label,)
    need = len(prefix) + sum(len(q) + len(a) for q, a in segs)
    if need > max_len:
        raise ValueError(f"{name} needs {need} positions (prompt + answer tokens"
                         f"{' + BOS' if bos else ''}; inputs exclude the final EOS) "
                         f"> max_len={max_len}")
    empty = ["prefix"] if packed and not prefix else []
    empty += [f"{'query' if packed else 'prompt'} {j}" for j, (q, _) in enumerate(segs) if not q]
    empty += [f"answer {j}" for j, (_, a) in enumerate(segs) if not a]
    if empty:
        raise ValueError(f"{name}: empty {', '.join(empty)} after tokenization")
    row = _empty_row(max_len, num_slots, tok.pad_id)
    row["domain"][...] = ex.domain
    at = _put(row, 0, prefix, len(prefix), 1, -1, 0, last_target=0) if packed else 0
    for j, (q, a) in enumerate(segs):
        at = _put(row, at, q + a + [tok.eos_id], len(q), 2 + j if packed else 1, j, len(prefix),
                  last_target=None)
    row["query_type"][:len(types)] = types
    row["query_label"][:len(labels)] = labels
    return row


class _Rows:
    """Picklable grain transform: a global batch of example indices -> the batch-format dict of its
    rows ``[lo, hi)`` (index -1 -> empty row). Only those rows are tokenized."""

    def __init__(self, examples: Sequence, tok: Tokenizer, max_len: int, num_slots: int, lo: int,
                 hi: int, bucket: int = 0):
        self.examples, self.tok, self.max_len, self.num_slots = examples, tok, max_len, num_slots
        self.lo, self.hi, self.bucket = lo, hi, bucket

    def row(self, index: int) -> dict[str, np.ndarray]:
        if index < 0:
            return _empty_row(self.max_len, self.num_slots, self.tok.pad_id)
        return tokenize_example(self.examples[index], self.tok, self.max_len, self.num_slots, index)

    def __call__(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices)
        rows = [self.row(int(i)) for i in indices[self.lo:self.hi]]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        if not self.bucket:
            return batch
        # Every process must cut the global batch at the same length: the rows of the other processes'
        # blocks are measured too (tokenized, not kept).
        others = [self.row(int(i)) for i in np.concatenate([indices[:self.lo], indices[self.hi:]])]
        length = bucket_length(max([used_length(r) for r in rows + others]), self.bucket, self.max_len)
        return {k: v[:, :length] if k in POSITION_KEYS else v for k, v in batch.items()}


def used_length(row: dict[str, np.ndarray]) -> int:
    """Positions up to the last token of a row (its segments; 0 for an empty row)."""
    used = np.flatnonzero(row["segments"] > 0)
    return int(used[-1]) + 1 if used.size else 0


def bucket_length(longest: int, bucket: int, max_len: int) -> int:
    """The smallest multiple of ``bucket`` that holds ``longest`` positions (at least one bucket), at most
    ``max_len``: a batch padded to it instead of to ``max_len`` computes the same losses on fewer
    positions, and the step compiles once per distinct length."""
    return min(max_len, max(bucket, -(-longest // bucket) * bucket))


def make_dataset(examples: Sequence, tok: Tokenizer, *, max_len: int, batch_size: int,
                 num_slots: int, seed: int, shuffle: bool, repeat: bool,
                 rows: tuple[int, int] | None = None, worker_count: int = 0,
                 pad_last_batch: bool = False, stream: bool | None = None,
                 length_bucket: int = 0) -> grain.IterDataset:
    """Rows ``rows = (lo, hi)`` (default: all) of each global batch of ``batch_size`` examples (see
    the module docstring); a multi-host caller passes ``sharding.process_rows(mesh, batch_size, rules)``.

    Iterate it, or ``iter()`` it for a ``grain.DatasetIterator`` whose ``get_state()`` and
    ``set_state()`` checkpoint the position. ``worker_count > 0`` tokenizes in that many spawned
    worker processes (a script calling this needs the ``if __name__ == "__main__":`` guard).

    ``stream=True`` (the default for sequences longer than ``STREAM_MIN_LEN``, e.g. a
    ``stream.AcreStream``) reads ``examples`` once in order, ``batch_size`` consecutive examples per
    global batch, with no index array: the stream is already random and endless, so it needs
    ``shuffle=False, repeat=False`` (``seed`` is unused); rows, workers and state work as above.

    ``length_bucket > 0`` pads each batch to the smallest multiple of it that holds the batch's longest row
    (``bucket_length``; at most ``max_len``) instead of to ``max_len``: the position axis varies between
    batches, in steps of ``length_bucket``.
    """
    if batch_size < 1 or max_len < 1 or num_slots < 1:
        raise ValueError(f"batch_size, max_len, num_slots must be >= 1, got {batch_size}, "
                         f"{max_len}, {num_slots}")
    try:
        lo, hi = (0, batch_size) if rows is None else rows
    except (TypeError, ValueError):
        lo = hi = None
    if not (isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer))
            and 0 <= lo < hi <= batch_size):
        raise ValueError(f"rows={rows!r}: need integers 0 <= lo < hi <= batch_size={batch_size} "
                         "(this process's block of each global batch)")
    if length_bucket < 0:
        raise ValueError(f"length_bucket={length_bucket}: expected >= 0 (0 = pad every batch to max_len)")
    if repeat and pad_last_batch:
        raise ValueError("pad_last_batch is for a single pass; it cannot go with repeat=True")
    n = len(examples)
    if n == 0:
        raise ValueError("make_dataset: no examples")
    if stream is None:
        stream = n > STREAM_MIN_LEN
    if stream:
        if shuffle or repeat or pad_last_batch:
            raise ValueError("make_dataset(stream=True) reads the examples once, in order (a stream is "
                             "already random and endless): pass shuffle=False, repeat=False, "
                             "pad_last_batch=False")
        ds = grain.MapDataset.range(n)
    elif n > STREAM_MIN_LEN:
        raise ValueError(f"make_dataset: {n} examples is too many to index (more than "
                         f"{STREAM_MIN_LEN}); an endless source needs stream=True")
    elif repeat:
        indices = np.arange(n, dtype=np.int64)
        ds = grain.MapDataset.source(indices)
        ds = (ds.shuffle(seed=seed) if shuffle else ds).repeat()
    else:
        indices = np.arange(n, dtype=np.int64)
        if shuffle:
            indices = np.random.default_rng(seed).permutation(indices)
        if pad_last_batch:
            total = math.ceil(n / batch_size) * batch_size
            indices = np.concatenate([indices, np.full(total - n, -1, np.int64)])
        ds = grain.MapDataset.source(indices)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(_Rows(examples, tok, max_len, num_slots, int(lo), int(hi), int(length_bucket)))
    it = ds.to_iter_dataset()
    if worker_count > 0:
        from absl import flags  # grain's worker processes read absl flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it



def acre_examples(problems, styles: Sequence[str] = DOMAINS, packed: bool = True, form: str = "full",
                  extra_queries: bool = False) -> list:
    """Each problem in each style (domain-labelled), problem-major; ``source`` names each.
    ``form`` and ``extra_queries``: see ``render.render_problem``."""
    out = []
    for i, problem in enumerate(problems):
        for style in styles:
            r = render_problem(problem, style, packed, form, extra_queries)
            if packed:
                out.append(dataclasses.replace(r, source=f"problem {i} {style}"))
            else:
                out.extend(dataclasses.replace(e, source=f"problem {i} query {q} {style}")
                           for q, e in enumerate(r))
    return out
