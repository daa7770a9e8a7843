"""Honest answer metrics: EOS targets are not answer content (hand-made batch, NumPy reference)."""
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from iclm_jax import losses, report
from iclm_jax.model.mi import MIConfig

V = 7          # vocabulary of the hand-made batch
L = 10
# Answer targets per row (slot per position, -1 = not an answer target). The final target of each
# slot is its EOS. Row 1 has two answers back to back (a one-token query between them); row 2's EOS is
# the last position of the row.
SLOTS = np.array([[-1, -1, 0, 0, 0, -1, 1, 1, -1, -1],
                  [-1, -1, 0, 0, 1, 1, -1, -1, -1, -1],
                  [-1, -1, -1, -1, -1, -1, -1, 0, 0, 0]], np.int32)
QUERY_TYPE = np.array([[0, 2], [1, -1], [3, -1]], np.int32)      # row 1 slot 1: type unknown
# Which answer targets the model gets right (True) / wrong (False), position by position.
RIGHT = {  # (row, pos) -> argmax right?
    (0, 2): True, (0, 3): True, (0, 4): False,       # slot 0: content right, EOS wrong -> right
    (0, 6): False, (0, 7): True,                     # slot 1: content wrong, EOS right -> wrong
    (1, 2): True, (1, 3): True,                      # slot 0: all right -> right
    (1, 4): True, (1, 5): False,                     # slot 1: content right, EOS wrong -> right
    (2, 7): True, (2, 8): False, (2, 9): True,       # slot 0: one content token wrong -> wrong
}


