"""Aggregators against closed forms: concat starts at the mean of base-head logits; mixes are exact."""
import jax
import numpy as np
import pytest
from flax import nnx

from iclm_jax.model.aggregator import Aggregator
from iclm_jax.model.transformer import Transformer
from tests.helpers import tiny_base


def _base_and_states(tied: bool):
    base = Transformer(tiny_base(tie_embeddings=tied), None, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    # a non-trivial final-norm weight so the initialisation is really tested
    base.norm.weight[...] = base.norm.weight[...] * rng.uniform(0.5, 1.5, 16).astype(np.float32)
    x_inv = rng.normal(size=(2, 5, 16)).astype(np.float32) * 3
    x_spec = rng.normal(size=(2, 5, 16)).astype(np.float32)
    return base, x_inv, x_spec


@pytest.mark.parametrize("tied", [True, False])
def test_concat_initial_output_is_mean_of_base_head_logits(tied):
    base, x_inv, x_spec = _base_and_states(tied)
    agg = Aggregator(base, "concat", rngs=nnx.Rngs(1))
    want = 0.5 * (np.asarray(base.logits(x_inv)) + np.asarray(base.logits(x_spec)))
    np.testing.assert_allclose(np.asarray(agg(base, x_inv, x_spec)), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_logits_mix(w):
    base, x_inv, x_spec = _base_and_states(False)
    agg = Aggregator(base, "logits", w, rngs=nnx.Rngs(1))
    want = w * np.asarray(base.logits(x_inv)) + (1 - w) * np.asarray(base.logits(x_spec))
    np.testing.assert_allclose(np.asarray(agg(base, x_inv, x_spec)), want, atol=1e-5)


@pytest.mark.parametrize("w", [0.0, 0.25, 1.0])
def test_probs_mix_is_a_normalised_mixture(w):
    base, x_inv, x_spec = _base_and_states(True)
    agg = Aggregator(base, "probs", w, rngs=nnx.Rngs(1))
    out = np.asarray(agg(base, x_inv, x_spec), np.float64)

    def softmax(z):
        z = np.asarray(z, np.float64)
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    want = w * softmax(base.logits(x_inv)) + (1 - w) * softmax(base.logits(x_spec))
    np.testing.assert_allclose(np.exp(out), want, atol=1e-6)
    np.testing.assert_allclose(np.exp(out).sum(-1), 1.0, atol=1e-5)


def test_bad_aggregator_names_the_field():
    base, _, _ = _base_and_states(True)
    with pytest.raises(ValueError, match="model.aggregator"):
        Aggregator(base, "sum", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="model.invariant_weight"):
        Aggregator(base, "logits", 1.5, rngs=nnx.Rngs(0))


def test_concat_head_is_trainable_and_changes_output():
    base, x_inv, x_spec = _base_and_states(False)
    agg = Aggregator(base, "concat", rngs=nnx.Rngs(1))

    def f(a):
        return (a(base, x_inv, x_spec) ** 2).mean()
    g = nnx.grad(f)(agg)
    assert float(jax.numpy.abs(g["kernel"][...]).sum()) > 0


@pytest.mark.parametrize("tied", [True, False])
def test_derive_from_a_replaced_base_equals_building_on_it(tied):
    """Replacing the base's weights after construction (a pretrained load) and re-deriving gives the head
    built on the new base, whose output is again the mean of the new base-head logits."""
    base, x_inv, x_spec = _base_and_states(tied)
    agg = Aggregator(base, "concat", rngs=nnx.Rngs(1))
    new, _, _ = _base_and_states(tied)
    rng = np.random.default_rng(5)
    new.norm.weight[...] = rng.uniform(1.5, 2.1, 16).astype(np.float32)
    head = new.embedding if tied else new.lm_head
    head[...] = rng.normal(size=head.shape).astype(np.float32)
    want = 0.5 * (np.asarray(new.logits(x_inv)) + np.asarray(new.logits(x_spec)))
    assert not np.allclose(np.asarray(agg(new, x_inv, x_spec)), want, atol=1e-3)   # stale head
    agg.derive_from(new)
    np.testing.assert_allclose(np.asarray(agg(new, x_inv, x_spec)), want, atol=1e-5, rtol=1e-5)
    fresh = Aggregator(new, "concat", rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(agg.kernel[...]), np.asarray(fresh.kernel[...]))
    np.testing.assert_array_equal(np.asarray(agg.scale[...]), np.asarray(fresh.scale[...]))
