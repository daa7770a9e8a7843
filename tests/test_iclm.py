"""The composed ICLM: routing per row, exact zero gradient to unrouted modules, baseline = K=1 special case."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iclm_jax.model.lora import LoRAParam
from tests.helpers import nonzero_lora_b, random_batch, tiny_iclm


def _lora_grads_by_slot(grads):
    """Sum |grad| per adapter slot over every LoRA tensor (leading axis = module)."""
    total = None
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)):
        names = "/".join(str(getattr(p, "key", p)) for p in path)
        if "lora" not in names.lower():
            continue
        per_slot = np.abs(np.asarray(g)).reshape(g.shape[0], -1).sum(1)
        total = per_slot if total is None else total + per_slot
    return total


def test_forward_shapes_and_metrics():
    model = tiny_iclm()
    out = model(random_batch(), train=False)
    assert out.logits.shape == (4, 12, 37)
    assert out.route.index.shape == (4,)
    assert out.pooled_inv.shape == out.pooled_spec.shape == (4, 16)
    assert np.isfinite(np.asarray(out.logits)).all()


def test_unrouted_module_gets_exactly_zero_gradient():
    model = nonzero_lora_b(tiny_iclm(num_modules=3, router={"mode": "oracle"}))
    batch = random_batch(domains=[0, 2, 0, 2])          # module 1 is never routed

    def loss(m):
        out = m(batch, train=True)
        return jnp.mean(out.logits ** 2)
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam))(model)
    per_slot = _lora_grads_by_slot(grads)
    assert per_slot.shape == (4,)                       # 3 specific + invariant
    assert per_slot[1] == 0.0
    assert per_slot[0] > 0 and per_slot[2] > 0 and per_slot[3] > 0


def test_rows_are_routed_independently():
    """Each row's output depends only on its own tokens and its own module (batch of 4 = 4 batches of 1)."""
    model = nonzero_lora_b(tiny_iclm(num_modules=2, router={"mode": "oracle"}))
    batch = random_batch()
    full = np.asarray(model(batch, train=False).logits)
    for i in range(4):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        np.testing.assert_allclose(np.asarray(model(one, train=False).logits), full[i:i + 1], atol=1e-5)


def test_baseline_is_the_k1_special_case():
    model = nonzero_lora_b(tiny_iclm(num_modules=1, invariant=False))
    assert model.router is None and model.aggregator is None
    batch = random_batch()
    out = model(batch, train=False)
    want = model.module_logits(batch, 0)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(want), atol=1e-6)


def test_routed_module_output_equals_that_module_alone():
    model = nonzero_lora_b(tiny_iclm(num_modules=2, router={"mode": "oracle"}, aggregator="logits",
                                 invariant_weight=0.0))
    batch = random_batch(domains=[1, 1, 1, 1])
    out = model(batch, train=False)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(model.module_logits(batch, 1)), atol=1e-5)
    assert not np.allclose(np.asarray(out.logits), np.asarray(model.module_logits(batch, 0)), atol=1e-3)


def test_no_invariant_runs_no_invariant_module_and_gives_the_routed_modules_own_logits():
    """The no_invariant ablation as the official code does it: K adapters only, no aggregator, no pooled
    invariant state (so no MI term), and each row's logits are its routed module's own."""
    from tests.test_step import acre_cfg
    c = acre_cfg.get_config("no_invariant")
    assert (c.model.invariant, c.router.source, c.mi.estimator) == (False, "base", "none")
    model = nonzero_lora_b(tiny_iclm(num_modules=2, invariant=False, router_source="base",
                                     router={"mode": "oracle"}))
    assert model.aggregator is None and model.cfg.num_adapters == 2
    batch = random_batch(domains=[1, 0, 1, 0])
    out = model(batch, train=False)
    assert out.pooled_inv is None
    for row, module in enumerate([1, 0, 1, 0]):
        np.testing.assert_allclose(np.asarray(out.logits[row]), np.asarray(model.module_logits(batch, module)[row]),
                                   atol=1e-5)


@pytest.mark.parametrize("source", ["invariant", "base", "adapter"])
@pytest.mark.parametrize("mode", ["hard", "soft", "gumbel"])
def test_router_sources_and_modes_train(source, mode):
    model = tiny_iclm(num_modules=2, router_source=source, router={"mode": mode})
    batch = random_batch()

    def loss(m):
        out = m(batch, train=True)
        return jnp.mean(out.logits ** 2) + out.route.vq_loss
    grads = nnx.grad(loss)(model)
    leaves = jax.tree.leaves(nnx.to_pure_dict(grads))
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    if source == "adapter":
        slot = model.cfg.router_slot
        assert model.cfg.num_adapters == 4 and slot == 3


def test_mi_on_all_modules_returns_every_specific_representation():
    model = tiny_iclm(num_modules=3, mi_apply_to="all")
    out = model(random_batch(), train=False)
    assert out.pooled_all.shape == (3, 4, 16)


def test_mi_pool_answer_averages_the_final_normed_states_at_answer_positions():
    """mi.pool=answer: MI reads each module's states where it predicts answer tokens (loss_mask), the
    official code's token-level states, pooled per row; against a NumPy masked mean."""
    batch = random_batch()
    model = tiny_iclm(num_modules=3, mi_apply_to="all", mi_pool="answer")
    out = model.forward(batch, train=False)
    b = batch["inputs"].shape[0]
    mask = np.asarray(batch["loss_mask"]) > 0
    assert mask.any(1).all() and (mask != (np.asarray(batch["prompt_mask"]) > 0)).any()

    def ref(slot):
        h = np.asarray(model.base.final_norm(model.hidden(batch, jnp.full((b,), slot), train=False)), np.float64)
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)

    np.testing.assert_allclose(out.pooled_inv, ref(model.cfg.invariant_slot), rtol=1e-5, atol=1e-6)
    for m in range(3):
        np.testing.assert_allclose(out.pooled_all[m], ref(m), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.pooled_spec, ref(np.asarray(out.route.index)), rtol=1e-5, atol=1e-6)
    prompt = tiny_iclm(num_modules=3, mi_apply_to="all").forward(batch, train=False)
    assert not np.allclose(prompt.pooled_inv, out.pooled_inv)      # the default reads the prompt


def test_mi_reduce_sums_or_averages_the_per_module_estimates():
    from iclm_jax import losses
    from iclm_jax.model import mi as mi_lib
    model = tiny_iclm(num_modules=3, mi_apply_to="all")
    out = model.forward(random_batch(), train=False)
    each = [float(mi_lib.plugin_mi(out.pooled_inv, z)) for z in out.pooled_all]
    for reduce, want in (("mean", np.mean(each)), ("sum", np.sum(each))):
        cfg = losses.LossConfig(mi=mi_lib.MIConfig(estimator="plugin", apply_to="all", reduce=reduce))
        assert float(losses.mutual_information(out, None, cfg)) == pytest.approx(want, rel=1e-5)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_modules"):
        tiny_iclm(num_modules=0)
    with pytest.raises(ValueError, match="router.source"):
        tiny_iclm(router_source="nope")