def _batch_and_logits(seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(1, V, size=(3, L)).astype(np.int32)
    logits = rng.normal(size=(3, L, V)).astype(np.float32)
    for (i, t), right in RIGHT.items():
        want = targets[i, t] if right else (targets[i, t] % (V - 1)) + 1      # a different token
        logits[i, t, want] = logits[i, t].max() + 1.0 + rng.random()
    batch = {"targets": targets, "answer_slot": SLOTS, "loss_mask": (SLOTS >= 0).astype(np.float32),
             "query_type": QUERY_TYPE}
    return batch, logits


def _stats(batch, logits, chunk=3):
    """The library's per-position statistics of given logits: the "hidden state" is the logits
    themselves and the head the identity, read at every answer target (3 chunks of 3 + a padded one)."""
    read = jnp.asarray(batch["loss_mask"] > 0)
    return losses.read_stats(lambda x_inv, x: {"logits": x}, None, jnp.asarray(logits),
                             jnp.asarray(batch["targets"]), read, chunk)


def _reference(batch, logits):
    """NumPy: content = every answer target of a slot but its LAST position (found by index, not by
    the next-position rule the library uses); exact match per slot on content only."""
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ce = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    hit = logits.argmax(-1) == batch["targets"]
    content = np.zeros_like(hit)
    correct = np.zeros(QUERY_TYPE.shape, bool)
    present = np.zeros(QUERY_TYPE.shape, bool)
    for i in range(SLOTS.shape[0]):
        for j in range(QUERY_TYPE.shape[1]):
            idx = np.flatnonzero(SLOTS[i] == j)
            if idx.size:
                present[i, j] = True
                content[i, idx[:-1]] = True
                correct[i, j] = hit[i, idx[:-1]].all()
    mask = batch["loss_mask"] > 0
    per_type = {t: (int((correct & (QUERY_TYPE == t)).sum()), int((present & (QUERY_TYPE == t)).sum()))
                for t in range(4)}
    return {"content": content, "correct": correct, "present": present,
            "answer_ce": ce[content].mean(), "ce_all": ce[mask].mean(),
            "answer_acc": correct[present].mean(), "per_type": per_type,
            "ce_sum": ce[content].sum(), "tokens": int(content.sum()),
            "correct_with_eos": np.array([[hit[i, SLOTS[i] == j].all() if present[i, j] else False
                                           for j in range(2)] for i in range(3)])}


def test_content_mask_leaves_out_the_final_target_of_each_slot():
    batch, logits = _batch_and_logits()
    ref = _reference(batch, logits)
    np.testing.assert_array_equal(np.asarray(losses.content_mask(batch)), ref["content"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slot_correct_ignores_eos_predictions(seed):
    batch, logits = _batch_and_logits(seed)
    ref = _reference(batch, logits)
    hit = _stats(batch, logits).hit
    correct, present = losses.slot_correct(hit, batch, 2)
    np.testing.assert_array_equal(np.asarray(present), ref["present"])
    np.testing.assert_array_equal(np.asarray(correct), ref["correct"])
    # by construction: right answers with a wrong EOS count, wrong answers with a right EOS do not
    np.testing.assert_array_equal(np.asarray(correct), [[True, False], [True, True], [False, False]])
    old, _ = losses.slot_correct(hit, batch, 2, include_eos=True)
    np.testing.assert_array_equal(np.asarray(old), ref["correct_with_eos"])


@pytest.mark.parametrize("seed", [0, 3])
def test_total_loss_reports_answer_content_metrics_and_keeps_the_objective(seed):
    batch, logits = _batch_and_logits(seed)
    ref = _reference(batch, logits)
    out = SimpleNamespace(pooled_inv=None,
                          route=SimpleNamespace(vq_loss=jnp.zeros(()), perplexity=jnp.ones(())))
    cfg = losses.LossConfig(mi=MIConfig(estimator="none", weight=0.0), routing_weight=0.0)
    loss, m = losses.total_loss(out, _stats(batch, logits), batch, None, cfg)
    np.testing.assert_allclose(float(m["ce"]), ref["ce_all"], rtol=1e-5)     # objective: with EOS
    np.testing.assert_allclose(float(loss), ref["ce_all"], rtol=1e-5)
    np.testing.assert_allclose(float(m["answer_ce"]), ref["answer_ce"], rtol=1e-5)
    np.testing.assert_allclose(float(m["answer_acc"]), ref["answer_acc"])
    assert float(m["answer_acc"]) == pytest.approx(3 / 5)
    assert "answer_token_acc" not in m
    correct, present = np.asarray(m["n/answer_correct"]), np.asarray(m["n/answer_present"])
    assert (correct[0], present[0]) == (3, 5)                 # the type -1 slot counts only overall
    for t in range(4):
        assert (correct[1 + t], present[1 + t]) == ref["per_type"][t], t
    np.testing.assert_allclose(float(m["n/answer_ce_sum"]), ref["ce_sum"], rtol=1e-5)
    assert float(m["n/answer_tokens"]) == ref["tokens"] == 7


def test_answer_metrics_accumulate_over_steps_without_nan():
    a, b = _batch_and_logits(0), _batch_and_logits(4)
    refs = [_reference(*x) for x in (a, b)]
    counts = [losses.answer_counts(_stats(bt, lg), bt) for bt, lg in (a, b)]
    sums = {k: np.sum([np.asarray(c[k]) for c in counts], axis=0) for k in counts[0]}
    m = report.answer_metrics(sums)
    all_correct = np.concatenate([r["correct"][r["present"]] for r in refs])
    assert m["answer_acc"] == pytest.approx(all_correct.mean())
    assert m["answer_queries"] == 10
    assert m["answer_ce"] == pytest.approx((refs[0]["ce_sum"] + refs[1]["ce_sum"]) / 14, rel=1e-5)
    for t, name in enumerate(("direct", "indirect", "screen_off", "potential")):
        c = sum(r["per_type"][t][0] for r in refs)
        n = sum(r["per_type"][t][1] for r in refs)
        assert m[f"answer_queries/{name}"] == n
        assert m[f"answer_acc/{name}"] == pytest.approx(c / n)
    # a type never seen in the interval is left out, not NaN
    sums["n/answer_present"][3] = sums["n/answer_correct"][3] = 0
    m = report.answer_metrics(sums)
    assert "answer_acc/screen_off" not in m and m["answer_queries/screen_off"] == 0
    assert all(np.isfinite(v) for v in m.values())


def test_answer_prior_loss_is_the_label_entropy_per_domain():
    from iclm_jax.data.render import Example
    from iclm_jax.evaluate import answer_prior_loss

    class Tok:                         # one token per word
        vocab_size = 100

        ids = {"on": 1, "off": 2, "0": 3, "2": 4, "maybe": 5}

        def encode(self, s):
            return [self.ids[w] for w in s.split()]

    train = ([Example("p", "on", 1)] * 3 + [Example("p", "off", 1)] + [Example("p", "2", 0)] * 2
             + [Example("p", "0", 0)] * 2)
    ev = [Example("q", "on", 1), Example("q", "off", 1), Example("q", "0", 0), Example("q", "2", 0)]
    want = -(np.log(3 / 4) + np.log(1 / 4) + np.log(1 / 2) + np.log(1 / 2)) / 4
    assert answer_prior_loss(train, ev, Tok()) == pytest.approx(want)
    # an answer never seen in training gets 1/vocab
    assert answer_prior_loss(train, [Example("q", "maybe", 1)], Tok()) == pytest.approx(np.log(100))


def test_context_mask_on_a_packed_row():
    """The auxiliary LM loss reads exactly the prompt tokens whose next token is a prompt token of the
    same segment: inside the contexts and inside each query, never an answer, the prefix's last
    position (its next token opens a query) or padding. Reference: the row's own token lists."""
    from iclm_jax.data import acre_generate, pipeline, render, tokenizer
    tok = tokenizer.acre_word_tokenizer()
    problem = acre_generate.generate_problems("IID", "train", 1, seed=0)[0]
    ex = render.render_problem(problem, "symbolic", packed=True, form="compact")
    row = pipeline.tokenize_example(ex, tok, 96, 4)
    prefix = [tok.bos_id] + tok.encode(ex.prefix)
    want = np.zeros(96, bool)
    want[:len(prefix) - 1] = True                      # prefix token -> next prefix token
    at = len(prefix)
    for q, a in ex.queries:
        nq, na = len(tok.encode(q)), len(tok.encode(a))
        want[at:at + nq - 1] = True                    # query object -> next query object
        at += nq + na                                  # last query token -> answer: not context
    got = np.asarray(losses.context_mask({k: jnp.asarray(v)[None] for k, v in row.items()}))[0]
    assert np.array_equal(got, want)
    # and the targets it reads are the row's next tokens
    assert np.array_equal(row["targets"][:len(prefix) - 1], prefix[1:])
