"""Scale without changing the math: per-block remat gives the same loss and gradients as no remat, the
residual stream is pinned at every block boundary only while a step is traced under the activation
rules, and a step with those constraints on a data x fsdp mesh equals the unconstrained one-device step."""
import dataclasses
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iclm_jax import losses, sharding
from iclm_jax.checkpoint import to_storable
from iclm_jax.model import layer_stack
from iclm_jax.model.lora import LoraConfig, LoRAParam
from iclm_jax.model.transformer import REMAT_POLICIES, Transformer
from iclm_jax.train import build
from iclm_jax.train.step import make_steps
from tests.helpers import VOCAB, nonzero_lora_b, random_batch, tiny_base
from tests.test_step import tiny_config

MESH = {"data": 4, "fsdp": 2}


def _config(remat="none", dropout=0.0):
    config = tiny_config()
    config.model.remat = remat
    config.lora.dropout = dropout
    return config


def _loss_fn(config):
    """(train state, loss(model, batch)) of the ICLM train objective, MINE critic held fixed."""
    ts = build.train_state(config, VOCAB)
    nonzero_lora_b(ts.model)            # fresh B = 0 would zero every LoRA A gradient
    loss_cfg = build.loss_config(config)

    def loss(model, batch):
        return losses.model_loss(model, batch, ts.critic, loss_cfg, train=True)[0]
    return ts, loss


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _eager_loss_and_grads(config, compiled=False):
    """Op by op (no jit), so both sides run the very same XLA kernels: remat may then not change a bit.
    ``compiled``: the same pass as one jitted program instead.
    Returns loss, gradients and the model state after the pass (router EMA, dropout RNG counts)."""
    ts, loss = _loss_fn(config)
    batch = {k: jnp.asarray(v) for k, v in random_batch(b=4, seed=3).items()}
    value_and_grad = nnx.value_and_grad(loss)
    value, grads = (nnx.jit(value_and_grad) if compiled else value_and_grad)(ts.model, batch)
    return float(value), nnx.to_pure_dict(grads), to_storable(nnx.state(ts.model))


def _remat_eqns(config) -> list:
    """The checkpoint (remat) equations in the jaxpr of the training gradient."""
    ts, loss = _loss_fn(config)
    graphdef, state = nnx.split(ts.model)
    batch = {k: jnp.asarray(v) for k, v in random_batch(b=4).items()}
    jaxpr = jax.make_jaxpr(lambda s: nnx.grad(loss)(nnx.merge(graphdef, s), batch))(state)
    found = []

    def walk(j):
        for e in j.eqns:
            if e.primitive.name in ("remat2", "checkpoint"):   # jax.checkpoint's primitive
                found.append(e)
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                walk(sub)
    walk(jaxpr.jaxpr)
    return found


# keep_prob 0.5 makes dropout's x / keep_prob exact: with keep_prob 0.9 the eager reference itself
# rounds that division in two ways (1 ulp) depending on how JAX dispatches it, remat or not.
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_remat_gives_identical_loss_gradients_and_state(dropout):
    want_loss, want_grads, want_state = _eager_loss_and_grads(_config("none", dropout))
    want_grads, want_state = _flat(want_grads), _flat(want_state)
    for remat in ("block", "dots"):
        loss, grads, state = _eager_loss_and_grads(_config(remat, dropout))
        grads, state = _flat(grads), _flat(state)
        assert loss == want_loss, remat
        assert grads.keys() == want_grads.keys()
        assert any(np.any(g != 0) for k, g in grads.items() if "lora_a" in k)
        for k, g in want_grads.items():
            np.testing.assert_array_equal(grads[k], g, err_msg=f"{remat} gradient {k}")
        for k, v in want_state.items():     # same dropout draws and RNG counts, same router EMA update
            np.testing.assert_array_equal(state[k], v, err_msg=f"{remat} state {k}")


def _block_remats(eqns) -> list:
    """The blocks' remats: the loss's chunked read (losses.read_stats) adds one of its own, policy None."""
    return [e for e in eqns if e.params["policy"] is not None]


def test_remat_wraps_every_block_with_its_policy():
    n = tiny_config().model.n_layers
    # With remat off, the only checkpoint left is the loss's chunk body (save nothing, policy None).
    loss_only = _remat_eqns(_config("none"))
    assert len(loss_only) == 1 and loss_only[0].params["policy"] is None
    for remat in ("block", "dots"):
        eqns = _block_remats(_remat_eqns(_config(remat)))
        # The invariant pass and the routed pass each run every block once.
        assert len(eqns) == 2 * n, remat
        assert all(e.params["policy"] is REMAT_POLICIES[remat] for e in eqns), remat


