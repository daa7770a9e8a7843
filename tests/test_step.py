"""The jitted train step: compiles once, learns a toy task, updates the MINE critic, honours frozen bases."""
import importlib.util
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from iclm_jax.checkpoint import to_storable
from iclm_jax.train import build
from iclm_jax.train.step import make_steps
from tests.helpers import VOCAB, random_batch

_spec = importlib.util.spec_from_file_location(
    "acre_cfg", pathlib.Path(__file__).resolve().parent.parent / "experiments/configs/acre.py")
acre_cfg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(acre_cfg)


def tiny_config(arg="demo", **train) -> ml_collections.ConfigDict:
    c = acre_cfg.get_config(arg)
    c.model.update(d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, mlp_dim=32)
    c.lora.rank = 4
    c.mi.critic_hidden = 16
    c.train.update({"steps": 50, "warmup_steps": 0, "lr": 3e-3, **train})
    return c


def pure(state) -> dict:
    """Host copy of a state as a nested dict (PRNG keys as key data)."""
    return jax.tree.map(np.asarray, to_storable(state))


def _setup(config, num_slots=1):
    ts = build.train_state(config, VOCAB)
    return make_steps(ts, build.loss_config(config), num_domains=2, num_slots=num_slots)


def toy_task_batch(step: int, b: int = 8, length: int = 10) -> dict:
    """Answer = a fixed function of the last prompt token, then a fixed end token: a bigram task."""
    batch = random_batch(b=b, length=length, seed=step)
    for i in range(b):
        n = int(batch["segments"][i].sum())
        answer = 1 + (batch["inputs"][i, n - 3] * 7) % (VOCAB - 1)
        batch["inputs"][i, n - 2] = answer
        batch["inputs"][i, n - 1] = 1
        batch["targets"][i, n - 3] = answer
        batch["targets"][i, n - 2] = 1
    return batch


def test_train_step_compiles_once_and_updates_everything():
    config = tiny_config()
    graphdef, state, train_step, eval_step = _setup(config)
    before = pure(state)
    for s in range(3):
        state, metrics = train_step(state, random_batch(seed=s))
    assert train_step._cache_size() == 1
    for k in ("loss", "ce", "vq", "mi", "aux", "grad_norm", "router_perplexity", "mine_critic_bound",
              "route_fraction", "route_domain_counts", "answer_ce", "answer_acc", "n/answer_correct",
              "n/answer_present", "n/answer_ce_sum", "n/answer_tokens", "mi_plugin", "router_relocations"):
        assert k in metrics and np.isfinite(np.asarray(metrics[k])).all(), k
    assert float(metrics["mi_plugin"]) >= 0 and int(metrics["router_relocations"]) >= 0
    after = pure(state)
    assert float(after["mine_ema"]) != 0.0                     # MINE moving average initialised
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before, after)
    assert changed["critic"] and any(jax.tree.leaves(changed["critic"]))
    assert any(jax.tree.leaves(changed["model"]["base"]))
    eval_step(state, random_batch(seed=9))
    eval_step(state, random_batch(seed=10))
    assert eval_step._cache_size() == 1


@pytest.mark.parametrize("arg", ["demo", "baseline", "plugin", "paper"])
def test_loss_decreases_on_a_toy_task(arg):
    config = tiny_config(arg, lr=1e-2)
    config.train.steps = 150
    _, state, train_step, _ = _setup(config)
    ces = []
    for s in range(150):
        state, metrics = train_step(state, toy_task_batch(s))
        ces.append(float(metrics["ce"]))
    assert np.mean(ces[-10:]) < 0.75 * np.mean(ces[:5]), ces


def test_frozen_base_only_trains_adapters_router_and_aggregator():
    config = tiny_config()
    config.model.train_base = False
    _, state, train_step, _ = _setup(config)
    before = jax.tree.map(np.asarray, pure(state)["model"])
    state, _ = train_step(state, random_batch())
    after = pure(state)["model"]
    flat_b = dict(jax.tree_util.tree_leaves_with_path(before))
    for path, new in jax.tree_util.tree_leaves_with_path(after):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        same = np.array_equal(flat_b[path], np.asarray(new))
        if name.startswith("base/") and "lora" not in name and "rngs" not in name and "count" not in name:
            assert same, f"frozen base parameter {name} changed"
    assert not np.array_equal(before["aggregator"]["kernel"], np.asarray(after["aggregator"]["kernel"]))


def test_gradient_accumulation_applies_every_k_steps():
    config = tiny_config(grad_accum=2)
    config.mi.estimator = "plugin"
    _, state, train_step, _ = _setup(config)
    k0 = np.asarray(pure(state)["model"]["aggregator"]["kernel"])
    state, _ = train_step(state, random_batch(seed=1))
    k1 = np.asarray(pure(state)["model"]["aggregator"]["kernel"])
    state, _ = train_step(state, random_batch(seed=2))
    k2 = np.asarray(pure(state)["model"]["aggregator"]["kernel"])
    assert np.array_equal(k0, k1) and not np.array_equal(k1, k2)


