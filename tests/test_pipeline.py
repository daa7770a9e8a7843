"""grain pipeline: the batch contract of docs/conventions.md, packing, determinism, sharding, workers, state."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from iclm_jax.data import acre_generate, render
from iclm_jax.data.pipeline import acre_examples, make_dataset, tokenize_example
from iclm_jax.data.render import Example
from iclm_jax.data.tokenizer import acre_word_tokenizer, build_word_tokenizer

CONTRACT = {  # key: (dtype, shape given B, L, Q)
    "inputs": (np.int32, "BL"), "targets": (np.int32, "BL"), "positions": (np.int32, "BL"),
    "segments": (np.int32, "BL"), "loss_mask": (np.float32, "BL"), "answer_slot": (np.int32, "BL"),
    "prompt_mask": (np.float32, "BL"), "domain": (np.int32, "B"), "query_type": (np.int32, "BQ"),
    "query_label": (np.int32, "BQ"),
}


@pytest.fixture(scope="module")
def tok():
    return acre_word_tokenizer()


@pytest.fixture(scope="module")
def problems():
    return acre_generate.generate_problems("IID", "train", 6, seed=11)


def _items(n: int) -> tuple[list[Example], object]:
    exs = [Example(f"item {i} is", f" {i % 7}", i % 2, i % 4, i % 3) for i in range(n)]
    return exs, build_word_tokenizer([e.prompt + e.answer for e in exs])


def _batches(ds, k=None) -> list[dict]:
    return list(itertools.islice(iter(ds), k))


def _rows(batches) -> list[dict]:
    return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["domain"]))]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in CONTRACT)


def _ident(row) -> int:
    """Which synthetic item a row holds (its second word is the item number)."""
    return int(row["inputs"][2]) if row["segments"][0] else -1


@pytest.mark.parametrize("packed", [False, True])
def test_batch_contract(tok, problems, packed):
    exs = acre_examples(problems, packed=packed)
    q = 4 if packed else 1
    b = _batches(make_dataset(exs, tok, max_len=512, batch_size=3, num_slots=q, seed=0, shuffle=True,
                              repeat=True), 2)[1]
    assert set(b) == set(CONTRACT)
    for key, (dtype, shape) in CONTRACT.items():
        assert b[key].dtype == dtype, key
        assert b[key].shape == tuple({"B": 3, "L": 512, "Q": q}[c] for c in shape), key
    seg = b["segments"]
    assert np.all(b["inputs"][seg == 0] == tok.pad_id) and np.all(b["targets"][seg == 0] == 0)
    assert np.all(b["loss_mask"][seg == 0] == 0) and np.all(b["prompt_mask"][seg == 0] == 0)
    assert np.array_equal(b["answer_slot"] >= 0, b["loss_mask"] > 0)
    assert np.all(b["answer_slot"] < q)
    assert set(np.unique(b["domain"])) <= {0, 1}
    assert np.all(b["query_type"] >= 0) and np.all(b["query_label"] >= 0)


def test_unpacked_row_matches_reference(tok, problems):
    ex = render.render_query(problems[0], 2, "text")
    row = tokenize_example(ex, tok, 320, 1)
    p, a = tok.encode(ex.prompt), tok.encode(ex.answer)
    tokens = [tok.bos_id] + p + a + [tok.eos_id]
    n = len(tokens) - 1
    assert np.array_equal(row["inputs"][:n], tokens[:-1]) and np.all(row["inputs"][n:] == tok.pad_id)
    assert np.array_equal(row["targets"][:n], tokens[1:]) and np.all(row["targets"][n:] == 0)
    assert np.array_equal(row["positions"][:n], np.arange(n))
    assert np.array_equal(row["segments"], np.r_[np.ones(n), np.zeros(320 - n)])
    answer = np.zeros(320, bool)
    answer[len(p):n] = True                    # targets a[0] .. a[-1], EOS (after BOS, prompt)
    assert np.array_equal(row["loss_mask"], answer) and np.array_equal(row["answer_slot"], np.where(answer, 0, -1))
    assert np.array_equal(row["prompt_mask"][:n], np.arange(n) < 1 + len(p))
    assert tok.decode(row["targets"][row["loss_mask"] > 0]) == ex.answer.strip()
    assert (row["domain"], row["query_type"][0], row["query_label"][0]) == (1, ex.query_type, ex.label)


def _visible(row, i: int) -> list[int]:
    """Indices token i attends to under the conventions' rule (written from the rule, not the code)."""
    s = row["segments"]
    return [k for k in range(i + 1) if s[k] and s[i] and (s[k] == s[i] or s[k] == 1)]


