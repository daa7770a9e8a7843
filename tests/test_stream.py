"""The streaming train source: index-seeded problems, the lazy AcreStream, make_dataset(stream=True),
sources.build with data.stream, and a killed streaming run resuming bit-identically."""
from __future__ import annotations

import itertools
import json
import pickle
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

from iclm_jax.data import acre, pipeline, sources
from iclm_jax.data.acre_generate import generate_problem, generate_problems
from iclm_jax.data.stream import STREAM_LENGTH, AcreStream
from iclm_jax.data.tokenizer import acre_word_tokenizer

STYLES = ("symbolic", "text")


@pytest.fixture(scope="module")
def tok():
    return acre_word_tokenizer()


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


# ---------------------------------------------------------------- generate_problem


def test_generate_problem_is_a_pure_function_of_its_arguments():
    first = [generate_problem("IID", "train", i, 0) for i in range(6)]
    again = [generate_problem("IID", "train", i, 0) for i in reversed(range(6))][::-1]
    assert json.dumps(first) == json.dumps(again)            # any order, any process: same problems
    assert len({json.dumps(p) for p in first}) == 6          # different index, different problem
    assert generate_problem("IID", "train", 3, 1) != first[3]
    assert generate_problem("Comp", "train", 3, 0) != first[3]
    assert generate_problem("IID", "val", 3, 0) != first[3]
    with pytest.raises(ValueError, match="unknown split"):
        generate_problem("OOD", "train", 0, 0)
    with pytest.raises(ValueError, match="index must be >= 0"):
        generate_problem("IID", "train", -1, 0)


@pytest.mark.parametrize("split,part", [("IID", "train"), ("Comp", "train"), ("Sys", "train"),
                                        ("Sys", "test"), ("CompHeldout", "test")])
def test_generate_problem_labels_follow_the_rule(split, part):
    problems = [generate_problem(split, part, i, 4) for i in range(150)]
    acre.validate_problems(problems)
    assert acre.check_problems(problems) == []


def _kind_share(problems) -> float:
    """Share of OnOnOff evidence trials (4 "on" contexts; OnOffOff has 3)."""
    return np.mean([sum(c["light_state"] == "on" for c in p[:6]) == 4 for p in problems])


def _type_shares(problems) -> dict[str, float]:
    c = Counter(q["type"] for p in problems for q in p[6:])
    return {t: c[t] / sum(c.values()) for t in acre.QUERY_TYPES}


@pytest.mark.parametrize("split", ["IID", "Sys"])
def test_stream_matches_the_generators_proportions(split):
    n = 2000
    stream = [generate_problem(split, "train", i, 0) for i in range(n)]
    listed = generate_problems(split, "train", n, 0)
    assert _kind_share(listed) == (0.0 if split == "Sys" else 0.5)
    assert abs(_kind_share(stream) - _kind_share(listed)) < 0.04
    got, want = _type_shares(stream), _type_shares(listed)
    for t in acre.QUERY_TYPES:
        assert abs(got[t] - want[t]) < 0.06, (t, got, want)


# ---------------------------------------------------------------- AcreStream


def test_acre_stream_renders_like_acre_examples():
    s = AcreStream("IID", "train", 2, STYLES, packed=True)
    assert len(s) == STREAM_LENGTH and s.per_problem == 2
    problems = [generate_problem("IID", "train", p, 2) for p in range(3)]
    want = pipeline.acre_examples(problems, styles=STYLES, packed=True)
    got = [s[i] for i in range(6)]
    strip = lambda e: e.__class__(**{**e.__dict__, "source": ""})   # noqa: E731
    assert [strip(e) for e in got] == [strip(e) for e in want]
    assert [e.domain for e in got] == [0, 1] * 3                   # both renderings are consecutive
    assert got[5].source == "IID/train stream seed 2 problem 2 text"
    assert s[:2] == got[:2] and s[-1] == s[len(s) - 1] and s.head(3, problems) == got
    assert s.problems(3) == problems

    u = AcreStream("Comp", "train", 0, ("text",), packed=False)
    assert u.per_problem == 4
    want = pipeline.acre_examples([generate_problem("Comp", "train", 1, 0)], styles=("text",), packed=False)
    assert [strip(u[4 + q]) for q in range(4)] == [strip(e) for e in want]


