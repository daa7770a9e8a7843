"""Logits only where read: the training objective, its metrics and its gradients equal those of the full
[batch, length, vocab] logits (reference below, written from the full logits as the loss used to be)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iclm_jax import losses
from iclm_jax.model.mi import MIConfig
from tests.helpers import nonzero_lora_b, random_batch, tiny_iclm


def _log_softmax(z):
    z = z - jax.lax.stop_gradient(z.max(-1, keepdims=True))
    return z - jnp.log(jnp.exp(z).sum(-1, keepdims=True))


def _ce(logits, targets):
    return -jnp.take_along_axis(_log_softmax(logits), targets[..., None], axis=-1)[..., 0]


def _mean(x, mask):
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def reference_loss(model, batch, cfg):
    """The objective and metrics from the full logits of ``ICLM.__call__`` at every position."""
    out = model(batch, train=True)
    t = jnp.asarray(batch["targets"])
    mask = jnp.asarray(batch["loss_mask"])
    ce_all = _ce(out.logits, t)
    ce = _mean(ce_all, mask)
    aux = sum((_mean(_ce(lg, t), mask) for lg in out.aux_logits.values()), jnp.zeros(()))
    seg, prompt = jnp.asarray(batch["segments"]), jnp.asarray(batch["prompt_mask"])
    nxt = jnp.concatenate([seg[:, 1:], jnp.zeros_like(seg[:, :1])], axis=1)
    context = ((prompt > 0) & (mask == 0) & (seg > 0) & (nxt == seg)).astype(jnp.float32)
    ctx = _mean(ce_all, context)
    mi = losses.mutual_information(out, None, cfg)
    loss = (ce + cfg.routing_weight * out.route.vq_loss + cfg.mi.weight * jnp.maximum(mi, 0.0)
            + cfg.aux_weight * aux + cfg.context_weight * ctx)
    # content = every answer target but the last of its slot (random_batch: one slot of 2 targets)
    content = np.zeros(mask.shape, bool)
    for i in range(mask.shape[0]):
        content[i, np.flatnonzero(np.asarray(mask[i]))[:-1]] = True
    hit = jnp.argmax(out.logits, -1) == t
    correct = jnp.all(hit | ~jnp.asarray(content), axis=1) & jnp.any(jnp.asarray(content), axis=1)
    return loss, {"ce": ce, "aux": aux, "context_ce": ctx,
                  "n/answer_ce_sum": (ce_all * content).sum(), "answer_correct": correct.sum()}


def _new_loss(model, batch, cfg):
    loss, m, _, _ = losses.model_loss(model, batch, None, cfg, train=True)
    return loss, m


CASES = [("concat", 0.5), ("logits", 0.3), ("probs", 0.25)]


@pytest.mark.parametrize("chunk", [5, 64])     # 12 positions: 3 chunks (the last padded) or one
@pytest.mark.parametrize("aggregator,w", CASES)
def test_loss_metrics_and_gradients_equal_the_full_logits(aggregator, w, chunk):
    model = nonzero_lora_b(tiny_iclm(num_modules=2, aggregator=aggregator, invariant_weight=w,
                                     aux_heads=True, router={"mode": "oracle"}))
    if aggregator == "concat":   # move the head off its initialisation so it is really tested
        k = model.aggregator.kernel
        k[...] = k[...] + 0.05 * jax.random.normal(jax.random.key(3), k.shape)
    cfg = losses.LossConfig(mi=MIConfig(estimator="plugin", weight=0.1), aux_weight=0.7, context_weight=0.4,
                            logit_chunk=chunk)
    batch = random_batch(b=4, length=12, seed=1)
    grad = lambda f: nnx.value_and_grad(lambda m: f(m, batch, cfg), has_aux=True)  # noqa: E731
    (want, want_m), want_g = grad(reference_loss)(nnx.clone(model))
    (got, got_m), got_g = grad(_new_loss)(nnx.clone(model))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for k in ("ce", "aux", "context_ce", "n/answer_ce_sum"):
        np.testing.assert_allclose(float(got_m[k]), float(want_m[k]), rtol=1e-6, err_msg=k)
    assert float(got_m["aux"]) > 0 and float(got_m["context_ce"]) > 0
    assert float(got_m["n/answer_correct"][0]) == float(want_m["answer_correct"])
    want_g, got_g = nnx.to_pure_dict(want_g), nnx.to_pure_dict(got_g)
    for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(want_g), jax.tree.leaves(got_g)):
        g, h = np.asarray(g), np.asarray(h)
        scale = float(np.abs(g).max())
        np.testing.assert_allclose(h, g, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
    assert float(np.abs(np.asarray(got_g["aggregator"]["kernel"] if aggregator == "concat"
                                   else got_g["base"]["embedding"])).max()) > 0


def test_unread_positions_are_never_computed():
    """Heads called only on chunks holding a read position: the count of head calls that ran."""
    calls = []

    def head(x_inv, x):
        jax.debug.callback(lambda: calls.append(1))
        return {"logits": x}
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 20, 5)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 5, (2, 20)), jnp.int32)
    read = np.zeros((2, 20), bool)
    read[0, [3, 17]] = read[1, [0, 5, 6, 19]] = True     # at most 4 per row: one chunk of 4
    stats = losses.read_stats(head, None, logits, targets, jnp.asarray(read), 4)
    jax.block_until_ready(stats.ce)
    assert len(calls) == 1
    want = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(stats.ce), np.where(read, want, 0.0), rtol=1e-6, atol=1e-6)
    hit = np.asarray(logits).argmax(-1) == np.asarray(targets)
    np.testing.assert_array_equal(np.asarray(stats.hit), hit & read)