@pytest.mark.parametrize("style", render.DOMAINS)
def test_packed_row_consistent_with_unpacked(tok, problems, style):
    packed = tokenize_example(render.render_problem(problems[1], style, True), tok, 512, 4)
    for j in range(4):
        single = tokenize_example(render.render_query(problems[1], j, style), tok, 512, 1)
        sel = np.flatnonzero((packed["segments"] == 1) | (packed["segments"] == 2 + j))
        n = int(single["segments"].sum())
        assert len(sel) == n
        for key in ("inputs", "positions", "loss_mask", "prompt_mask"):
            assert np.array_equal(packed[key][sel], single[key][:n]), key
        lm = single["loss_mask"][:n] > 0
        assert np.array_equal(packed["targets"][sel][lm], single["targets"][:n][lm])
        assert np.all(packed["answer_slot"][sel][lm] == j)
        differ = np.flatnonzero(packed["targets"][sel] != single["targets"][:n])
        prefix_end = int((packed["segments"] == 1).sum()) - 1
        assert list(differ) == [prefix_end] and packed["targets"][prefix_end] == 0
        for i in sel[packed["segments"][sel] == 2 + j]:         # same context for every query token
            seen = _visible(packed, i)
            pos = packed["positions"][i]
            assert np.array_equal(packed["inputs"][seen], single["inputs"][:pos + 1])
            assert np.array_equal(packed["positions"][seen], np.arange(pos + 1))
        assert packed["query_type"][j] == single["query_type"][0]
        assert packed["query_label"][j] == single["query_label"][0]


def test_determinism_and_seed(tok, problems):
    exs = acre_examples(problems, packed=False)
    kw = dict(max_len=320, batch_size=4, num_slots=1, shuffle=True, repeat=True)
    a = _rows(_batches(make_dataset(exs, tok, seed=1, **kw), 24))
    b = _rows(_batches(make_dataset(exs, tok, seed=1, **kw), 24))
    c = _rows(_batches(make_dataset(exs, tok, seed=2, **kw), 24))
    assert _same(a, b) and not _same(a, c)
    # each epoch (48 rows) = every example once; the next epoch is reshuffled
    key = sorted(tokenize_example(e, tok, 320, 1)["inputs"].tobytes() for e in exs)
    assert len(exs) == 48
    for epoch in (a[:48], a[48:], c[:48]):
        assert sorted(r["inputs"].tobytes() for r in epoch) == key
    assert not _same(a[:48], a[48:])


def _blocks(batch_size: int, processes: int) -> list[tuple[int, int]]:
    """Contiguous equal row blocks in process order (what ``sharding.process_rows`` gives a data mesh)."""
    per = batch_size // processes
    return [(p * per, (p + 1) * per) for p in range(processes)]


@pytest.mark.parametrize("processes", [2, 4])
@pytest.mark.parametrize("shuffle,repeat", [(False, False), (True, False), (True, True)])
def test_process_blocks_make_the_global_batch(shuffle, repeat, processes):
    exs, tok = _items(23)
    kw = dict(max_len=8, batch_size=8, num_slots=1, seed=3, shuffle=shuffle, repeat=repeat)
    k = 7 if repeat else None                                    # 56 rows: crosses two epochs
    ref = _batches(make_dataset(exs, tok, **kw), k)              # one process: the global batches
    assert len(ref) == (7 if repeat else 2)                      # single pass: 23 // 8, remainder dropped
    ids = [_ident(r) for r in _rows(ref)]
    if not shuffle:
        assert [tok.decode([i]) for i in ids] == [str(i) for i in range(16)]
    if repeat:                                                   # each epoch: every example once
        assert sorted(int(tok.decode([i])) for i in ids[:23]) == list(range(23))
    parts = [_batches(make_dataset(exs, tok, rows=rows, **kw), k) for rows in _blocks(8, processes)]
    for p, (lo, hi) in enumerate(_blocks(8, processes)):
        assert len(parts[p]) == len(ref)
        assert all(b[key].shape[0] == hi - lo for b in parts[p] for key in CONTRACT)
    for i, b in enumerate(ref):
        for key, (dtype, _) in CONTRACT.items():
            got = np.concatenate([part[i][key] for part in parts])
            assert got.dtype == dtype and np.array_equal(got, b[key]), (i, key)


