"""``model.scan_layers`` stores the blocks stacked on a ``layers`` axis: the same values as the unrolled model
of the same seed, checkpoints of either layout restore into the other (and training goes on as if
uninterrupted), the weight-decay mask, generation and the Hugging Face import/export do not depend on
the layout."""
import jax
import numpy as np
import pytest
from flax import nnx

from iclm_jax import checkpoint, hf, sharding
from iclm_jax.generate import decode
from iclm_jax.hf.export import base_weights, merged_weights, peft_weights
from iclm_jax.hf.export_custom import custom_tensors
from iclm_jax.model import layer_stack
from iclm_jax.train import build, optim
from iclm_jax.train.step import make_steps
from tests.helpers import VOCAB, nonzero_lora_b, random_batch, tiny_iclm
from tests.test_step import tiny_config


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same(got: dict, want: dict):
    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys()
    for k, x in want.items():
        np.testing.assert_array_equal(got[k], x, err_msg=k)


def _models():
    return tiny_iclm(), tiny_iclm(base_kw=dict(scan_layers=True))


def test_a_stacked_model_holds_the_unrolled_models_values_under_a_layers_axis():
    unrolled, stacked = _models()
    n = unrolled.cfg.base.n_layers
    want = checkpoint.to_storable(nnx.state(unrolled))
    got = checkpoint.to_storable(nnx.state(stacked))
    assert set(got["base"]["layers"]) == set(want["base"]["layers"][0])    # fields, not layer indices
    q = stacked.base.layers.q
    assert q.kernel.shape == (n,) + unrolled.base.layers[0].q.kernel.shape
    assert q.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads")
    assert q.lora_a.get_metadata()["out_sharding"] == ("layers", "module", "embed", "lora")
    _assert_same(layer_stack.convert(got, want), want)
    _assert_same(layer_stack.convert(want, got), got)     # and back: per layer -> stacked
    for i, block in enumerate(stacked.base.blocks()):      # layer i of the stack is block i
        _assert_same(nnx.to_pure_dict(nnx.state(block)), nnx.to_pure_dict(nnx.state(unrolled.base.layers[i])))


def test_conversion_leaves_other_layers_nodes_and_unknown_keys_alone():
    per_layer = {"critic": {"layers": {0: {"w": np.ones(2)}, 1: {"w": np.zeros(2)}}},
                 "base": {"layers": {0: {"w": np.ones(2)}, 1: {"w": np.zeros(2)}}}, "extra": np.ones(1)}
    like = {"critic": {"layers": {0: {}, 1: {}}}, "base": {"layers": {"w": None}}}
    out = layer_stack.convert(per_layer, like)
    _assert_same(out["critic"], per_layer["critic"])
    assert out["extra"] is per_layer["extra"]
    np.testing.assert_array_equal(out["base"]["layers"]["w"], [[1, 1], [0, 0]])
    assert layer_stack.layouts_differ(per_layer, like) and not layer_stack.layouts_differ(out, like)
    assert layer_stack.in_stack(("base", "layers", "q", "kernel"))
    assert not layer_stack.in_stack(("base", "layers", 0, "q", "kernel"))
    assert not layer_stack.in_stack(("critic", "layers", "0", "bias"))


def test_weight_decay_skips_norm_scales_in_either_layout():
    """The stacked norm scale is [L, d]: its layer axis must not make it a decayed matrix."""
    unrolled, stacked = _models()
    masks = [nnx.to_pure_dict(optim._decay_mask(nnx.state(m, nnx.Param))) for m in (unrolled, stacked)]
    want = masks[0]
    assert not want["base"]["layers"][0]["mlp_norm"]["weight"] and want["base"]["layers"][0]["q"]["kernel"]
    got = layer_stack.convert(masks[1], want, stack=lambda xs: xs[0], take=lambda x, i: x)
    assert got == want