def test_remat_is_validated_by_name():
    with pytest.raises(ValueError, match="TransformerConfig.remat"):
        dataclasses.replace(tiny_base(), remat="all")
    from iclm_jax.config_check import ConfigError, validate
    config = _config()
    config.model.remat = "blocks"
    with pytest.raises(ConfigError, match="model.remat='blocks'"):
        validate(config, num_devices=1)


def _scan_config(remat="none", dropout=0.0):
    config = _config(remat, dropout)
    config.model.scan_layers = True
    return config


@pytest.mark.parametrize("remat,dropout", [("none", 0.5), ("block", 0.5), ("dots", 0.0)])
def test_scanned_layers_give_the_same_loss_gradients_and_state(remat, dropout):
    """model.scan_layers runs the blocks as one lax.scan over their stacked states: the unrolled loop
    is the reference. A scan's body is always compiled, so the reference is the unrolled pass compiled
    too (nnx.jit): against the op-by-op pass both differ by XLA's fusion rounding (up to 2e-5 of an
    element on an AVX2 EPYC), against the compiled one the scanned values agree to a few ulps of the
    tensor's scale; dropout draws and RNG counts must agree exactly."""
    want_loss, want_grads, want_state = _eager_loss_and_grads(_config(remat, dropout), compiled=True)
    loss, grads, state = _eager_loss_and_grads(_scan_config(remat, dropout), compiled=True)
    # the scanned model stores its blocks stacked: compare in the unrolled layout
    grads, state = layer_stack.convert(grads, want_grads), layer_stack.convert(state, want_state)
    want_grads, want_state, grads, state = map(_flat, (want_grads, want_state, grads, state))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert grads.keys() == want_grads.keys()
    assert any(np.any(g != 0) for k, g in grads.items() if "lora_a" in k)
    for k, g in want_grads.items():
        np.testing.assert_allclose(grads[k], g, rtol=1e-6, atol=1e-6 * float(np.abs(g).max()),
                                   err_msg=f"gradient {k}")
    assert state.keys() == want_state.keys()
    for k, v in want_state.items():
        if np.issubdtype(v.dtype, np.floating):
            np.testing.assert_allclose(state[k], v, rtol=1e-6, atol=1e-6 * float(np.abs(v).max()),
                                       err_msg=f"state {k}")
        else:    # RNG keys and counts: the same draws, advanced the same way
            np.testing.assert_array_equal(state[k], v, err_msg=f"state {k}")


def test_scanned_layers_compile_one_block_with_its_remat_policy():
    n = tiny_config().model.n_layers
    eqns = _block_remats(_remat_eqns(_scan_config("block")))
    # One remat per pass (invariant and routed), each the body of a scan over the n stacked blocks.
    assert len(eqns) == 2, eqns
    assert all(e.params["policy"] is REMAT_POLICIES["block"] for e in eqns)
    ts, loss = _loss_fn(_scan_config("block"))
    graphdef, state = nnx.split(ts.model)
    batch = {k: jnp.asarray(v) for k, v in random_batch(b=4).items()}
    jaxpr = jax.make_jaxpr(lambda s: loss(nnx.merge(graphdef, s), batch))(state)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan" and e.params["length"] == n]
    assert len(scans) == 2, [e.primitive.name for e in jaxpr.jaxpr.eqns]


def _grad_temp_bytes(n_layers: int, remat: str) -> int:
    """XLA's temp buffer bytes of the compiled LoRA gradient of a scanned base alone."""
    cfg = tiny_base(n_layers=n_layers, remat=remat, scan_layers=True)
    model = Transformer(cfg, LoraConfig(num_adapters=2, rank=4, alpha=8.0), rngs=nnx.Rngs(0))
    graphdef, lora, rest = nnx.split(model, LoRAParam, ...)
    rows = random_batch(b=8, length=32)
    ids, seg = jnp.asarray(rows["inputs"]), jnp.asarray(rows["segments"])
    pos, adapter = jnp.asarray(rows["positions"]), jnp.zeros((8,), jnp.int32)

    def loss(lora):
        return jnp.sum(nnx.merge(graphdef, lora, rest)(ids, pos, seg, adapter) ** 2)
    return jax.jit(jax.grad(loss)).lower(lora).compile().memory_analysis().temp_size_in_bytes


def test_scanned_remat_saves_memory_per_layer_on_the_cpu():
    """What lets the 30-layer SmolLM2 step fit: with the blocks in a scan, remat really recomputes on
    XLA:CPU (unrolled, its CSE merges the recomputation into the forward pass and remat saves nothing).
    The extra temp memory per layer with remat is under a quarter of the extra without."""
    per_layer = {remat: (_grad_temp_bytes(6, remat) - _grad_temp_bytes(2, remat)) / 4
                 for remat in ("none", "block")}
    assert 0 < per_layer["block"] < per_layer["none"] / 4, per_layer


