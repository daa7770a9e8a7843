"""Checkpoints restore exactly onto other meshes (8 -> 4x2 -> 8 fsdp -> 1 device) and keep grain state."""
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from iclm_jax import checkpoint, sharding
from iclm_jax.config_check import ConfigError
from iclm_jax.train import build, resume
from iclm_jax.train.step import make_steps
from tests.helpers import VOCAB, random_batch
from tests.test_step import tiny_config


def _trained_state(mesh):
    config = tiny_config()
    config.model.update(d_model=32, head_dim=8)
    ts = build.train_state(config, VOCAB)
    state = nnx.state(ts)
    shard = sharding.state_shardings(state, mesh)
    _, _, step, _ = make_steps(ts, build.loss_config(config), num_domains=2, num_slots=1,
                               state_sharding=shard, batch_sharding=sharding.batch_sharding(mesh))
    state = jax.device_put(state, shard)
    for s in range(2):
        state, _ = step(state, sharding.put_batch(random_batch(b=8, seed=s), mesh))
    return state


def test_restore_reshards_onto_other_meshes(tmp_path):
    mesh_a = sharding.make_mesh({"data": 2, "fsdp": 4})
    state = _trained_state(mesh_a)
    emb = nnx.to_pure_dict(state)["model"]["base"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")      # really sharded
    mngr = checkpoint.manager(str(tmp_path))
    checkpoint.save(mngr, 2, state, {"note": "8 devices"}, data_state={"next_index": 2})
    mngr.wait_until_finished()
    want = jax.tree.map(np.asarray, checkpoint.to_storable(state))

    targets = [sharding.make_mesh({"data": 4, "fsdp": 2}), sharding.make_mesh({"fsdp": 8}),
               sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])]
    for mesh in targets:
        restored, meta, step, data = checkpoint.restore(mngr, sharding.abstract_state(state, mesh), with_data=True)
        assert step == 2 and meta["note"] == "8 devices" and data == {"next_index": 2}
        got = checkpoint.to_storable(restored)
        for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(want),
                                     jax.tree_util.tree_leaves_with_path(got)):
            np.testing.assert_array_equal(np.asarray(y), x, err_msg=str(path))
        emb = nnx.to_pure_dict(restored)["model"]["base"]["embedding"]
        assert emb.sharding.mesh.shape == mesh.shape
        assert emb.sharding.spec == sharding.logical_to_spec(("vocab", "embed"), mesh, shape=emb.shape)
    mngr.close()


def test_a_run_saved_before_the_router_relocation_statistics_restores_with_them_at_init(tmp_path):
    """A checkpoint without the router's removal_cost / split_gain / relocations (saved by an older version)
    restores every stored array exactly and starts those three at their init value (zeros)."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    state = _trained_state(mesh)
    router = nnx.to_pure_dict(state)["model"]["router"]
    assert int(router["relocations"]) >= 0 and set(checkpoint.ADDED_LATER) <= set(router)
    old = checkpoint.to_storable(state)
    for name in checkpoint.ADDED_LATER:
        del old["model"]["router"][name]
    mngr = checkpoint.manager(str(tmp_path))
    mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(old), meta=ocp.args.JsonSave({})))
    mngr.wait_until_finished()
    restored, _, step, _ = checkpoint.restore(mngr, sharding.abstract_state(state, mesh))
    got = nnx.to_pure_dict(restored)
    assert step == 1
    for path, x in jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, old)):
        np.testing.assert_array_equal(np.asarray(_at(checkpoint.to_storable(restored), path)), x, err_msg=str(path))
    for name in checkpoint.ADDED_LATER:
        want = np.zeros_like(np.asarray(router[name]))
        np.testing.assert_array_equal(np.asarray(got["model"]["router"][name]), want, err_msg=name)
    mngr.close()


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_unfinished_step_is_never_latest(tmp_path):
    mngr = checkpoint.manager(str(tmp_path))
    mngr.save(1, args=ocp.args.Composite(meta=ocp.args.JsonSave({"a": 1})))
    mngr.wait_until_finished()
    (tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-5").mkdir()
    mngr.close()
    assert checkpoint.manager(str(tmp_path)).latest_step() == 1


def test_resume_mismatch_lists_each_changed_field_but_the_resumable_ones():
    a = {"model": {"num_modules": 2, "d_model": 64, "rope_theta": 1e4}, "lora": {"rank": 8}, "seed": 0,
         "train": {"steps": 10, "lr": 1e-3}, "mesh": {"data": 8}}
    b = {"model": {"num_modules": 4, "d_model": 64, "rope_theta": 5e5}, "lora": {"rank": 4}, "seed": 0,
         "train": {"steps": 20, "lr": 1e-3}, "mesh": {"data": 1, "fsdp": 8}}
    assert resume.mismatch(a, b) == ["lora.rank: checkpoint has 8, config has 4",
                                     "model.num_modules: checkpoint has 2, config has 4",
                                     "model.rope_theta: checkpoint has 10000.0, config has 500000.0"]


def test_a_field_newer_than_the_stored_config_counts_as_its_typed_default():
    old = {"model": {"d_model": 64}, "data": {"styles": "text"}}      # written before canon, form existed
    new = {"model": {"d_model": 64, "canon": 0}, "data": {"styles": "text", "form": "full"}}
    assert resume.mismatch(old, new) == []
    assert resume.mismatch(old, {"model": {"d_model": 64, "canon": 4}, "data": {"styles": "text"}}) == [
        "model.canon: checkpoint has 0, config has 4"]
    assert resume.mismatch(old, {"model": {"d_model": 64, "new_field": 1}, "data": {"styles": "text"}}) == [
        "model.new_field: checkpoint has no such field, config has 1"]


def test_a_missing_or_truncated_stored_config_is_named(tmp_path):
    assert resume.read_stored_config(str(tmp_path), has_checkpoint=False) is None
    with pytest.raises(ConfigError, match=r"config.json: missing, but the workdir holds checkpoints"):
        resume.read_stored_config(str(tmp_path), has_checkpoint=True)
    (tmp_path / "config.json").write_text('{"model": {"d_model": 6')
    with pytest.raises(ConfigError, match=r"config.json: not a readable config"):
        resume.read_stored_config(str(tmp_path), has_checkpoint=True)