def test_eval_step_reports_exact_match_per_slot():
    config = tiny_config()
    graphdef, state, train_step, eval_step = _setup(config)
    for s in range(40):     # learn the toy task a little so some rows are right and some wrong
        state, _ = train_step(state, toy_task_batch(s))
    batch = toy_task_batch(123, b=16)
    out = eval_step(state, batch)
    assert out["correct"].shape == out["present"].shape == (16, 1)
    assert np.asarray(out["present"]).all()
    logits = np.asarray(nnx.merge(graphdef, state).model(batch).logits)
    hit = logits.argmax(-1) == batch["targets"]
    # Exact match of the answer content: every answer target but the last of the row (the end token)
    content = [np.flatnonzero(batch["loss_mask"][i] > 0)[:-1] for i in range(16)]
    want = [hit[i][content[i]].all() for i in range(16)]
    np.testing.assert_array_equal(np.asarray(out["correct"])[:, 0], want)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = [-logp[i, t, batch["targets"][i, t]] for i in range(16) for t in content[i]]
    np.testing.assert_allclose(float(out["answer_ce"]), np.mean(ce), rtol=1e-4)
    np.testing.assert_allclose(float(out["answer_ce_sum"]), np.sum(ce), rtol=1e-4)
    assert float(out["answer_tokens"]) == len(ce) == 16


def _answer_stats(logits, batch) -> tuple[np.ndarray, float]:
    """Exact match per row and the summed CE over answer content targets, from full logits (as the eval
    step counts them: every answer target but the row's last, the end token)."""
    logits = np.asarray(logits, np.float64)
    hit = logits.argmax(-1) == batch["targets"]
    content = [np.flatnonzero(batch["loss_mask"][i] > 0)[:-1] for i in range(len(hit))]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = sum(-logp[i, t, batch["targets"][i, t]] for i in range(len(hit)) for t in content[i])
    return np.array([hit[i][content[i]].all() for i in range(len(hit))]), ce


def test_per_module_views_equal_each_module_alone_and_the_forced_routing():
    """view="alone": module_logits(slot) (the slot's adapter on the base head); view="forced": the model with
    each row's route replaced, checked against the same model routing by domain (router mode oracle)."""
    from iclm_jax.train.step import make_view_steps
    config = tiny_config()
    graphdef, state, train_step, eval_step = _setup(config)
    for s in range(40):
        state, _ = train_step(state, toy_task_batch(s))
    steps = make_view_steps(graphdef, build.loss_config(config), num_slots=1)
    batch = toy_task_batch(321, b=16)
    model = nnx.merge(graphdef, state).model
    ces = []
    for slot in (0, 1, model.cfg.invariant_slot):
        out = steps["alone"](state, {**batch, "route_index": np.full(16, slot, np.int32)})
        hit, ce = _answer_stats(model.module_logits(batch, slot), batch)
        np.testing.assert_array_equal(np.asarray(out["correct"])[:, 0], hit)
        np.testing.assert_allclose(float(out["answer_ce_sum"]), ce, rtol=1e-4)
        assert (np.asarray(out["module"]) == slot).all()
        ces.append(ce)
    assert len(set(np.round(ces, 3))) == 3                 # three different modules
    routed = eval_step(state, batch)
    same = steps["forced"](state, {**batch, "route_index": np.asarray(routed["module"], np.int32)})
    np.testing.assert_allclose(float(same["answer_ce_sum"]), float(routed["answer_ce_sum"]), rtol=1e-6)
    flipped = (1 - np.asarray(routed["module"])).astype(np.int32)
    out = steps["forced"](state, {**batch, "route_index": flipped})
    assert (np.asarray(out["module"]) == flipped).all()
    oracle = nnx.merge(graphdef, state).model             # the same model, routing rows by a domain = flipped
    oracle.router.mode = "oracle"
    hit, ce = _answer_stats(oracle({**batch, "domain": flipped}).logits, batch)
    np.testing.assert_array_equal(np.asarray(out["correct"])[:, 0], hit)
    np.testing.assert_allclose(float(out["answer_ce_sum"]), ce, rtol=1e-4)
    assert abs(ce - float(routed["answer_ce_sum"])) > 1e-3  # the flip changed the answers' loss


def test_weight_decay_spares_norms_and_the_gradient_codebook():
    from iclm_jax.train.optim import _decay_mask
    config = tiny_config()
    config.router["update"] = "gradient"
    ts = build.train_state(config, VOCAB)
    mask = _decay_mask(nnx.state(ts.model, nnx.Param))
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    assert any("codebook" in k for k in flat)             # the gradient codebook is a Param here...
    assert not any(m for k, m in flat.items() if "codebook" in k)    # ...but is not decayed
    assert not any(m for k, m in flat.items() if "norm" in k)
    assert any(m for k, m in flat.items() if "kernel" in k)
