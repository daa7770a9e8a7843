"""Stacked per-row LoRA: NumPy merged-weight reference, exact base rows, zero grads, M-free cost."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import iclm_jax  # noqa: F401  (eager sharding off before any construction)
from iclm_jax.model.lora import LoraConfig, LoRALinear, LoRAParam
from iclm_jax.model.transformer import Transformer, TransformerConfig

IN, OUT, M, RANK = 6, 5, 4, 3
CFG = TransformerConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=24)


def make_linear(dropout: float = 0.0, seed: int = 0) -> LoRALinear:
    lora = LoraConfig(num_adapters=M, rank=RANK, alpha=6.0, dropout=dropout)
    lin = LoRALinear(IN, OUT, in_axis="embed", out_axis="mlp", lora=lora, dtype=jnp.float32,
                     rngs=nnx.Rngs(seed))
    lin.lora_b[...] = jax.random.normal(jax.random.key(seed + 1), lin.lora_b.shape)  # B=0 would hide bugs
    return lin


def randomize_b(model: Transformer, seed: int = 0) -> None:
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    for layer in model.layers:
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            lin = getattr(layer, name)
            if lin.lora_b is not None:
                lin.lora_b[...] = 0.5 * jax.random.normal(next(keys), lin.lora_b.shape)


def tokens(b: int, n: int, seed: int = 0):
    ids = np.random.default_rng(seed).integers(1, CFG.vocab_size, size=(b, n))
    return jnp.asarray(ids), jnp.broadcast_to(jnp.arange(n), (b, n)), jnp.ones((b, n), jnp.int32)


@nnx.jit
def forward(model, ids, pos, seg, adapter):
    return model(ids, pos, seg, adapter)


def test_init_shapes_names_and_fresh_b_zero():
    lin = LoRALinear(IN, OUT, in_axis="embed", out_axis="mlp", lora=LoraConfig(num_adapters=M, rank=RANK),
                     dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert lin.kernel.shape == (IN, OUT) and lin.kernel.get_metadata("out_sharding") == ("embed", "mlp")
    assert lin.lora_a.shape == (M, IN, RANK) and lin.lora_a.get_metadata("out_sharding") == ("module", "embed", "lora")
    assert lin.lora_b.shape == (M, RANK, OUT) and lin.lora_b.get_metadata("out_sharding") == ("module", "lora", "mlp")
    assert isinstance(lin.lora_a, LoRAParam) and isinstance(lin.lora_b, LoRAParam)
    assert not isinstance(lin.kernel, LoRAParam)
    a = np.asarray(lin.lora_a[...])
    assert np.all(np.abs(a) <= 1 / np.sqrt(IN)) and a.std() > 0.1 / np.sqrt(IN)  # PEFT kaiming-uniform
    assert not np.allclose(a[0], a[1])  # adapters are initialised independently
    assert np.all(np.asarray(lin.lora_b[...]) == 0)


def test_per_row_lora_matches_numpy_merged_weights():
    lin = make_linear()
    x = np.random.default_rng(0).normal(size=(5, 3, IN)).astype(np.float32)
    adapter = np.array([0, 3, -1, 3, 1], np.int32)
    got = np.asarray(lin(jnp.asarray(x), jnp.asarray(adapter)))
    w, a, b = (np.asarray(v[...], np.float64) for v in (lin.kernel, lin.lora_a, lin.lora_b))
    scale = 6.0 / RANK
    for row, m in enumerate(adapter):
        merged = w if m < 0 else w + scale * a[m] @ b[m]
        np.testing.assert_allclose(got[row], x[row] @ merged, atol=1e-5, rtol=1e-5)
    base = np.asarray(lin(jnp.asarray(x), None))
    np.testing.assert_array_equal(got[2], base[2])  # adapter -1: exactly the base output
    np.testing.assert_array_equal(np.asarray(lin(jnp.asarray(x), jnp.full((5,), -1, jnp.int32))), base)


def test_unused_adapters_get_exactly_zero_gradient():
    lin = make_linear()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3, IN)).astype(np.float32))
    adapter = jnp.array([1, -1, 3, 1], jnp.int32)  # adapter 0 unused although -1 rows clip to it

    def loss(module):
        return jnp.sum(jnp.sin(module(x, adapter)))

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam))(lin)
    for g in (np.asarray(grads["lora_a"][...]), np.asarray(grads["lora_b"][...])):
        assert np.all(g[[0, 2]] == 0)
        assert np.all(np.abs(g[[1, 3]]).reshape(2, -1).max(axis=1) > 1e-4)


def test_transformer_unused_adapter_grads_zero_and_minus_one_rows_exact():
    lora = LoraConfig(num_adapters=3, rank=2)
    model = Transformer(CFG, lora, rngs=nnx.Rngs(0))
    randomize_b(model)
    ids, pos, seg = tokens(2, 6)
    adapter = jnp.array([2, -1], jnp.int32)

    def loss(m):
        return jnp.sum(m.logits(m(ids, pos, seg, adapter)) ** 2)

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam)))(model)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == 2 * 7 * CFG.n_layers
    for g in leaves:
        g = np.asarray(g)
        assert np.all(g[:2] == 0) and np.abs(g[2]).max() > 0

    out, base = forward(model, ids, pos, seg, adapter), forward(model, ids, pos, seg, None)
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(base[1]))
    assert np.abs(np.asarray(out[0] - base[0])).max() > 1e-4


def test_fresh_lora_leaves_transformer_output_unchanged():
    model = Transformer(CFG, LoraConfig(num_adapters=3), rngs=nnx.Rngs(0))
    ids, pos, seg = tokens(3, 5)
    out = forward(model, ids, pos, seg, jnp.array([0, 2, -1], jnp.int32))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(forward(model, ids, pos, seg, None)))


def test_targets_select_projections():
    model = Transformer(CFG, LoraConfig(num_adapters=2, targets=("q", "v")), rngs=nnx.Rngs(0))
    layer = model.layers[0]
    assert layer.q.lora_a is not None and layer.v.lora_a is not None
    assert all(getattr(layer, n).lora_a is None for n in ("k", "o", "gate", "up", "down"))
    assert len(jax.tree.leaves(nnx.state(model, LoRAParam))) == 2 * 2 * CFG.n_layers


def test_dropout_only_when_not_deterministic():
    lin, plain = make_linear(dropout=0.5), make_linear(dropout=0.0)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, IN)).astype(np.float32))
    adapter = jnp.array([0, -1], jnp.int32)
    ref = plain(x, adapter)
    np.testing.assert_array_equal(np.asarray(lin(x, adapter)), np.asarray(ref))
    noisy = lin(x, adapter, deterministic=False)
    assert np.abs(np.asarray(noisy[0] - ref[0])).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(noisy[1]), np.asarray(ref[1]))  # base rows: no LoRA, no dropout
    assert np.abs(np.asarray(lin(x, adapter, deterministic=False) - noisy)).max() > 0  # stream advances


def _forward_flops(num_adapters: int) -> float:
    model = Transformer(CFG, LoraConfig(num_adapters=num_adapters), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def f(state, ids, pos, seg, adapter):
        m = nnx.merge(graphdef, state)
        return m.logits(m(ids, pos, seg, adapter))

    ids, pos, seg = tokens(4, 8)
    cost = jax.jit(f).lower(state, ids, pos, seg, jnp.array([0, 1, -1, 1], jnp.int32)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_forward_flops_do_not_grow_with_adapter_count():
    small, large = _forward_flops(2), _forward_flops(16)
    assert small > 0
    assert abs(large - small) <= 0.01 * small, (small, large)


@pytest.mark.parametrize(
    "field,kw",
    [("num_adapters", dict(num_adapters=0)), ("rank", dict(num_adapters=2, rank=0)),
     ("alpha", dict(num_adapters=2, alpha=0.0)), ("dropout", dict(num_adapters=2, dropout=1.0)),
     ("targets", dict(num_adapters=2, targets=("q", "attn")))],
)
def test_lora_config_validation_names_field(field, kw):
    with pytest.raises(ValueError, match=field):
        LoraConfig(**kw)
