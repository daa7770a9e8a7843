"""Vector-quantisation codebook helpers: squared distances, k-means++ seeding, row sampling, and the
purity of a code assignment against labels (how the router's modules line up with the domains)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sqdist(x: jax.Array, c: jax.Array) -> jax.Array:
    """[N, c], [K, c] -> [N, K] squared L2, by explicit difference (exact for near points)."""
    return jnp.sum(jnp.square(x[:, None, :] - c[None, :, :]), axis=-1)


def kmeans_plus_plus(key: jax.Array, x: jax.Array, k: int,
                     mask: jax.Array | None = None) -> jax.Array:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): [N, c] -> [k, c] rows of ``x``.

    First pick uniform over the (``mask``-ed) rows, each next pick with probability ∝ D², the
    squared distance to the nearest pick so far. If every remaining weight is 0 (fewer distinct
    rows than k) it falls back to uniform, so duplicates are possible only then. Jit-able with
    ``k`` static.
    """
    x = jnp.asarray(x, jnp.float32)
    m = jnp.ones(x.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    m = jnp.where(m.sum() > 0, m, 1.0)           # nothing valid: use every row
    keys = jax.random.split(key, k)
    first = jax.random.categorical(keys[0], jnp.log(m))
    centers = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(x[first])
    d2 = jnp.sum(jnp.square(x - x[first]), axis=-1)

    def body(i, carry):
        centers, d2 = carry
        w = d2 * m
        w = jnp.where(w.sum() > 0, w, m)
        j = jax.random.categorical(keys[i], jnp.log(w))
        centers = centers.at[i].set(x[j])
        return centers, jnp.minimum(d2, jnp.sum(jnp.square(x - x[j]), axis=-1))

    centers, _ = jax.lax.fori_loop(1, k, body, (centers, d2))
    return centers


def sample_rows(key: jax.Array, weight: jax.Array, k: int) -> jax.Array:
    """k row indices drawn ∝ ``weight`` [B] without replacement when k <= B (Gumbel top-k)."""
    logits = jnp.log(weight)
    if k <= weight.shape[0]:
        return jax.lax.top_k(logits + jax.random.gumbel(key, weight.shape), k)[1]
    return jax.random.categorical(key, logits, shape=(k,))


def purity(assign, labels, num_codes: int, num_labels: int) -> float:
    """Fraction of labelled rows whose code's majority label equals their own label (NumPy).

    Rows with a negative label (unknown) are ignored; NaN when no row is labelled.
    """
    assign = np.asarray(assign).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if assign.shape != labels.shape:
        raise ValueError(f"purity: assign {assign.shape} and labels {labels.shape} differ")
    keep = labels >= 0
    if not keep.any():
        return float("nan")
    table = np.zeros((num_codes, num_labels), np.int64)
    np.add.at(table, (assign[keep], labels[keep]), 1)
    return float(purity_of_counts(table))


def purity_of_counts(counts):
    """Purity of a code x label count table [C, L] (NumPy, or jax inside a step): each code's majority
    label count, summed, over all counted rows; 0 when nothing is counted."""
    return counts.max(axis=1).sum() / jnp.maximum(counts.sum(), 1)
