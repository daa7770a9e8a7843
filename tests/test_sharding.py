"""Logical axis rules -> PartitionSpecs, meshes from config (incl. ICI x DCN slices), per-process batch rows,
activation constraints, and the per-device memory report (checked against the bytes jax really places)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from iclm_jax import sharding, sharding_report
from iclm_jax.train import build
from tests.helpers import VOCAB, one_device_env
from tests.test_step import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh(**axes):
    return sharding.make_mesh(axes)


def test_rules_map_logical_names_and_skip_absent_used_or_size_one_axes():
    mesh = _mesh(data=2, fsdp=2, tensor=2)
    assert sharding.logical_to_spec(("embed", "mlp"), mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", "length", "act_embed"), mesh) == P(("data", "fsdp"), None, None)
    assert sharding.logical_to_spec(("heads", "kv"), mesh) == P("tensor", None)       # tensor already used
    assert sharding.logical_to_spec(("module", "embed", "lora"), mesh) == P(None, "fsdp", None)  # no module axis
    assert sharding.logical_to_spec(("embed",), _mesh(data=8, fsdp=1)) == P(None)          # size-1 axis
    assert sharding.logical_to_spec(("unknown_name", None), mesh) == P(None, None)


def test_non_dividing_mesh_axis_is_left_replicated():
    mesh = _mesh(data=2, fsdp=2, tensor=2)
    assert sharding.logical_to_spec(("vocab", "embed"), mesh, shape=(37, 32)) == P(None, "fsdp")
    assert sharding.logical_to_spec(("vocab", "embed"), mesh, shape=(38, 31)) == P("tensor", None)
    # A multi-axis rule keeps the axes that divide: 6 rows over (data=2, fsdp=2) -> data only.
    assert sharding.logical_to_spec(("batch",), mesh, shape=(6,)) == P("data")
    # ... and jax accepts every spec state_shardings makes, whatever the sizes (vocab 37 here).
    config = tiny_config()
    ts = nnx.eval_shape(lambda: build.train_state(config, VOCAB))
    shard = sharding.state_shardings(nnx.state(ts), mesh)
    for s, v in zip(jax.tree.leaves(shard), jax.tree.leaves(nnx.state(ts))):
        s.shard_shape(v.shape)          # raises on an indivisible spec


def test_rules_from_config_override_and_refuse_unknown_axes():
    rules = dict(sharding.rules_from_config({"embed": "fsdp,tensor", "mlp": "", "length": "fsdp"}))
    assert rules["embed"] == ("fsdp", "tensor") and rules["mlp"] is None and rules["length"] == "fsdp"
    assert rules["vocab"] == "tensor"                       # untouched names keep their default
    with pytest.raises(ValueError, match=r"rules.embed='fsdp,model'.*\['model'\]"):
        sharding.rules_from_config({"embed": "fsdp,model"})
    mesh = _mesh(data=2, fsdp=4)
    spec = sharding.logical_to_spec(("embed", "mlp"), mesh, tuple(rules.items()))
    assert spec == P("fsdp", None)


def test_config_rules_cover_the_issue_names():
    from tests.test_step import acre_cfg
    c = acre_cfg.get_config()
    for name in ("vocab", "embed", "mlp", "heads", "kv", "layers", "module", "batch", "length"):
        assert name in c.rules, name
    assert dict(sharding.rules_from_config(c.rules)) == dict(sharding.DEFAULT_RULES)


def test_make_mesh_fill_and_errors():
    assert dict(_mesh(data=-1, fsdp=2).shape) == {"data": 4, "fsdp": 2}
    with pytest.raises(ValueError, match="needs 6 devices, have 8"):
        _mesh(data=3, fsdp=2)
    with pytest.raises(ValueError, match="unknown axis names"):
        _mesh(dp=8)


def test_slices_build_a_hybrid_mesh_with_data_across_slices():
    # 2 slices of 4 devices, each slice fsdp=2 x tensor=2: data (the DCN axis) = 2 slices.
    mesh = _mesh(fsdp=2, tensor=2, slices=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert set(ids[0].ravel()) == {0, 1, 2, 3} and set(ids[1].ravel()) == {4, 5, 6, 7}   # slice = block
    # data per slice multiplies: 2 slices x data 2 per slice
    assert dict(_mesh(data=2, fsdp=2, slices=2).shape) == {"data": 4, "fsdp": 2}
    with pytest.raises(ValueError, match="slices=3 does not divide the 8 devices"):
        _mesh(data=-1, slices=3)
    # the abstract mesh used for planning has the same shape
    am = sharding.abstract_mesh({"fsdp": 2, "tensor": 2, "slices": 2}, 8)
    assert dict(am.shape) == dict(mesh.shape)


def test_process_rows_is_this_process_block():
    mesh = _mesh(data=2, fsdp=2, tensor=2)
    assert sharding.process_rows(mesh, 16) == (0, 16)          # one process holds every row
    with pytest.raises(ValueError, match="process 1 holds no device"):
        sharding.process_rows(mesh, 16, process_index=1)


def test_constrain_is_identity_outside_and_pins_inside_the_context():
    mesh = _mesh(data=4, fsdp=2)
    def f(x):   # a fresh function per trace: jax caches traces by function, not by this context
        return sharding.constrain(x * 2, ("batch", "length", "act_embed"))
    x = jnp.ones((8, 4, 6))
    assert "sharding_constraint" not in str(jax.make_jaxpr(lambda x: f(x))(x))
    with sharding.activation_sharding(mesh):
        jaxpr = str(jax.make_jaxpr(lambda x: f(x))(x))
        y = jax.jit(lambda x: f(x))(x)
    assert "sharding_constraint" in jaxpr
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, None)), 3)
    with pytest.raises(ValueError, match="2 names"), sharding.activation_sharding(mesh):
        sharding.constrain(x, ("batch", "length"))


# ------------------------------------------------------------------------------------------ the report
def test_report_bytes_equal_what_jax_places_on_a_device():
    """Independent reference: build the real state on the mesh and sum device 0's shard bytes."""
    config = tiny_config()
    config.model.update(d_model=32, head_dim=8, n_heads=4, n_kv_heads=2)
    mesh = _mesh(data=2, fsdp=2, tensor=2)
    ts = nnx.eval_shape(lambda: build.train_state(config, VOCAB))
    shard = sharding.state_shardings(nnx.state(ts), mesh)
    state = jax.jit(lambda: nnx.state(build.train_state(config, VOCAB)), out_shardings=shard)()
    table = sharding_report.rows(nnx.state(ts), mesh)
    by_path = {r.path: r for r in table}
    dev0 = jax.devices()[0]
    placed = {}
    for path, v in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        arr = v.get_value()
        if jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key):
            arr = jax.random.key_data(arr)
        shard0 = next(s for s in arr.addressable_shards if s.device == dev0)
        placed[sharding_report._path_str(path)] = shard0.data.nbytes
    assert placed.keys() == by_path.keys()
    for p, nbytes in placed.items():
        assert by_path[p].device_bytes == nbytes, p
    emb = by_path["model/base/embedding"]          # vocab 37: not divisible by tensor=2 -> replicated
    assert emb.spec == P(None, "fsdp") and emb.device_bytes == 37 * 16 * 4
    assert by_path["opt/opt_state/1/0/mu/base/embedding"].group == "optimizer"
    totals = sharding_report.totals(table)
    assert totals["optimizer"] > totals["params"] > 0
    line = sharding_report.summary_line(nnx.state(ts), mesh)
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(ts, nnx.Param)))
    assert line.startswith(f"mesh data=2, fsdp=2, tensor=2: {n:,} parameters; per device: params ")
    text = sharding_report.report(nnx.state(ts), mesh)
    assert f"total params per device: {totals['params']} bytes" in text
    assert "model/base/embedding" in text and "(None, 'fsdp')" in text


def test_report_cli_plans_a_64_device_mesh_without_devices():
    env = one_device_env()
    r = subprocess.run(
        [sys.executable, "-m", "iclm_jax.sharding_report", "--config=experiments/configs/acre.py",
         "--config.mesh.data=4", "--config.mesh.fsdp=16", "--devices=64", "--vocab=64000"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mesh: data=4, fsdp=16, tensor=1, module=1" in r.stdout
    # the 64000 x 64 embedding over fsdp=16 (embed 64 / 16 = 4 columns), float32
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("model/base/embedding "))
    assert line.split()[-1] == str(64000 * 4 * 4)
