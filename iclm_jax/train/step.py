"""Pure train and eval steps: (state, batch) -> (state, metrics), jitted once with donation.

The NNX objects are split once (graphdef + state); each step merges them inside ``jax.jit`` (the fast path of
the Flax performance guide). Model and critic are updated in the same compiled step: the model descends
λ·Î with the critic fixed, then the critic ascends its bias-corrected Donsker–Varadhan objective on the
(stop-gradient) representations of the same forward pass.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from iclm_jax import losses, sharding
from iclm_jax.model import mi as mi_lib
from iclm_jax.model.codebook import purity_of_counts
from iclm_jax.model.iclm import ICLMHidden, param_filter
from iclm_jax.model.layer_stack import plain_path
from iclm_jax.model.router import RouteOut
from iclm_jax.train.state import TrainState

NONFINITE = ("stop", "skip")   # train.nonfinite: what a non-finite loss term or gradient does
FINITE_TERMS = ("ce", "vq", "mi", "aux", "context_ce", "grad_norm")


def _train_step(graphdef, state, batch, *, loss_cfg: losses.LossConfig, num_domains: int,
                skip_nonfinite: bool, trainable: dict | None = None):
    ts: TrainState = nnx.merge(graphdef, state)
    wrt = param_filter(ts.train_base)

    def loss_fn(model, critic):
        loss, metrics, out, _ = losses.model_loss(model, batch, critic, loss_cfg, train=True)
        return loss, (metrics, out)

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)
    (loss, (metrics, out)), grads = grad_fn(ts.model, ts.critic)
    if trainable is not None:    # frozen entries: no gradient (clipping and grad_norm see the rest), no change
        nnx.replace_by_pure_dict(grads, _where_trainable(trainable, nnx.to_pure_dict(grads), jnp.zeros_like))
        before = nnx.to_pure_dict(nnx.state(ts.model, wrt))
    metrics["grad_norm"] = optax.tree.norm(grads)
    ts.opt.update(ts.model, grads)
    if trainable is not None:    # AdamW's decay moves a parameter without gradient: put frozen entries back
        after = nnx.state(ts.model, wrt)
        nnx.replace_by_pure_dict(after, _where_trainable(trainable, nnx.to_pure_dict(after), before))
        nnx.update(ts.model, after)

    if ts.critic is not None and out.pooled_inv is not None:
        x = jax.lax.stop_gradient(out.pooled_inv)
        zs = [out.pooled_spec] if out.pooled_all is None else list(out.pooled_all)
        z = jax.lax.stop_gradient(jnp.concatenate(zs, axis=0))
        x = jnp.tile(x, (len(zs), 1))

        def critic_loss(critic):
            objective, new_ema, i_dv = mi_lib.mine_critic_objective(
                critic, x, z, ts.mine_ema[...], decay=loss_cfg.mi.ema_decay, clip=loss_cfg.mi.clip)
            return objective, (new_ema, i_dv)

        (_, (new_ema, i_dv)), cgrads = nnx.value_and_grad(critic_loss, has_aux=True)(ts.critic)
        ts.critic_opt.update(ts.critic, cgrads)
        ts.mine_ema[...] = new_ema
        metrics["mine_critic_bound"] = i_dv
    if out.pooled_inv is not None and loss_cfg.mi.estimator != "plugin":
        # The paper's estimator beside MINE's (a monitor: not optimised), invariant vs routed specific.
        metrics["mi_plugin"] = mi_lib.plugin_mi(jax.lax.stop_gradient(out.pooled_inv),
                                                jax.lax.stop_gradient(out.pooled_spec))

    metrics.update(_routing_metrics(out.route.index, batch, ts.model.cfg.num_modules, num_domains))
    if ts.model.router is not None:   # the codebook's moving average of the routing weights
        metrics["route_usage"] = ts.model.router.usage[...]
        metrics["router_relocations"] = ts.model.router.relocations[...]   # codes moved so far (ELBG)
    metrics["tokens"] = jnp.sum(batch["segments"] > 0)
    # One flag per term, so a non-finite step can be reported by name (train.nonfinite).
    finite = {k: jnp.all(jnp.isfinite(metrics[k])) for k in FINITE_TERMS}
    ok = jnp.all(jnp.stack(list(finite.values())))
    metrics.update({f"finite/{k}": v for k, v in finite.items()})
    metrics["finite"] = ok
    new_state = nnx.state(ts)
    if skip_nonfinite:   # keep the previous state (parameters, optimiser, router, RNG) untouched
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        ts_skip = nnx.merge(graphdef, new_state)
        ts_skip.skipped[...] = ts_skip.skipped[...] + (~ok).astype(jnp.int32)
        new_state = nnx.state(ts_skip)
    return new_state, metrics


def _where_trainable(trainable: dict, tree: dict, other) -> dict:
    """``tree`` (a pure dict of model arrays) where ``trainable`` (plain key path -> bool array broadcasting to
    the leaf) allows, else ``other``: a tree of the same paths, or a function of the leaf."""
    def pick(path, x):
        key = plain_path(path)
        if key not in trainable:
            return x
        alt = other(x) if callable(other) else at(other, key)
        return jnp.where(trainable[key], x, alt)
    return jax.tree_util.tree_map_with_path(pick, tree)


def at(tree: dict, key: tuple):
    """The leaf of nested dict ``tree`` at plain key path ``key``."""
    for k in key:
        tree = tree[k]
    return tree


VIEWS = ("model", "forced", "alone")


def _eval_step(graphdef, state, batch, *, loss_cfg: losses.LossConfig, num_slots: int, view: str = "model"):
    """Per-query results of the model (``view="model"``), of the model with each row routed to
    ``batch["route_index"]`` (``"forced"``), or of the adapter slot ``batch["route_index"]`` alone on the
    base head (``"alone"``: a specific module, or the invariant one, without router or aggregator)."""
    ts: TrainState = nnx.merge(graphdef, state)
    # Eval reports answer metrics only: no context CE, no auxiliary heads, so logits at answers only.
    loss_cfg = dataclasses.replace(loss_cfg, context_weight=0.0, aux_weight=0.0)
    critic = ts.critic
    if view == "alone":
        model, index = ts.model, batch["route_index"]
        x = model.hidden(batch, index, train=False)
        b, zero = index.shape[0], jnp.zeros((), jnp.float32)
        out = ICLMHidden(x_inv=None, x_spec=x, pooled_inv=None, pooled_spec=None, pooled_all=None,
                         route=RouteOut(index, jnp.ones((b, 1)), zero, jnp.zeros((b, 1)), jnp.ones(())))
        stats = losses.read_stats(lambda xi, xs: {"logits": model.base.logits(xs)}, None, x, batch["targets"],
                                  losses.read_mask(batch, loss_cfg), loss_cfg.logit_chunk)
        critic = None
        out = out._replace(pooled_spec=model.mi_pooled(x, batch))
    else:
        out = ts.model.forward(batch, train=False, route_index=batch["route_index"] if view == "forced" else None)
        stats = losses.model_stats(ts.model, out, batch, loss_cfg, aux=False)
    _, metrics = losses.total_loss(out, stats, batch, critic, loss_cfg)
    correct, present = losses.slot_correct(stats.hit, batch, num_slots)     # content tokens, not EOS
    # Sums (not means) so the eval loop can average answer CE exactly over a whole eval set.
    pooled = {"pooled_spec": out.pooled_spec}       # [B, d] prompt-pooled states (independence analysis)
    if out.pooled_inv is not None:
        pooled["pooled_inv"] = out.pooled_inv
    return {"correct": correct, "present": present, "module": out.route.index,
            "loss": metrics["ce"], "mi": metrics["mi"], "answer_ce": metrics["answer_ce"],
            "answer_ce_sum": metrics["n/answer_ce_sum"], "answer_tokens": metrics["n/answer_tokens"], **pooled}


def _routing_metrics(index, batch, num_modules: int, num_domains: int) -> dict[str, jax.Array]:
    """Assignment fractions per module and the module × domain count table (for purity)."""
    real = jnp.any(batch["segments"] > 0, axis=1)
    onehot = jax.nn.one_hot(index, num_modules) * real[:, None]
    dom = jax.nn.one_hot(batch["domain"], num_domains) * real[:, None]   # domain -1 -> zeros
    counts = onehot.T @ dom
    return {"route_fraction": onehot.sum(0) / jnp.maximum(real.sum(), 1),
            "route_domain_counts": counts,
            "route_purity": purity_of_counts(counts)}


def _under_rules(fn: Callable, mesh, rules) -> Callable:
    """``fn`` traced with activation sharding constraints active (a trace-time context)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with sharding.activation_sharding(mesh, rules):
            return fn(*args, **kwargs)
    return wrapped


