"""Training objective: answer-token CE + routing_weight·VQ + mi.weight·Î + aux_weight·(module heads' CE).

Every term is returned as a metric, so a run shows what it optimises. ``ce`` (the objective) averages over
every answer target including the EOS that ends each answer; ``answer_ce`` / ``answer_acc`` score only
the answer content (see ``content_mask``), and the ``n/...`` sums let the loop accumulate them exactly.

Logits only where read: a [batch, length, vocab] tensor over a 49k vocabulary is the largest array of a
step, but the losses read only the answer targets (and, with ``context_weight``, the prompt). ``read_stats``
moves each row's read positions to the front, runs the heads on chunks of ``logit_chunk`` positions
(a scan whose body is rematerialised, so the backward pass keeps no chunk's logits either) and skips the
chunks that hold no read position; what leaves it is per-position CE and argmax hits, [batch, length].
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from iclm_jax.data.acre import QUERY_TYPES
from iclm_jax.model import mi as mi_lib
from iclm_jax.model.iclm import ICLMHidden


@dataclasses.dataclass(frozen=True)
class LossConfig:
    routing_weight: float = 1.0   # router.weight
    mi: mi_lib.MIConfig = mi_lib.MIConfig()
    aux_weight: float = 0.0
    context_weight: float = 0.0   # next-token CE on the prompt (contexts and query objects)
    logit_chunk: int = 64         # positions per head call in read_stats (memory, not semantics)

    def __post_init__(self):
        for name in ("routing_weight", "aux_weight", "context_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 0")
        if not isinstance(self.logit_chunk, int) or self.logit_chunk < 1:
            raise ValueError(f"logit_chunk={self.logit_chunk!r}: expected an int >= 1")


class TokenStats(NamedTuple):
    """What the losses and metrics read of the logits, per position ([B, L]; 0/False where not read)."""
    ce: jax.Array                 # float32 CE of the aggregated logits
    hit: jax.Array                # bool: argmax of the aggregated logits == target
    aux_ce: dict[str, jax.Array]  # float32 CE of each auxiliary head (ICLM.heads names)


def _token_ce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``values`` over ``mask`` (float [B, L]); 0 when the mask is empty."""
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def read_mask(batch: dict, cfg: LossConfig) -> jax.Array:
    """[B, L] bool: the positions whose logits some loss or metric reads."""
    read = batch["loss_mask"] > 0
    if cfg.context_weight > 0:
        read = read | context_mask(batch)
    return read


def _chunk_stats(heads, x_inv, x_spec, targets, read) -> tuple:
    """(ce, hit, aux_ce) of one chunk [B, C] of gathered positions; zeros where not ``read``."""
    out = dict(heads(x_inv, x_spec))
    logits = out.pop("logits")
    ce = jnp.where(read, _token_ce(logits, targets), 0.0)
    hit = read & (jnp.argmax(logits, axis=-1) == targets)
    aux = {k: jnp.where(read, _token_ce(v, targets), 0.0) for k, v in out.items()}
    return ce, hit, aux


def read_stats(heads: Callable, x_inv: jax.Array | None, x_spec: jax.Array, targets: jax.Array,
               read: jax.Array, chunk: int) -> TokenStats:
    """Per-position CE / argmax hits of ``heads`` (``ICLM.heads``) on hidden states [B, L, d], computed
    only at ``read`` positions [B, L]: see the module docstring. Equals the same statistics of the full
    logits at every read position."""
    b, length = read.shape
    c = min(chunk, length)
    n = -(-length // c)
    order = jnp.argsort(~read.astype(bool), axis=1, stable=True)          # each row's read positions first, in order

    def chunks(x):   # [B, L, ...] -> [n, B, c, ...] in ``order``, padded with unread positions
        if x is None:
            return None
        x = jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
        x = jnp.pad(x, [(0, 0), (0, n * c - length)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((b, n, c) + x.shape[2:]), 1, 0)

    def body(carry, xs):
        xi, xsp, tgt, r = xs
        compute = lambda: _chunk_stats(heads, xi, xsp, tgt, r)            # noqa: E731
        skip = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),  # noqa: E731
                                    jax.eval_shape(compute))
        return carry, jax.lax.cond(jnp.any(r), compute, skip)

    xs = (chunks(x_inv), chunks(x_spec), chunks(targets), chunks(read))
    _, ys = jax.lax.scan(jax.checkpoint(body), None, xs)
    rows = jnp.arange(b)[:, None]

    def unsort(y):   # [n, B, c] -> [B, L] back in position order
        y = jnp.moveaxis(y, 0, 1).reshape(b, n * c)[:, :length]
        return jnp.zeros_like(y).at[rows, order].set(y)

    ce, hit, aux = jax.tree.map(unsort, ys)
    return TokenStats(ce=ce, hit=hit, aux_ce=aux)


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