def test_acre_stream_is_picklable_and_refuses_endless_iteration():
    s = AcreStream("IID", "train", 0, STYLES, packed=True)
    s[7]                                                           # fills the cache
    t = pickle.loads(pickle.dumps(s))
    assert t._last is None and t[7] == s[7] and t[10**12] == s[10**12]
    with pytest.raises(TypeError, match="endless"):
        iter(s)
    with pytest.raises(IndexError):
        s[len(s)]
    with pytest.raises(ValueError, match="unknown split"):
        AcreStream("OOD", "train", 0, STYLES, packed=True)


def _kw(**over):
    kw = dict(max_len=400, batch_size=4, num_slots=4, seed=0, shuffle=False, repeat=False)
    return {**kw, **over}


def test_stream_dataset_is_deterministic_and_resumable(tok):
    s = AcreStream("IID", "train", 1, STYLES, packed=True)
    a = list(itertools.islice(iter(pipeline.make_dataset(s, tok, stream=True, **_kw())), 5))
    b = list(itertools.islice(iter(pipeline.make_dataset(s, tok, **_kw())), 5))   # detected: len > 2**31
    assert _same_batches(a, b)
    want = [pipeline.tokenize_example(s[i], tok, 400, 4) for i in range(8)]     # in order, no shuffle
    assert all(np.array_equal(a[1]["inputs"][j], want[4 + j]["inputs"]) for j in range(4))

    it = iter(pipeline.make_dataset(s, tok, **_kw()))
    for _ in range(3):
        next(it)
    saved = it.get_state()
    expect = [next(it) for _ in range(4)]
    fresh = iter(pipeline.make_dataset(AcreStream("IID", "train", 1, STYLES, packed=True), tok, **_kw()))
    fresh.set_state(saved)
    assert _same_batches([next(fresh) for _ in range(4)], expect)
    assert _same_batches(expect[:2], a[3:5])


def test_stream_dataset_process_blocks_make_the_global_batch(tok):
    s = AcreStream("Sys", "train", 0, STYLES, packed=True)
    full = list(itertools.islice(iter(pipeline.make_dataset(s, tok, **_kw())), 3))
    blocks = [list(itertools.islice(iter(pipeline.make_dataset(s, tok, rows=r, **_kw())), 3))
              for r in [(0, 1), (1, 3), (3, 4)]]
    for k, batch in enumerate(full):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([b[k][key] for b in blocks]), batch[key])


def test_stream_dataset_refuses_shuffle_repeat_and_unindexable_lists(tok):
    s = AcreStream("IID", "train", 0, STYLES, packed=True)
    for bad in (dict(shuffle=True), dict(repeat=True), dict(pad_last_batch=True)):
        with pytest.raises(ValueError, match="reads the examples once, in order"):
            pipeline.make_dataset(s, tok, **_kw(**bad))
    with pytest.raises(ValueError, match="needs stream=True"):
        pipeline.make_dataset(s, tok, stream=False, **_kw())
    finite = s.head(5)                      # a finite list can be streamed too: in order, once
    got = list(pipeline.make_dataset(finite, tok, stream=True, **_kw()))
    assert len(got) == 2
    np.testing.assert_array_equal(got[1]["inputs"][0], pipeline.tokenize_example(finite[4], tok, 400, 4)["inputs"])


@pytest.mark.slow
def test_stream_dataset_with_a_worker_process(tok):
    s = AcreStream("IID", "train", 3, STYLES, packed=True)
    ref = list(itertools.islice(iter(pipeline.make_dataset(s, tok, rows=(1, 3), **_kw())), 6))
    it = iter(pipeline.make_dataset(s, tok, rows=(1, 3), worker_count=1, **_kw()))
    try:
        got = [next(it) for _ in range(3)]
        state = it.get_state()
        got += [next(it) for _ in range(3)]
        assert _same_batches(got, ref)
        it.set_state(state)
        assert _same_batches([next(it) for _ in range(3)], ref[3:])
    finally:
        it.close()


# ---------------------------------------------------------------- sources.build, config


def _config(arg="baseline,symbolic", **data):
    from tests.test_step import acre_cfg
    c = acre_cfg.get_config(arg)
    c.data.update(data)
    return c


