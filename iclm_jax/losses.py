"""Training objective: answer-token CE + routing_weight·VQ + mi_weight·Î + aux_weight·(module heads' CE).

Every term is returned as a metric, so a run shows what it optimises. ``ce`` (the objective) averages over
every answer target including the EOS that ends each answer; ``answer_ce`` / ``answer_acc`` score only
the answer content (see ``content_mask``), and the ``n/...`` sums let the loop accumulate them exactly.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from iclm_jax.data.acre import QUERY_TYPES
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
    context_weight: float = 0.0   # next-token CE on the prompt (contexts and query objects)

    def __post_init__(self):
        if self.mi_estimator not in MI_ESTIMATORS:
            raise ValueError(f"mi.estimator={self.mi_estimator!r}: expected one of {MI_ESTIMATORS}")
        for name in ("routing_weight", "mi_weight", "aux_weight", "context_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 0")


def _token_ce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def answer_ce(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over answer targets (mask = loss_mask)."""
    ce = _token_ce(logits, targets)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def content_mask(batch: dict) -> jax.Array:
    """[B, L] bool: answer targets that are answer CONTENT, i.e. not the EOS that ends the answer.

    Rule (no EOS id needed): a loss_mask target is content iff the next position's target belongs to
    the same answer slot; the final target of each slot (the EOS in the batch format) is not.
    """
    slots = batch["answer_slot"]
    nxt = jnp.concatenate([slots[:, 1:], jnp.full_like(slots[:, :1], -1)], axis=1)
    return (batch["loss_mask"] > 0) & (slots >= 0) & (nxt == slots)


def context_mask(batch: dict) -> jax.Array:
    """[B, L] bool: prompt positions whose target is the next prompt token of the same segment.

    Excludes answers (loss_mask), padding, and a packed prefix's last position (its next token opens
    a query segment): what an auxiliary language-model loss on the prompt may read.
    """
    seg = batch["segments"]
    nxt = jnp.concatenate([seg[:, 1:], jnp.zeros_like(seg[:, :1])], axis=1)
    return (batch["prompt_mask"] > 0) & (batch["loss_mask"] == 0) & (seg > 0) & (nxt == seg)


def slot_correct(logits: jax.Array, batch: dict, num_slots: int, *, include_eos: bool = False
                 ) -> tuple[jax.Array, jax.Array]:
    """Exact match per query slot under teacher forcing: ([B, Q] correct, [B, Q] present).

    A slot is present when it has any answer target; it is correct when every content target (every
    answer target with ``include_eos``) is the argmax: an answer right but followed by a wrong EOS
    prediction is right.
    """
    hit = (jnp.argmax(logits, axis=-1) == batch["targets"])
    slots = batch["answer_slot"]
    onehot = (slots[..., None] == jnp.arange(num_slots)) & (batch["loss_mask"] > 0)[..., None]  # [B, L, Q]
    present = jnp.any(onehot, axis=1)
    scored = onehot if include_eos else onehot & content_mask(batch)[..., None]
    wrong = jnp.any(scored & ~hit[..., None], axis=1)
    return present & ~wrong, present


def answer_counts(logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
    """Sums for the honest answer metrics (content targets only), to be accumulated over steps.

    ``n/answer_correct`` and ``n/answer_present`` are [1 + len(QUERY_TYPES)] float32: queries right /
    present, overall then per ACRE query type (``query_type`` -1 counts only overall);
    ``n/answer_ce_sum`` / ``n/answer_tokens``: CE summed over content targets / their number.
    """
    num_slots = batch["query_type"].shape[1]
    correct, present = slot_correct(logits, batch, num_slots)
    types = batch["query_type"][..., None] == jnp.arange(len(QUERY_TYPES))        # [B, Q, T]
    by_type = lambda m: jnp.concatenate(                                           # noqa: E731
        [jnp.sum(m)[None], jnp.sum(m[..., None] & types, axis=(0, 1))]).astype(jnp.float32)
    content = content_mask(batch).astype(jnp.float32)
    ce = _token_ce(logits, batch["targets"])
    return {"n/answer_correct": by_type(correct & present), "n/answer_present": by_type(present),
            "n/answer_ce_sum": jnp.sum(ce * content), "n/answer_tokens": jnp.sum(content)}


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
    context = jnp.zeros((), jnp.float32)
    if cfg.context_weight > 0:
        context = answer_ce(out.logits, batch["targets"], context_mask(batch).astype(jnp.float32))
        loss = loss + cfg.context_weight * context
    # Honest metrics: the EOS targets (easy) are left out of answer_ce and answer_acc.
    counts = answer_counts(out.logits, batch)
    metrics = {"loss": loss, "ce": ce, "vq": vq, "mi": mi, "aux": aux, "context_ce": context,
               "answer_ce": counts["n/answer_ce_sum"] / jnp.maximum(counts["n/answer_tokens"], 1.0),
               "answer_acc": counts["n/answer_correct"][0] / jnp.maximum(counts["n/answer_present"][0], 1.0),
               "router_perplexity": out.route.perplexity, **counts}
    return loss, metrics
