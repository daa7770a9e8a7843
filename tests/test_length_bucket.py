"""``data.length_bucket``: training batches padded to a multiple of the bucket instead of ``max_len``.

The trimmed batch must be the full batch's first positions, with nothing but padding cut off, at the
length computed independently from the full batch; every process block of a global batch must be cut
at the same length; and the train step must give the same losses and the same updated state on the
trimmed batch as on the full one (the cut positions carry no token).
"""
import itertools

import jax
import numpy as np
import pytest

from iclm_jax.data import acre_generate
from iclm_jax.data.pipeline import POSITION_KEYS, acre_examples, bucket_length, make_dataset
from iclm_jax.data.tokenizer import acre_word_tokenizer
from iclm_jax.train import build
from iclm_jax.train.step import make_steps
from tests.test_step import pure, tiny_config

MAX_LEN, BATCH = 200, 8


@pytest.fixture(scope="module")
def data():
    tok = acre_word_tokenizer()
    problems = acre_generate.generate_problems("IID", "train", 24, seed=5)
    return acre_examples(problems, packed=True, form="compact", extra_queries=True), tok


def _batches(examples, tok, bucket, rows=None, k=6):
    ds = make_dataset(examples, tok, max_len=MAX_LEN, batch_size=BATCH, num_slots=12, seed=1, shuffle=True,
                      repeat=True, rows=rows, length_bucket=bucket)
    return list(itertools.islice(iter(ds), k))


def test_bucket_length_rounds_up_within_max_len():
    assert [bucket_length(n, 16, 200) for n in (0, 1, 16, 17, 190, 200)] == [16, 16, 16, 32, 192, 200]
    assert bucket_length(199, 32, 200) == 200


def test_trimmed_batches_are_the_full_ones_without_their_padding(data):
    examples, tok = data
    full, cut = _batches(examples, tok, 0), _batches(examples, tok, 16)
    lengths = []
    for f, c in zip(full, cut):
        last = [np.flatnonzero(s)[-1] + 1 for s in f["segments"] if s.any()]      # independent of the code
        length = min(MAX_LEN, -(-max(last) // 16) * 16)
        lengths.append(length)
        assert f["inputs"].shape[1] == MAX_LEN
        for k, v in f.items():
            if k in POSITION_KEYS:
                assert c[k].shape == (BATCH, length) and np.array_equal(c[k], v[:, :length]), k
                pad = {"inputs": tok.pad_id, "answer_slot": -1}.get(k, 0)      # an empty position's values
                assert (v[:, length:] == pad).all(), k
            else:
                assert np.array_equal(c[k], v), k
    assert len(set(lengths)) > 1 and max(lengths) < MAX_LEN         # the lengths vary and save positions
    # two processes' blocks of each global batch are cut at the global batch's length
    halves = [_batches(examples, tok, 16, rows=r) for r in ((0, 4), (4, 8))]
    for i, c in enumerate(cut):
        for k in c:
            assert np.array_equal(np.concatenate([h[i][k] for h in halves]), c[k]), (i, k)


def test_the_train_step_on_a_trimmed_batch_equals_the_full_batch(data):
    examples, tok = data
    config = tiny_config("cpu")
    config.model.canon = 4
    ts = build.train_state(config, tok.vocab_size)
    graphdef, state, train_step, _ = make_steps(ts, build.loss_config(config), num_domains=2, num_slots=12)
    full, cut = _batches(examples, tok, 0, k=2), _batches(examples, tok, 16, k=2)
    sa, sb = state, jax.tree.map(lambda x: x.copy(), state)       # the step donates its state
    for f, c in zip(full, cut):
        assert c["inputs"].shape[1] < MAX_LEN
        sa, ma = train_step(sa, f)
        sb, mb = train_step(sb, c)
        for k in ("loss", "ce", "context_ce", "mi", "vq", "tokens", "grad_norm"):
            np.testing.assert_allclose(np.asarray(mb[k]), np.asarray(ma[k]), rtol=2e-5, atol=1e-7, err_msg=k)
    pa, pb = pure(sa), pure(sb)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6), pa, pb)


def test_evaluation_on_trimmed_batches_equals_the_full_batches(tmp_path):
    """``Run.evaluate`` (and every per-module view and the independence numbers) with the eval batches
    padded to their bucket gives the numbers it gives on batches padded to ``max_len``: only padding goes."""
    from iclm_jax.train.run import load_run
    from tests.helpers import write_random_run
    config = tiny_config("cpu")
    config.model.canon = 4
    config.data.update(stream=False, train_problems=16, val_problems=12, eval_problems=0, eval_splits="")
    data, _ = write_random_run(tmp_path, config)
    run = load_run(str(tmp_path))
    examples = data.eval_sets[0].examples
    rows = make_dataset(examples, data.tokenizer, max_len=data.max_len, batch_size=run.config.eval.batch_size,
                        num_slots=data.num_slots, seed=0, shuffle=False, repeat=False, pad_last_batch=True,
                        length_bucket=16)
    assert max(b["inputs"].shape[1] for b in rows) < data.max_len          # the trimmed run really is shorter
    got = {}
    for bucket in (0, 16):
        run.config.data.length_bucket = bucket
        got[bucket] = run.evaluate(examples, views=True)

    def flat(tree, prefix=""):
        if isinstance(tree, dict):
            return {k2: v2 for k, v in tree.items() for k2, v2 in flat(v, f"{prefix}{k}/").items()}
        return {prefix: tree}
    full, cut = flat(got[0]), flat(got[16])
    assert full.keys() == cut.keys() and "views/specific 1 alone/all/" in full and "mi/" in full
    for k in full:
        if isinstance(full[k], str) or np.asarray(full[k]).dtype.kind in "USO":     # names: equal
            assert np.array_equal(np.asarray(cut[k]), np.asarray(full[k])), k
            continue
        np.testing.assert_allclose(np.asarray(cut[k], float), np.asarray(full[k], float), rtol=1e-5, atol=1e-6,
                                   err_msg=k)