def test_build_with_stream(tok):
    c = _config(stream=True, train_problems=16, eval_problems=8, eval_splits="IID")
    d = sources.build(c.data, 5)
    assert isinstance(d.train_examples, AcreStream) and len(d.train_examples) == STREAM_LENGTH
    assert d.train_problems == [generate_problem("IID", "train", i, 5) for i in range(16)]
    assert d.train_sample == d.train_examples.head(16, d.train_problems)
    measured = d.train_examples.head(sources.STREAM_LEN_SAMPLE)
    longest = max(sources.row_length(e, tok) for e in measured + d.eval_sets[0].examples)
    assert d.max_len == -(-(longest + longest // 16) // 8) * 8 + 8
    assert d.max_len % 8 == 0 and d.max_len >= longest + 8
    c.data.max_len = 512
    assert sources.build(c.data, 5).max_len == 512
    c.data.stream = False                                         # today's behaviour is unchanged
    f = sources.build(c.data, 5)
    assert isinstance(f.train_examples, list) and f.train_sample is f.train_examples
    assert f.train_problems == generate_problems("IID", "train", 16, 5)


def test_config_refuses_stream_with_a_train_file(tmp_path):
    from iclm_jax import config_check
    path = tmp_path / "train.json"
    acre.save_problems(generate_problems("IID", "train", 2, 0), path)
    c = _config(stream=True, train_file=str(path))
    with pytest.raises(config_check.ConfigError, match=r"data.stream=True: expected False with data.train_file"):
        config_check.validate(c, num_devices=1)
    c.data.stream = False
    config_check.validate(c, num_devices=1)
    assert _config().data.stream is False


# ---------------------------------------------------------------- kill -9 and resume a streaming run

from tests.test_faults import REPO, _assert_same_state, _env, _final_state, _losses  # noqa: E402

STREAM_RUN = ["--config=experiments/configs/acre.py:baseline,symbolic", "--config.model.d_model=16",
              "--config.model.n_layers=1", "--config.model.n_heads=1", "--config.model.n_kv_heads=1",
              "--config.model.head_dim=16", "--config.model.mlp_dim=32", "--config.train.steps=6",
              "--config.train.batch_size=4", "--config.train.warmup_steps=1", "--config.train.log_every=1",
              "--config.data.eval_problems=8", "--config.data.eval_splits=IID",
              "--config.data.train_problems=16", "--config.data.stream=True", "--config.eval.batch_size=8",
              "--config.checkpoint.every=3", "--config.mesh.data=1", "--quiet"]


def _stream_cmd(workdir):
    return [sys.executable, "-m", "iclm_jax.main", f"--workdir={workdir}", *STREAM_RUN]


@pytest.mark.slow
def test_streaming_run_killed_and_resumed_equals_an_uninterrupted_one(tmp_path):
    ref = tmp_path / "ref"
    r = subprocess.run(_stream_cmd(ref), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(ref / "data.json"))["train_examples"] == STREAM_LENGTH

    work = tmp_path / "run"
    proc = subprocess.Popen(_stream_cmd(work), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (work / "checkpoints" / "3").is_dir():              # step 3 saved and finalized
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
        assert time.time() - t0 < 300, "run made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it was killed"
    r = subprocess.run(_stream_cmd(work), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from step 3" in r.stderr
    assert sorted(_losses(work)) == list(range(1, 7))
    assert _losses(work) == _losses(ref)
    _assert_same_state(_final_state(work), _final_state(ref))


def test_build_refuses_eval_rows_that_do_not_fit_the_training_slots(tmp_path):
    """A JSONL train file (one query per row) with generated packed eval splits (4 per row): refused
    when the data is built, naming the eval set, not after training at the final evaluation."""
    plain = tmp_path / "train.jsonl"
    plain.write_text('{"input": [{"role": "user", "content": "1 + 1 ="}], "ideal": "2", "domain": 0}\n')
    c = _config(train_file=str(plain), eval_splits="IID", eval_problems=2)
    c.data.max_unk = 1.0                                           # "1 + 1 =" is not ACRE's vocabulary
    with pytest.raises(ValueError, match=r"eval set 'IID' packs 4 queries per row but the training rows hold 1"):
        sources.build(c.data, 0)
    c.data.packed = False                                          # the fix the message names
    assert sources.build(c.data, 0).num_slots == 1