def make_steps(ts: TrainState, loss_cfg: losses.LossConfig, *, num_domains: int, num_slots: int,
               skip_nonfinite: bool = False,
               state_sharding: Any = None, batch_sharding: Any = None, rules: Any = None,
               trainable: dict | None = None) -> tuple[Any, Any, Callable, Callable]:
    """Split the state and return (graphdef, state, train_step, eval_step), both jitted once.

    ``train_step(state, batch) -> (state, metrics)`` donates its state argument. With shardings, the
    steps are traced under ``sharding.activation_sharding(mesh, rules)``, so activations are pinned at
    block boundaries by the same logical rules as the parameters. ``trainable`` (``continual.trainable``):
    model parameters (plain key path below the model) that the step may change only where a bool array,
    broadcasting to the parameter, is True: elsewhere their gradient is zero and they stay bit-identical.
    """
    graphdef, state = nnx.split(ts)
    train = functools.partial(_train_step, graphdef, loss_cfg=loss_cfg, num_domains=num_domains,
                              skip_nonfinite=skip_nonfinite, trainable=trainable)
    evaluate = functools.partial(_eval_step, graphdef, loss_cfg=loss_cfg, num_slots=num_slots)
    if state_sharding is not None:
        mesh = batch_sharding.mesh
        rules = sharding.DEFAULT_RULES if rules is None else rules
        train, evaluate = (_under_rules(f, mesh, rules) for f in (train, evaluate))
        train_step = jax.jit(train, donate_argnums=0, in_shardings=(state_sharding, batch_sharding),
                             out_shardings=(state_sharding, None))
        eval_step = jax.jit(evaluate, in_shardings=(state_sharding, batch_sharding))
    else:
        train_step = jax.jit(train, donate_argnums=0)
        eval_step = jax.jit(evaluate)
    return graphdef, state, train_step, eval_step


def make_view_steps(graphdef, loss_cfg: losses.LossConfig, *, num_slots: int, state_sharding: Any = None,
                    batch_sharding: Any = None, rules: Any = None) -> dict[str, Callable]:
    """The jitted ``_eval_step`` of the ``"forced"`` and ``"alone"`` views (compiled on first use)."""
    out = {}
    for view in VIEWS[1:]:
        f = functools.partial(_eval_step, graphdef, loss_cfg=loss_cfg, num_slots=num_slots, view=view)
        if state_sharding is not None:
            f = _under_rules(f, batch_sharding.mesh, sharding.DEFAULT_RULES if rules is None else rules)
            out[view] = jax.jit(f, in_shardings=(state_sharding, batch_sharding))
        else:
            out[view] = jax.jit(f)
    return out