def slot_correct(hit: jax.Array, batch: dict, num_slots: int, *, include_eos: bool = False
                 ) -> tuple[jax.Array, jax.Array]:
    """Exact match per query slot under teacher forcing: ([B, Q] correct, [B, Q] present).

    ``hit`` [B, L] bool: the argmax is the target (``TokenStats.hit``; read at every answer target).
    A slot is present when it has any answer target; it is correct when every content target (every
    answer target with ``include_eos``) is the argmax: an answer right but followed by a wrong EOS
    prediction is right.
    """
    slots = batch["answer_slot"]
    onehot = (slots[..., None] == jnp.arange(num_slots)) & (batch["loss_mask"] > 0)[..., None]  # [B, L, Q]
    present = jnp.any(onehot, axis=1)
    scored = onehot if include_eos else onehot & content_mask(batch)[..., None]
    wrong = jnp.any(scored & ~hit[..., None], axis=1)
    return present & ~wrong, present


def answer_counts(stats: TokenStats, batch: dict) -> dict[str, jax.Array]:
    """Sums for the honest answer metrics (content targets only), to be accumulated over steps.

    ``n/answer_correct`` and ``n/answer_present`` are [1 + len(QUERY_TYPES)] float32: queries right /
    present, overall then per ACRE query type (``query_type`` -1 counts only overall);
    ``n/answer_ce_sum`` / ``n/answer_tokens``: CE summed over content targets / their number.
    """
    num_slots = batch["query_type"].shape[1]
    correct, present = slot_correct(stats.hit, batch, num_slots)
    types = batch["query_type"][..., None] == jnp.arange(len(QUERY_TYPES))        # [B, Q, T]
    by_type = lambda m: jnp.concatenate(                                           # noqa: E731
        [jnp.sum(m)[None], jnp.sum(m[..., None] & types, axis=(0, 1))]).astype(jnp.float32)
    content = content_mask(batch).astype(jnp.float32)
    return {"n/answer_correct": by_type(correct & present), "n/answer_present": by_type(present),
            "n/answer_ce_sum": jnp.sum(stats.ce * content), "n/answer_tokens": jnp.sum(content)}


def mutual_information(out: ICLMHidden, critic, cfg: LossConfig) -> jax.Array:
    """Î between the invariant and the specific representation(s); 0 without an invariant module."""
    if cfg.mi.estimator == "none" or out.pooled_inv is None:
        return jnp.zeros((), jnp.float32)
    specs = [out.pooled_spec] if out.pooled_all is None else list(out.pooled_all)
    if cfg.mi.estimator == "mine":
        vals = [mi_lib.mine_estimate(critic, out.pooled_inv, z) for z in specs]
    else:
        vals = [mi_lib.plugin_mi(out.pooled_inv, z, reverse=cfg.mi.reverse) for z in specs]
    return jnp.sum(jnp.stack(vals)) if cfg.mi.reduce == "sum" else jnp.mean(jnp.stack(vals))


def model_stats(model, out: ICLMHidden, batch: dict, cfg: LossConfig, *, aux: bool = True) -> TokenStats:
    """``read_stats`` of an ICLM's heads at the positions ``cfg``'s losses read."""
    heads = lambda xi, xs: model.heads(xi, xs, aux=aux)     # noqa: E731
    return read_stats(heads, out.x_inv, out.x_spec, batch["targets"], read_mask(batch, cfg), cfg.logit_chunk)


def total_loss(out: ICLMHidden, stats: TokenStats, batch: dict, critic, cfg: LossConfig
               ) -> tuple[jax.Array, dict]:
    """The objective and its metrics from the forward pass and the per-position statistics of its heads
    (``model_stats``), which must cover ``read_mask(batch, cfg)``."""
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = masked_mean(stats.ce, mask)
    mi = mutual_information(out, critic, cfg)
    aux = jnp.zeros((), jnp.float32)
    for aux_ce in stats.aux_ce.values():
        aux = aux + masked_mean(aux_ce, mask)
    vq = out.route.vq_loss
    # True MI is >= 0. A DV estimate below 0 only means the critic lags the model; penalising it
    # would reward the model for fooling the critic, so only positive dependence is penalised.
    mi_penalty = jnp.maximum(mi, 0.0)
    loss = ce + cfg.routing_weight * vq + cfg.mi.weight * mi_penalty + cfg.aux_weight * aux
    context = jnp.zeros((), jnp.float32)
    if cfg.context_weight > 0:
        context = masked_mean(stats.ce, context_mask(batch).astype(jnp.float32))
        loss = loss + cfg.context_weight * context
    # Honest metrics: the EOS targets (easy) are left out of answer_ce and answer_acc.
    counts = answer_counts(stats, batch)
    metrics = {"loss": loss, "ce": ce, "vq": vq, "mi": mi, "aux": aux, "context_ce": context,
               "answer_ce": counts["n/answer_ce_sum"] / jnp.maximum(counts["n/answer_tokens"], 1.0),
               "answer_acc": counts["n/answer_correct"][0] / jnp.maximum(counts["n/answer_present"][0], 1.0),
               "router_perplexity": out.route.perplexity, **counts}
    return loss, metrics


def model_loss(model, batch: dict, critic, cfg: LossConfig, *, train: bool
               ) -> tuple[jax.Array, dict, ICLMHidden, TokenStats]:
    """(loss, metrics, forward pass, statistics) of an ICLM on a batch: the training objective."""
    out = model.forward(batch, train=train)
    stats = model_stats(model, out, batch, cfg)          # logits only where a loss or metric reads them
    loss, metrics = total_loss(out, stats, batch, critic, cfg)
    return loss, metrics, out, stats
