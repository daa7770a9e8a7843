"""Training is mesh-independent: the same gradients and steps on 1 device and on 8-device meshes (data,
fsdp, tensor, module splits, two ICI x DCN slices), and each parameter is sharded as the rules say."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from iclm_jax import losses, sharding
from iclm_jax.checkpoint import to_storable
from iclm_jax.model.iclm import param_filter
from iclm_jax.train import build
from iclm_jax.train.step import make_steps
from tests.helpers import VOCAB, random_batch
from tests.test_step import tiny_config

MESHES = [{"data": 8}, {"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "tensor": 2}, {"data": 4, "module": 2},
          {"data": 1, "fsdp": 2, "tensor": 2, "slices": 2}]
STEPS = 3
LINEAR_EPS = 1.0   # above every gradient of these steps (model and MINE critic, measured <= 0.3)


def _ids(a):
    return "x".join(f"{k}{v}" for k, v in a.items())


def _config(adam_eps: float = 1e-8):
    config = tiny_config()
    # K = 3 specific + 1 invariant = 4 stacked adapters, so mesh module=2 really splits them.
    config.model.update(d_model=32, head_dim=8, n_heads=4, n_kv_heads=2, dtype="float32", num_modules=3)
    config.train.adam_eps = adam_eps
    return config


def _sharded_run(config, mesh):
    """Build the state in its shardings with a jitted init, as train.loop.Run does."""
    ts = nnx.eval_shape(lambda: build.train_state(config, VOCAB))
    shard = sharding.state_shardings(nnx.state(ts), mesh)
    _, _, step, _ = make_steps(ts, build.loss_config(config), num_domains=2, num_slots=1,
                               state_sharding=shard, batch_sharding=sharding.batch_sharding(mesh))
    state = jax.jit(lambda: nnx.state(build.train_state(config, VOCAB)), out_shardings=shard)()
    return state, step


def _train(mesh, adam_eps: float = 1e-8):
    """Losses, the state arrays before and after the steps (host copies), final state."""
    state, step = _sharded_run(_config(adam_eps), mesh)
    start = jax.tree.map(np.asarray, to_storable(state))
    losses = []
    for s in range(STEPS):
        state, metrics = step(state, sharding.put_batch(random_batch(b=8, seed=s), mesh))
        losses.append(float(metrics["loss"]))
    return losses, (start, jax.tree.map(np.asarray, to_storable(state))), state


def _grads(mesh):
    """Gradients of the training loss (model params) at the initial state, computed on ``mesh``."""
    config = _config()
    state, _ = _sharded_run(config, mesh)
    ts = nnx.eval_shape(lambda: build.train_state(config, VOCAB))
    graphdef = nnx.graphdef(ts)
    loss_cfg = build.loss_config(config)

    def grads(state, batch):
        with sharding.activation_sharding(mesh):
            t = nnx.merge(graphdef, state)
            def fn(model, critic):
                return losses.model_loss(model, batch, critic, loss_cfg, train=True)[0]
            g = nnx.grad(fn, argnums=nnx.DiffState(0, param_filter(t.train_base)))(t.model, t.critic)
            return nnx.to_pure_dict(g)
    return jax.tree.map(np.asarray, jax.jit(grads)(state, sharding.put_batch(random_batch(b=8), mesh)))


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_trees_close(got_tree, want_tree, rtol=1e-5):
    """Every array within ``rtol`` relative to its own largest entry (integers exactly)."""
    want, got = _flat(want_tree), _flat(got_tree)
    assert want.keys() == got.keys()
    for k, x in want.items():
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(got[k], x, rtol=rtol, atol=rtol * float(np.abs(x).max()), err_msg=k)
        else:
            np.testing.assert_array_equal(got[k], x, err_msg=k)


def _assert_changes_close(got, want, rtol=1e-5):
    """Each float array's change over the steps (end - start) within ``rtol`` of its own largest change,
    plus the float32 resolution of the stored values (one spacing per step: a parameter holds p + u
    rounded, and the rounding may go either way when u differs in its last bits); integers exactly."""
    (got_start, got_end), (want_start, want_end) = [tuple(map(_flat, pair)) for pair in (got, want)]
    assert want_end.keys() == got_end.keys()
    for k, end in want_end.items():
        if not np.issubdtype(end.dtype, np.floating):
            np.testing.assert_array_equal(got_end[k], end, err_msg=k)
            continue
        want_change, got_change = end - want_start[k], got_end[k] - got_start[k]
        tol = rtol * float(np.abs(want_change).max()) + STEPS * np.spacing(np.abs(end))
        bad = np.abs(got_change - want_change) > tol
        assert not bad.any(), (f"{k}: {int(bad.sum())}/{bad.size} changes differ, e.g. {got_change[bad][:3]} "
                               f"vs {want_change[bad][:3]} (largest change {np.abs(want_change).max():.3g})")


def _one_device():
    return sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def reference():
    return {"grads": _grads(_one_device()), "default": _train(_one_device()),   # default: adam_eps=1e-8
            "linear": _train(_one_device(), adam_eps=LINEAR_EPS)}


@pytest.mark.slow
@pytest.mark.parametrize("axes", MESHES, ids=_ids)
def test_gradients_match_one_device(reference, axes):
    _assert_trees_close(_grads(sharding.make_mesh(axes)), reference["grads"])


@pytest.mark.slow
@pytest.mark.parametrize("axes", MESHES, ids=_ids)
def test_steps_match_one_device(reference, axes):
    """Three AdamW steps (model, MINE critic, router EMA, RNG): same losses, and the same change of every
    parameter and optimiser-state array with ``adam_eps=LINEAR_EPS``; with the default eps, the same
    losses (checked on the richest mesh).

    Why the change check uses a large eps: Adam divides each element's update by its own gradient scale,
    ``g / (|g| + eps)``, so float32 reduction-order noise ``dg`` (any mesh, ~1e-7 absolute here) moves the
    parameter by ``lr * dg * eps / (|g| + eps)**2``. With eps=1e-8 that is ``lr * dg / |g|``: huge for an
    element whose gradient is a near-total cancellation (measured: a LoRA-B entry of 6e-8 summed from
    terms ~1e-3). With eps=1e-3, still below the MINE critic's gradients (0.01-0.3), an element with
    |g| << eps still moves by ``lr * dg / eps`` while the largest moves by only ~lr, so the noise is
    ~|g|max / eps = 100x larger relative to the change than to the gradient (measured: a critic bias off
    by 3e-5 of its change). With eps above every |g|, the update is ~``lr * g / eps``, linear in the
    gradient, and the noise relative to the change is the gradients' own (~1e-6): the check sees the
    sharded computation, not Adam's conditioning. Comparing changes rather than values keeps the check
    sharp for parameters initialised far from zero.
    """
    mesh = sharding.make_mesh(axes)
    if axes == {"data": 2, "fsdp": 2, "tensor": 2}:
        losses, _, _ = _train(mesh)
        np.testing.assert_allclose(losses, reference["default"][0], rtol=1e-5)
    ref_losses, ref_arrays, _ = reference["linear"]
    losses, arrays, state = _train(mesh, adam_eps=LINEAR_EPS)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    _assert_changes_close(arrays, ref_arrays)
    # The state really stayed sharded across the steps (donation + out_shardings).
    emb = nnx.to_pure_dict(state)["model"]["base"]["embedding"]
    assert emb.sharding.spec == sharding.logical_to_spec(("vocab", "embed"), emb.sharding.mesh, shape=emb.shape)


def _pure(state) -> dict:
    return nnx.to_pure_dict(state)


def test_named_parameters_are_sharded_as_the_rules_say():
    config = _config()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state, _ = _sharded_run(config, mesh)
    d = _pure(state)
    layer = d["model"]["base"]["layers"][0]
    # ("vocab", "embed"): the test vocabulary (37) does not divide by tensor=2, so vocab stays replicated
    assert d["model"]["base"]["embedding"].sharding.spec == P(None, "fsdp")
    assert layer["q"]["kernel"].sharding.spec == P("fsdp", "tensor")              # ("embed", "heads")
    assert layer["k"]["kernel"].sharding.spec == P("fsdp", "tensor")              # ("embed", "kv")
    assert layer["down"]["kernel"].sharding.spec == P("tensor", "fsdp")           # ("mlp", "embed")
    assert layer["q"]["lora_a"].sharding.spec == P(None, "fsdp", None)            # no module axis here
    mu = d["opt"]["opt_state"][1][0]["mu"]["base"]                                # Adam moments follow
    assert mu["embedding"].sharding.spec == P(None, "fsdp")
    assert mu["layers"][0]["q"]["kernel"].sharding.spec == P("fsdp", "tensor")
    # The q kernel really is split 2 x 2: each device holds a (32/2, 32/2) block.
    assert layer["q"]["kernel"].addressable_shards[0].data.shape == (16, 16)

    mesh = sharding.make_mesh({"data": 4, "module": 2})
    state, _ = _sharded_run(config, mesh)
    d = _pure(state)
    layer = d["model"]["base"]["layers"][0]
    assert layer["q"]["lora_a"].sharding.spec == P("module", None, None)          # ("module", "embed", "lora")
    assert layer["q"]["lora_b"].sharding.spec == P("module", None, None)
    assert d["opt"]["opt_state"][1][0]["nu"]["base"]["layers"][0]["q"]["lora_a"].sharding.spec \
        == P("module", None, None)
    assert d["model"]["base"]["embedding"].sharding.spec == P(None, None)     # no fsdp/tensor: replicated
    assert layer["q"]["lora_a"].addressable_shards[0].data.shape == (2, 32, 4)   # 2 of the 4 adapters