def test_scan_layers_is_validated_by_name():
    with pytest.raises(ValueError, match="TransformerConfig.scan_layers"):
        dataclasses.replace(tiny_base(), scan_layers=1)
    from iclm_jax.config_check import ConfigError, validate
    config = _config()
    with config.ignore_type():     # a config file could set any type; the flag parser would refuse it
        config.model.scan_layers = "yes"
    with pytest.raises(ConfigError, match="model.scan_layers='yes'"):
        validate(config, num_devices=1)


def _constraint_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "sharding_constraint" in line or "@Sharding" in line]


def test_block_boundaries_are_constrained_only_under_the_rules():
    config = _config()
    n, d = config.model.n_layers, config.model.d_model
    mesh = sharding.make_mesh(MESH)
    ts = nnx.eval_shape(lambda: build.train_state(config, VOCAB))
    shard = sharding.state_shardings(nnx.state(ts), mesh)
    _, state, step, _ = make_steps(ts, build.loss_config(config), num_domains=2, num_slots=1,
                                   state_sharding=shard, batch_sharding=sharding.batch_sharding(mesh))
    rows = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows) for k, v in random_batch(b=8).items()}
    lines = _constraint_lines(step.lower(sharding.abstract_state(state, mesh), batch).as_text())
    residual = [line for line in lines if f"tensor<8x12x{d}xf32>" in line]
    # Forward: embedding + every block output, for the invariant and the routed pass (the backward
    # pass adds the transposed constraints).
    assert len(residual) >= 2 * (n + 1), lines
    for line in residual:    # batch over data x fsdp, length and embed replicated
        assert re.search(r'\[\{"data", "fsdp"\}, \{\}, \{\}\]|devices=\[8,1,1\]', line), line
    assert any(f"tensor<8x12x{VOCAB}xf32>" in line for line in lines)     # the logits

    # The model alone: no constraint outside the context, one per boundary inside it.
    model = build.train_state(config, VOCAB).model
    graphdef, params = nnx.split(model)
    host = {k: jnp.asarray(v) for k, v in random_batch(b=8).items()}

    def constraints() -> int:
        # A fresh function per trace: jax caches traces by function, and the rules are not in its key.
        def forward(s):
            return nnx.merge(graphdef, s)(host, train=False).logits
        return str(jax.make_jaxpr(forward)(params)).count("sharding_constraint")
    assert constraints() == 0
    with sharding.activation_sharding(mesh, sharding.DEFAULT_RULES):
        assert constraints() >= 2 * (n + 1) + 1      # + the logits


def _train(config, mesh, steps=2):
    """Losses, grad norms and final state (parameters, Adam moments, router, critic); ``mesh=None``:
    one device, no shardings, no constraints."""
    ts = build.train_state(config, VOCAB)
    if mesh is None:
        _, state, step, _ = make_steps(ts, build.loss_config(config), num_domains=2, num_slots=1)
        put = lambda b: b   # noqa: E731
    else:
        shard = sharding.state_shardings(nnx.state(ts), mesh)
        _, state, step, _ = make_steps(ts, build.loss_config(config), num_domains=2, num_slots=1,
                                       state_sharding=shard, batch_sharding=sharding.batch_sharding(mesh))
        state = jax.device_put(state, shard)
        put = lambda b: sharding.put_batch(b, mesh)   # noqa: E731
    out = []
    for s in range(steps):
        state, metrics = step(state, put(random_batch(b=8, seed=s)))
        out.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return np.asarray(out), to_storable(state)


@pytest.mark.slow
@pytest.mark.parametrize("remat,scan", [("none", False), ("block", False), ("block", True)])
def test_constrained_mesh_step_equals_the_plain_one_device_step(remat, scan):
    def config(remat):
        # Adam's update g / (|g| + eps) has slope 1/eps at 0: at eps 1e-8 a float32 rounding difference in
        # a near-zero gradient (a sharded reduction sums in another order) becomes a change of up to 2 lr.
        # eps 1e-3 bounds that slope, so the parameters compare the gradients, not their rounding.
        c = _config(remat)
        c.train.adam_eps = 1e-3
        return c
    with jax.default_device(jax.devices()[0]):
        want, want_params = _train(config("none"), None)
    got_config = config(remat)
    got_config.model.scan_layers = scan
    got, params = _train(got_config, sharding.make_mesh(MESH))
    # a scanned model stores its blocks (and their Adam moments) stacked: compare in the unrolled layout
    params, want_params = _flat(layer_stack.convert(params, want_params)), _flat(want_params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert params.keys() == want_params.keys()
    for k, x in want_params.items():
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(params[k], x, rtol=1e-5, atol=1e-5 * float(np.abs(x).max()), err_msg=k)
        else:
            np.testing.assert_array_equal(params[k], x, err_msg=k)