@pytest.mark.parametrize("processes", [2, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_padded_single_pass_over_processes(shuffle, processes):
    exs, tok = _items(23)
    kw = dict(max_len=8, batch_size=8, num_slots=1, seed=3, shuffle=shuffle, repeat=False, pad_last_batch=True)
    parts = [_batches(make_dataset(exs, tok, rows=rows, **kw)) for rows in _blocks(8, processes)]
    assert [len(b) for b in parts] == [3] * processes           # ceil(23 / 8) on every process
    got = [_ident(r) for i in range(3) for part in parts for r in _rows([part[i]])]   # global row order
    real = [int(tok.decode([i])) for i in got if i >= 0]
    assert sorted(real) == list(range(23)) and got.count(-1) == 1   # every example once, one filler row
    if not shuffle:
        assert real == list(range(23))


def test_pad_last_batch_empty_rows():
    exs, tok = _items(10)
    batches = _batches(make_dataset(exs, tok, max_len=8, batch_size=4, num_slots=2, seed=0, shuffle=False,
                                    repeat=False, pad_last_batch=True))
    assert len(batches) == 3
    last = batches[-1]
    assert np.all(last["segments"][2:] == 0) and np.all(last["inputs"][2:] == tok.pad_id)
    assert np.all(last["query_type"][2:] == -1) and np.all(last["query_label"][2:] == -1)
    assert np.all(last["domain"][2:] == -1) and np.all(last["answer_slot"][2:] == -1)
    assert np.all(last["loss_mask"][2:] == 0) and np.all(last["query_type"][:2, 1] == -1)
    assert len(_batches(make_dataset(exs, tok, max_len=8, batch_size=4, num_slots=1, seed=0, shuffle=False,
                                     repeat=False))) == 2        # without padding: remainder dropped


def test_multiworker_matches_single_worker(tok, problems):
    exs = acre_examples(problems, packed=True)
    kw = dict(max_len=512, batch_size=4, num_slots=4, seed=5, shuffle=True, repeat=True, rows=(1, 3))
    ref = _rows(_batches(make_dataset(exs, tok, worker_count=0, **kw), 9))
    it = iter(make_dataset(exs, tok, worker_count=2, **kw))     # one spawn only: workers are slow to start
    try:
        got = _rows([next(it) for _ in range(4)])
        state = it.get_state()
        got += _rows([next(it) for _ in range(5)])
        assert _same(got, ref)
        it.set_state(state)                                      # rewind the worker processes
        assert _same(_rows([next(it) for _ in range(5)]), ref[8:])
    finally:
        it.close()


def test_iterator_state_resumes_exactly(tok, problems):
    exs = acre_examples(problems, packed=False)
    ds = make_dataset(exs, tok, max_len=320, batch_size=5, num_slots=1, seed=9, shuffle=True, repeat=True)
    it = iter(ds)
    for _ in range(11):                                          # crosses an epoch boundary (48 rows)
        next(it)
    state = it.get_state()
    expect = _rows([next(it) for _ in range(4)])
    fresh = iter(ds)
    fresh.set_state(state)
    assert _same(_rows([next(fresh) for _ in range(4)]), expect)


def test_acre_examples(problems):
    packed = acre_examples(problems, packed=True)
    assert len(packed) == 12 and [e.domain for e in packed[:4]] == [0, 1, 0, 1]
    assert packed[3].source == "problem 1 text"
    single = acre_examples(problems, styles=("text",), packed=False)
    assert len(single) == 24 and {e.domain for e in single} == {1}
    assert single[5].source == "problem 1 query 1 text"
    assert dataclasses.replace(single[5], source="") == render.render_query(problems[1], 1, "text")


def test_errors(tok, problems):
    ex = acre_examples(problems, packed=True)[2]
    need = sum(len(tok.encode(s)) for s in [ex.prefix] + [x for q in ex.queries for x in q]) + 1
    with pytest.raises(ValueError, match=rf"^example #7 \(problem 1 symbolic\) needs {need} positions"):
        tokenize_example(ex, tok, need - 1, 4, index=7)
    assert tokenize_example(ex, tok, need, 4)["segments"][-1] == 5
    with pytest.raises(ValueError, match="needs .* > max_len=16"):
        _batches(make_dataset([ex], tok, max_len=16, batch_size=1, num_slots=4, seed=0, shuffle=False,
                              repeat=False))
    with pytest.raises(ValueError, match="num_slots=1"):
        tokenize_example(ex, tok, 512, 1)
    with pytest.raises(ValueError, match="no examples"):
        make_dataset([], tok, max_len=512, batch_size=1, num_slots=4, seed=0, shuffle=False, repeat=False)
    for rows in [(0, 9), (4, 4), (5, 3), (-1, 2), (0.5, 2), (0,), "ab", 3]:
        with pytest.raises(ValueError, match=r"rows=.*0 <= lo < hi <= batch_size=8"):
            make_dataset([ex] * 2, tok, max_len=512, batch_size=8, num_slots=4, seed=0, shuffle=False,
                         repeat=False, rows=rows)
