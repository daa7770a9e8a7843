"""The canon layer on the token embeddings (``TransformerConfig.canon = K``): a causal depthwise
convolution of width K with a residual, over each token's predecessors in the sequence it attends
over. Not a Llama layer: a model with it has no transformers counterpart and is not exported.
``canon_mix`` is the full-sequence form; ``Transformer.extend`` reads the predecessors from its KV
cache and shares ``canon_sum``."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def canon_sources(positions: jax.Array, segments: jax.Array, i: int) -> tuple[jax.Array, jax.Array]:
    """Where each token's i-th predecessor is, in the sequence that token attends over.

    -> (index int [B, L], valid bool [B, L]). The predecessor is the token at position ``p - i``
    that the attention rule lets a token at position p see: the earlier token of its own segment,
    or, past its segment's start, the prefix (segment 1) token at that position. Row layout of the
    pipeline: the prefix fills indices 0.. with position = index, and a query segment continues its
    positions. A source that is not at position ``p - i`` in the own segment or the prefix (another
    layout, padding) is not valid, so a packed row mixes exactly what each query's unpacked row
    mixes.
    """
    n = segments.shape[1]
    t = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, :], segments.shape)
    back = jnp.clip(t - i, 0, n - 1)
    own = (t - i >= 0) & (jnp.take_along_axis(segments, back, 1) == segments)
    src = jnp.clip(jnp.where(own, t - i, positions - i), 0, n - 1)
    seg_src = jnp.take_along_axis(segments, src, 1)
    valid = ((segments != 0) & (positions - i >= 0)
             & (jnp.take_along_axis(positions, src, 1) == positions - i)
             & ((seg_src == segments) | (seg_src == 1)))
    return src, valid


def canon_mix(x: jax.Array, w: jax.Array, positions: jax.Array, segments: jax.Array) -> jax.Array:
    """A canon layer (Allen-Zhu, "Physics of Language Models: Part 4.1", 2025) on the embeddings:
    ``x_t + sum_i w[i] * x_(t-i)``, a causal depthwise convolution of width K = len(w) (tap 0 is the
    token itself) with a residual, over each token's predecessors as ``canon_sources`` finds them.

    Why: a token then carries its K-1 predecessors. In the compact ACRE renderings an object follows
    its panel's light word (``on o36``; text ``on blue sphere rubber``), so with K = 4 an object's last
    token holds both its identity and its light, and matching a query object with its earlier
    occurrences needs one attention step instead of the two-layer previous-token + induction circuit
    a plain decoder finds only after a long plateau (experiments/results/learnability.md).
    x float32 [B, L, d], w [K, d] -> float32 [B, L, d].
    """
    def predecessor(i):
        src, valid = canon_sources(positions, segments, i)
        return jnp.take_along_axis(x, src[..., None], 1), valid
    return canon_sum(x, w, predecessor)


def canon_sum(x: jax.Array, w: jax.Array, predecessor) -> jax.Array:
    """``x + w[0] * x + sum_(i>=1) w[i] * x_i`` where ``predecessor(i)`` -> (x_i [B, L, d], valid
    bool [B, L]) gives each token's i-th predecessor; invalid ones count as zero."""
    out = x + w[0] * x
    for i in range(1, w.shape[0]):
        xs, valid = predecessor(i)
        out = out + w[i] * jnp.where(valid[..., None], xs, 0.0)
    return out
