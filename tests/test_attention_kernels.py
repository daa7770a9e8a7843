"""model.attention: jax.nn.dot_product_attention's XLA kernel against the materialised kernel (the reference).

Both compute the same masked softmax, so values and gradients agree to float32 rounding, including the
packed-segment mask (queries see their own segment and the shared prefix) and fully padded rows (a query
that sees no key gets the mean of the values under both)."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import iclm_jax  # noqa: F401  (eager sharding off before any construction)
from iclm_jax import config_check
from iclm_jax.model.lora import LoraConfig, LoRAParam
from iclm_jax.model.transformer import Transformer, TransformerConfig, attend, attention_mask

SEGMENTS = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 0, 0],     # packed: prefix, two queries, padding
                     [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],     # one sequence, right padding
                     [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])    # a fully padded (filler) row


def _qkv(b=3, lq=10, lk=10, h=4, hkv=2, d=8, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(ks[0], (b, lq, h, d), dtype), jax.random.normal(ks[1], (b, lk, hkv, d), dtype),
            jax.random.normal(ks[2], (b, lk, hkv, d), dtype))


def test_xla_kernel_matches_the_materialised_one_values_and_gradients():
    q, k, v = _qkv()
    mask = attention_mask(jnp.asarray(SEGMENTS))
    want = attend(q, k, v, mask)
    got = attend(q, k, v, mask, "xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The filler row sees nothing: both give the mean of its values per kv head.
    mean_v = np.repeat(np.asarray(v[2]).mean(0), 2, axis=0)        # [H, D]: query head h uses kv head h // 2
    np.testing.assert_allclose(np.asarray(got[2, 0]), mean_v, rtol=1e-5, atol=1e-6)

    w = jax.random.normal(jax.random.key(1), want.shape)
    real = jnp.asarray(SEGMENTS > 0)[:, :, None, None]

    def loss(kernel):
        return lambda q, k, v: jnp.sum(jnp.where(real, attend(q, k, v, mask, kernel) * w, 0.0))

    g_want = jax.grad(loss("materialised"), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _cfg(attention):
    return TransformerConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                             mlp_dim=48, attention=attention)


def _model(attention):
    return Transformer(_cfg(attention), LoraConfig(num_adapters=2, rank=4, alpha=8.0), rngs=nnx.Rngs(0))


def test_transformer_forward_lora_gradients_and_kv_cache_agree_across_kernels():
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.integers(0, 40, SEGMENTS.shape))
    positions = jnp.asarray(np.tile(np.arange(SEGMENTS.shape[1]), (3, 1)))
    segments = jnp.asarray(SEGMENTS)
    adapter = jnp.asarray([0, 1, -1])
    out = {}
    for kernel in ("materialised", "xla"):
        model = _model(kernel)
        graphdef, lora, rest = nnx.split(model, LoRAParam, ...)
        # LoRA B is zero at init: give it values so the adapters' gradients flow through attention.
        lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), lora)

        def loss(lora):
            m = nnx.merge(graphdef, lora, rest)
            h = m(inputs, positions, segments, adapter)
            return jnp.sum(jnp.where(segments[..., None] > 0, h, 0.0) ** 2), h

        (value, h), grads = jax.value_and_grad(loss, has_aux=True)(lora)
        m = nnx.merge(graphdef, lora, rest)
        cache = m.init_cache(2, 12)
        prompt = inputs[:2, :6]
        h_pre, cache = m.extend(prompt, cache, adapter[:2])
        h_next, _ = m.extend(inputs[:2, 6:7], cache, adapter[:2])
        out[kernel] = (value, h, grads, h_pre, h_next)
    (v0, h0, g0, p0, n0), (v1, h1, g1, p1, n1) = out["materialised"], out["xla"]
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    np.testing.assert_allclose(h1, h0, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))
    np.testing.assert_allclose(p1, p0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(n1, n0, rtol=1e-5, atol=1e-5)


def test_attention_is_validated_by_name():
    with pytest.raises(ValueError, match="model.attention"):
        _cfg("flash")
    spec = importlib.util.spec_from_file_location(
        "acre_cfg_attention", os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "acre.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.model.attention = "cudnn"       # needs an NVIDIA GPU and a 16-bit dtype
    with pytest.raises(config_check.ConfigError, match="model.attention"):
        config_check.validate(c, num_devices=1)
    c.model.attention = "xla"
    config_check.validate(c, num_devices=1)
