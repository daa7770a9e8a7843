"""Transformer: logit parity with transformers' LlamaForCausalLM and the segment-mask semantics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

import iclm_jax  # noqa: F401  (eager sharding off before any construction)
from iclm_jax.model.canon import canon_mix
from iclm_jax.model.transformer import Transformer, TransformerConfig, attention_mask

VOCAB, D, LAYERS, HEADS, HEAD_DIM, MLP = 64, 32, 2, 4, 16, 48


def load_hf_llama(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    """Copy a transformers Llama state dict into ``model`` (torch Linear weight is [out, in])."""

    def arr(name: str, transpose: bool = False) -> jnp.ndarray:
        t = state[name].detach().to(torch.float32).numpy()
        return jnp.asarray(t.T if transpose else t)

    model.embedding[...] = arr("model.embed_tokens.weight")
    model.norm.weight[...] = arr("model.norm.weight")
    if model.lm_head is not None:
        model.lm_head[...] = arr("lm_head.weight", transpose=True)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        layer.attn_norm.weight[...] = arr(p + "input_layernorm.weight")
        layer.mlp_norm.weight[...] = arr(p + "post_attention_layernorm.weight")
        for ours, theirs in [("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                             ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
                             ("down", "mlp.down_proj")]:
            getattr(layer, ours).kernel[...] = arr(p + theirs + ".weight", transpose=True)


def small_cfg(**kw) -> TransformerConfig:
    base = dict(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=2,
                head_dim=HEAD_DIM, mlp_dim=MLP)
    return TransformerConfig(**{**base, **kw})


@nnx.jit
def hidden(model, inputs, positions, segments):
    """Jitted forward: one compile per shape is far cheaper than op-by-op eager on a cold cache."""
    return model(inputs, positions, segments)


@nnx.jit
def logits(model, inputs, positions, segments):
    return model.logits(model(inputs, positions, segments))


def run(model, inputs, positions, segments):
    return np.asarray(hidden(model, jnp.asarray(inputs), jnp.asarray(positions), jnp.asarray(segments)))


@pytest.mark.parametrize(
    "tie,kv_heads,theta",
    [(False, 2, 10000.0), (True, 2, 500000.0), (True, HEADS, 10000.0), (False, HEADS, 500000.0)],
)
def test_logits_match_transformers_llama(tie, kv_heads, theta):
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=kv_heads, head_dim=HEAD_DIM,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": theta}, attn_implementation="eager",
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF inits norms to ones; randomise so the norm weights are checked too
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie

    model = Transformer(small_cfg(n_kv_heads=kv_heads, rope_theta=theta, tie_embeddings=tie,
                                  norm_eps=1e-5), None, rngs=nnx.Rngs(0))
    load_hf_llama(model, hf.state_dict())

    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, size=(2, 11))
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
    pos = np.broadcast_to(np.arange(11), ids.shape)
    got = np.asarray(logits(model, jnp.asarray(ids), jnp.asarray(pos), jnp.ones(ids.shape, jnp.int32)))
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.fixture(scope="module", params=[0, 3], ids=["llama", "canon3"])
def model(request) -> Transformer:
    """The Llama decoder, and the same with a width-3 canon layer: the mask semantics hold for both."""
    m = Transformer(small_cfg(canon=request.param), None, rngs=nnx.Rngs(3))
    for layer in m.layers:  # larger weights than the 0.02 init so positions really interact
        for name in ("q", "k", "v", "o"):
            lin = getattr(layer, name)
            lin.kernel[...] = lin.kernel[...] * 20.0
    return m


def assert_same(got, want, rel: float = 1e-6) -> None:
    """Equal up to float32 rounding: max |got - want| <= rel * max |want|.

    Different sequence lengths change float32 reduction order, and the residual stream here reaches
    |h| ~ 30 while single entries can cancel to ~0.1, so a per-entry rtol is meaningless; a few
    ulps of the stream's scale is the honest bound (with float64 matmuls the difference is 0).
    A masking error gives a relative difference of order 1.
    """
    err = np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(want).max()
    assert err <= rel, f"relative max difference {err:.3g} > {rel:g}"


def test_causal_future_token_does_not_change_past(model):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, size=(1, 10))
    pos, seg = np.arange(10)[None], np.ones((1, 10), np.int32)
    changed = ids.copy()
    changed[0, 6] = (ids[0, 6] + 1) % VOCAB
    a, b = run(model, ids, pos, seg), run(model, changed, pos, seg)
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3


def test_right_padding_leaves_real_tokens_unchanged(model):
    rng = np.random.default_rng(1)
    ids = rng.integers(1, VOCAB, size=(1, 7))
    alone = run(model, ids, np.arange(7)[None], np.ones((1, 7), np.int32))
    padded_ids = np.concatenate([ids, np.zeros((1, 5), ids.dtype)], axis=1)
    padded_seg = np.array([[1] * 7 + [0] * 5])
    padded_pos = np.array([list(range(7)) + [0] * 5])
    padded = run(model, padded_ids, padded_pos, padded_seg)
    assert np.isfinite(padded).all()
    assert_same(padded[:, :7], alone)
    other_pad = padded_ids.copy()
    other_pad[0, 7:] = np.arange(1, 6)  # same shape: pad content must not leak at all
    np.testing.assert_allclose(run(model, other_pad, padded_pos, padded_seg)[:, :7], padded[:, :7],
                               atol=1e-6, rtol=0)


def test_packed_queries_match_each_query_alone(model):
    rng = np.random.default_rng(2)
    prefix, q1, q2 = (rng.integers(1, VOCAB, size=n) for n in (5, 3, 4))
    ids = np.concatenate([prefix, q1, q2, [0, 0]])[None]
    seg = np.array([[1] * 5 + [2] * 3 + [3] * 4 + [0] * 2])
    pos = np.array([list(range(5)) + list(range(5, 8)) + list(range(5, 9)) + [0, 0]])
    packed = run(model, ids, pos, seg)
    for q, start in ((q1, 5), (q2, 8)):
        row = np.concatenate([prefix, q])[None]
        alone = run(model, row, np.arange(row.shape[1])[None], np.ones(row.shape, np.int32))
        assert_same(packed[:, :5], alone[:, :5])
        assert_same(packed[:, start:start + len(q)], alone[:, 5:])
    other = ids.copy()
    other[0, 5:8] = (other[0, 5:8] + 1) % VOCAB  # change query 1: query 2 and the prefix must not see it
    changed = run(model, other, pos, seg)
    np.testing.assert_allclose(changed[:, 8:12], packed[:, 8:12], atol=1e-6, rtol=0)
    np.testing.assert_allclose(changed[:, :5], packed[:, :5], atol=1e-6, rtol=0)
    assert np.abs(changed[:, 5:8] - packed[:, 5:8]).max() > 1e-3


def test_canon_mix_is_a_causal_convolution_over_each_query_and_its_prefix():
    """NumPy reference: token t of an unpacked row gets sum_i w[i] * x[t - i] (zero before the row);
    in a packed row every query token gets what its unpacked row gives it, and padding gets nothing."""
    rng = np.random.default_rng(7)
    k, d = 3, 5
    w = rng.normal(size=(k, d)).astype(np.float32)

    def reference(x):   # x [L, d], one unpacked row
        return x + sum(w[i] * np.concatenate([np.zeros((i, d), np.float32), x[:len(x) - i]]) for i in range(k))

    prefix, q1, q2 = (rng.normal(size=(n, d)).astype(np.float32) for n in (4, 1, 3))
    x = np.concatenate([prefix, q1, q2, np.full((2, d), 9.0, np.float32)])[None]
    seg = np.array([[1] * 4 + [2] + [3] * 3 + [0] * 2])
    pos = np.array([[0, 1, 2, 3, 4, 4, 5, 6, 0, 0]])
    got = np.asarray(canon_mix(jnp.asarray(x), jnp.asarray(w), jnp.asarray(pos), jnp.asarray(seg)))[0]
    np.testing.assert_allclose(got[:4], reference(prefix), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[4:5], reference(np.concatenate([prefix, q1]))[4:], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[5:8], reference(np.concatenate([prefix, q2]))[4:], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[8:], x[0, 8:] * (1 + w[0]), rtol=1e-6)   # padding: no other token


def test_canon_layer_is_a_parameter_only_when_asked():
    plain = Transformer(small_cfg(), None, rngs=nnx.Rngs(0))
    canon = Transformer(small_cfg(canon=4), None, rngs=nnx.Rngs(0))
    assert plain.canon is None and "canon" not in nnx.to_pure_dict(nnx.state(plain, nnx.Param))
    assert canon.canon[...].shape == (4, D) and canon.canon.get_metadata("out_sharding") == (None, "embed")
    assert np.abs(np.asarray(canon.canon[...])).max() <= 0.5   # U(+-1/sqrt(K))


def test_param_logical_names():
    m = Transformer(small_cfg(), None, rngs=nnx.Rngs(0))
    names = lambda v: v.get_metadata("out_sharding")  # noqa: E731
    layer = m.layers[0]
    assert names(m.embedding) == ("vocab", "embed") and names(m.lm_head) == ("embed", "vocab")
    assert names(layer.q.kernel) == ("embed", "heads") and names(layer.o.kernel) == ("heads", "embed")
    assert names(layer.k.kernel) == ("embed", "kv") and names(layer.v.kernel) == ("embed", "kv")
    assert names(layer.gate.kernel) == ("embed", "mlp") and names(layer.down.kernel) == ("mlp", "embed")
    assert names(layer.attn_norm.weight) == ("embed",) and names(m.norm.weight) == ("embed",)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(m, nnx.Param)))


@pytest.mark.parametrize(
    "field,value",
    [("vocab_size", 0), ("d_model", -1), ("n_layers", 0), ("n_heads", 0), ("head_dim", 7),
     ("mlp_dim", 0), ("rope_theta", 0.0), ("norm_eps", 0.0), ("n_kv_heads", 3), ("canon", -1)],
)
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        small_cfg(**{field: value})


def test_attention_mask_matches_the_conventions_rule():
    seg = np.array([[1, 1, 2, 2, 3, 3, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 2, 2, 3, 0, 0]])
    got = np.asarray(attention_mask(jnp.asarray(seg)))
    want = np.zeros(got.shape, bool)
    for b, row in enumerate(seg):
        for q, sq in enumerate(row):
            for k, sk in enumerate(row):
                want[b, q, k] = k <= q and sk != 0 and sq != 0 and (sk == sq or sk == 1)
    np.testing.assert_array_equal(got, want)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    f32 = Transformer(small_cfg(), None, rngs=nnx.Rngs(5))
    bf16 = Transformer(small_cfg(dtype=jnp.bfloat16), None, rngs=nnx.Rngs(5))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    ids = jnp.asarray(np.random.default_rng(4).integers(1, VOCAB, size=(2, 6)))
    pos, seg = jnp.broadcast_to(jnp.arange(6), (2, 6)), jnp.ones((2, 6), jnp.int32)
    h16, h32 = hidden(bf16, ids, pos, seg), hidden(f32, ids, pos, seg)
    l16, l32 = logits(bf16, ids, pos, seg), logits(f32, ids, pos, seg)
    assert h16.dtype == jnp.float32 and l16.dtype == jnp.float32
    # bfloat16 has an 8-bit mantissa: agreement to ~1e-2 of scale (seen: 3e-3, 5e-3) shows the same
    # function is computed.
    assert_same(h16, h32, rel=1e-2)
    assert_same(l16, l32, rel=1e-2)