def _train(config, mesh, state=None, steps=(0, 1)):
    ts = build.train_state(config, VOCAB)
    shard = sharding.state_shardings(nnx.state(ts), mesh)
    _, init, step, _ = make_steps(ts, build.loss_config(config), num_domains=2, num_slots=1,
                                  state_sharding=shard, batch_sharding=sharding.batch_sharding(mesh))
    state = jax.device_put(init if state is None else state, shard)
    losses = []
    for s in steps:
        state, metrics = step(state, sharding.put_batch(random_batch(b=8, seed=s), mesh))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.parametrize("save_stacked", [False, True])
def test_a_checkpoint_of_one_layout_restores_into_the_other_and_training_goes_on(tmp_path, save_stacked):
    """Saved after 2 steps on data=2 x fsdp=4, restored into the other layout on data=4 x fsdp=2: every
    array (parameters, Adam moments, RNG keys) equals the saved one converted, and 2 more steps give the
    losses of the uninterrupted run in the saved layout."""
    def config(stacked):
        c = tiny_config()
        c.model.scan_layers = stacked
        c.train.adam_eps = 1e-3     # see test_activation_sharding: compare gradients, not their rounding
        return c
    mesh_a, mesh_b = sharding.make_mesh({"data": 2, "fsdp": 4}), sharding.make_mesh({"data": 4, "fsdp": 2})
    saved, _ = _train(config(save_stacked), mesh_a)
    mngr = checkpoint.manager(str(tmp_path))
    checkpoint.save(mngr, 2, saved, {})
    mngr.wait_until_finished()
    saved_arrays = jax.tree.map(np.asarray, checkpoint.to_storable(saved))
    _, want_losses = _train(config(save_stacked), mesh_a, saved, steps=(2, 3))    # (donates saved)

    other = config(not save_stacked)
    ts = nnx.eval_shape(lambda: build.train_state(other, VOCAB))
    target = sharding.abstract_state(nnx.state(ts), mesh_b)
    restored, _, step, _ = checkpoint.restore(mngr, target)
    mngr.close()
    assert step == 2
    got = checkpoint.to_storable(restored)
    _assert_same(got, layer_stack.convert(saved_arrays, got))
    kernel = nnx.to_pure_dict(restored)["model"]["base"]["layers"]
    kernel = kernel["q"]["kernel"] if not save_stacked else kernel[0]["q"]["kernel"]
    assert kernel.sharding.mesh.shape == mesh_b.shape    # placed in the target's shardings
    _, losses = _train(other, mesh_b, restored, steps=(2, 3))
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)


def test_generation_does_not_depend_on_the_layout():
    unrolled, stacked = _models()
    for m in (unrolled, stacked):
        nonzero_lora_b(m)
    prompts = [[3, 5, 7, 9], [4, 6]]
    kw = dict(max_new_tokens=5, eos_id=None, pad_id=0)
    want = decode(unrolled, prompts, **kw)
    got = decode(stacked, prompts, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))


def test_the_hugging_face_weights_do_not_depend_on_the_layout():
    unrolled, stacked = _models()
    for m in (unrolled, stacked):
        nonzero_lora_b(m)
    for f in (base_weights, lambda b: merged_weights(b, 1), lambda b: peft_weights(b, 0)):
        want, got = f(unrolled.base), f(stacked.base)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    want, got = custom_tensors(unrolled), custom_tensors(stacked)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    # import: the per-layer tensors an importer produces go into a stacked base
    weights = {k: v + 1.0 for k, v in base_weights(unrolled.base).items()}
    for m in (unrolled, stacked):
        hf.load_into(m.base, weights)
    np.testing.assert_array_equal(np.asarray(stacked.base.layers.down.kernel[...][1]),
                                  np.asarray(unrolled.base.layers[1].down.kernel[...]))
    assert base_weights(stacked.base).keys() == weights.keys()
    for k, v in base_weights(stacked.base).items():
        np.testing.assert_array_equal(v, weights[k], err_msg=k)
    with pytest.raises(hf.WeightMismatchError, match=r"missing    layers\.q\.kernel"):
        hf.load_into(stacked.base, {k: v for k, v in weights.items() if k != "layers.1.q.kernel"})
