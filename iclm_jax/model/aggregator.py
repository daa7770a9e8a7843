"""Aggregators: combine the invariant and the routed specific module into next-token logits.

``concat`` (paper default) normalises each module's last hidden state, concatenates them and applies a new
LM head of width 2d. The paper starts that head at random; we start it so that the initial output equals the
mean of the two modules' base-head logits (scale = the base final-norm weight, head = ½[W; W]), so training
starts from the pretrained behaviour. The norm is applied per half (a grouped RMSNorm over the concatenation)
because a joint RMS over 2d would make that exact initialisation impossible.

That head is *derived* from the base: ``concat_head(base)`` is the one rule, applied at construction and
again by ``Aggregator.derive_from(base)`` whenever the base is replaced (pretrained weights loaded after
construction), so a pretrained base gets the head it would have had if it had been there from the start.

``logits`` and ``probs`` mix the base head's outputs with ``invariant_weight``; weight 0 is the
no-invariant ablation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from iclm_jax.model import rows
from iclm_jax.model.transformer import Transformer

AGGREGATORS = ("concat", "logits", "probs")


def _rms(x: jax.Array, eps: float) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class Aggregator(nnx.Module):
    """Maps (x_inv, x_spec) — pre-final-norm hidden states [B, L, d] — to float32 logits [B, L, V]."""

    def __init__(self, base: Transformer, kind: str = "concat", invariant_weight: float = 0.5, *,
                 rngs: nnx.Rngs):
        if kind not in AGGREGATORS:
            raise ValueError(f"model.aggregator={kind!r}: expected one of {AGGREGATORS}")
        if not 0.0 <= invariant_weight <= 1.0:
            raise ValueError(f"model.invariant_weight={invariant_weight}: expected a value in [0, 1]")
        self.kind = kind
        self.invariant_weight = float(invariant_weight)
        cfg = base.cfg
        self.eps = cfg.norm_eps
        self.dtype = cfg.dtype
        if kind == "concat":
            scale, kernel = concat_head(base)
            self.scale = nnx.Param(scale, out_sharding=("embed",))
            self.kernel = nnx.Param(kernel, out_sharding=("embed", "vocab"))

    def derive_from(self, base: Transformer) -> None:
        """Reset the parameters derived from the base (the concat head) to ``concat_head(base)``."""
        if self.kind == "concat":
            scale, kernel = concat_head(base)
            self.scale[...] = scale
            self.kernel[...] = kernel

    def __call__(self, base: Transformer, x_inv: jax.Array, x_spec: jax.Array) -> jax.Array:
        w = self.invariant_weight
        if self.kind == "concat":
            h = jnp.concatenate([_rms(x_inv, self.eps), _rms(x_spec, self.eps)], axis=-1)
            h = (h * self.scale[...]).astype(self.dtype)
            return rows.matmul(h, self.kernel[...].astype(self.dtype), preferred_element_type=jnp.float32)
        l_inv, l_spec = base.logits(x_inv), base.logits(x_spec)
        if self.kind == "logits":
            return w * l_inv + (1.0 - w) * l_spec
        # probs: log of the mixture of the two distributions (a log-prob "logit" for the CE loss)
        lp_inv = jax.nn.log_softmax(l_inv, axis=-1)
        lp_spec = jax.nn.log_softmax(l_spec, axis=-1)
        if w == 0.0:
            return lp_spec
        if w == 1.0:
            return lp_inv
        return jnp.logaddexp(jnp.log(w) + lp_inv, jnp.log1p(-w) + lp_spec)


def concat_head(base: Transformer) -> tuple[jax.Array, jax.Array]:
    """(scale [2d], kernel [2d, V]) of the concat head whose output is the mean of the two modules'
    base-head logits: scale = [g; g] (g the base final-norm weight), kernel = ½[W; W]."""
    g = base.norm.weight[...]
    w = _head_matrix(base)                                   # [d, V]
    return jnp.concatenate([g, g]), 0.5 * jnp.concatenate([w, w], axis=0)


def _head_matrix(base: Transformer) -> jax.Array:
    """The base LM head as a [d, V] matrix (tied: the embedding transposed)."""
    if base.cfg.tie_embeddings:
        return base.embedding[...].T
    return base.lm_head[...]
