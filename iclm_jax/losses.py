"""Training objective: answer-token CE + routing_weight·VQ + mi_weight·Î + aux_weight·(module heads' CE).

Every term is returned as a metric, so a run shows what it optimises.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from iclm_jax.model import mi as mi_lib
from iclm_jax.model.iclm import ICLMOutput

MI_ESTIMATORS = ("mine", "plugin", "none")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    routing_weight: float = 1.0
    mi_estimator: str = "mine"
    mi_weight: float = 0.1
    mi_reverse: bool = False      # plugin only: the official code's KL(product || joint)
    aux_weight: float = 0.0

    def __post_init__(self):
        if self.mi_estimator not in MI_ESTIMATORS:
            raise ValueError(f"mi.estimator={self.mi_estimator!r}: expected one of {MI_ESTIMATORS}")
        for name in ("routing_weight", "mi_weight", "aux_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 0")


def answer_ce(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over answer targets (mask = loss_mask)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def slot_correct(logits: jax.Array, batch: dict, num_slots: int) -> tuple[jax.Array, jax.Array]:
    """Exact match per query slot under teacher forcing: ([B, Q] correct, [B, Q] present)."""
    hit = (jnp.argmax(logits, axis=-1) == batch["targets"])
    slots = batch["answer_slot"]
    onehot = slots[..., None] == jnp.arange(num_slots)            # [B, L, Q]
    present = jnp.any(onehot, axis=1)
    wrong = jnp.any(onehot & ~hit[..., None], axis=1)
    return present & ~wrong, present


def mutual_information(out: ICLMOutput, critic, cfg: LossConfig) -> jax.Array:
    """Î between the invariant and the specific representation(s); 0 without an invariant module."""
    if cfg.mi_estimator == "none" or out.pooled_inv is None:
        return jnp.zeros((), jnp.float32)
    specs = [out.pooled_spec] if out.pooled_all is None else list(out.pooled_all)
    if cfg.mi_estimator == "mine":
        vals = [mi_lib.mine_estimate(critic, out.pooled_inv, z) for z in specs]
    else:
        vals = [mi_lib.plugin_mi(out.pooled_inv, z, reverse=cfg.mi_reverse) for z in specs]
    return jnp.mean(jnp.stack(vals))


def total_loss(out: ICLMOutput, batch: dict, critic, cfg: LossConfig) -> tuple[jax.Array, dict]:
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = answer_ce(out.logits, batch["targets"], mask)
    mi = mutual_information(out, critic, cfg)
    aux = jnp.zeros((), jnp.float32)
    for logits in out.aux_logits.values():
        aux = aux + answer_ce(logits, batch["targets"], mask)
    vq = out.route.vq_loss
    # True MI is >= 0. A DV estimate below 0 only means the critic lags the model; penalising it
    # would reward the model for fooling the critic, so only positive dependence is penalised.
    mi_penalty = jnp.maximum(mi, 0.0)
    loss = ce + cfg.routing_weight * vq + cfg.mi_weight * mi_penalty + cfg.aux_weight * aux
    tok_acc = jnp.sum((jnp.argmax(out.logits, -1) == batch["targets"]) * mask) / jnp.maximum(mask.sum(), 1)
    metrics = {"loss": loss, "ce": ce, "vq": vq, "mi": mi, "aux": aux,
               "answer_token_acc": tok_acc, "router_perplexity": out.route.perplexity}
    return loss, metrics
