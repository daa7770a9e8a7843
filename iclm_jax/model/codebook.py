"""Vector-quantisation codebook helpers: squared distances, k-means++ seeding (also of new codes beside fixed
ones, for continual learning), row sampling, the removal cost and split gain of codes (the router's
relocation), the purity of a code assignment against labels (how the router's modules line up with the
domains), and a one-line report of unused modules."""
from __future__ import annotations

from typing import NamedTuple

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


def extend_codes(key: jax.Array, x: jax.Array, codes: jax.Array, k: int, mask: jax.Array | None = None,
                 lloyd_steps: int = 10) -> jax.Array:
    """``k`` new codes for the rows ``x`` [N, c] beside the fixed ``codes`` [K, c] (continual learning: a new
    domain's pooled states, the old domains' codes): [k, c].

    Seeded by k-means++ continued from ``codes`` (each pick drawn ∝ D², the squared distance to the nearest
    code so far, old ones included, so a new code lands on rows the old codes serve worst), then
    ``lloyd_steps`` Lloyd iterations that move the new codes only: each new code becomes the mean of the
    (``mask``-ed) rows nearest to it among all codes; a new code no row is nearest to stays where it is."""
    x = jnp.asarray(x, jnp.float32)
    codes = jnp.asarray(codes, jnp.float32)
    m = jnp.ones(x.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    m = jnp.where(m.sum() > 0, m, 1.0)
    keys = jax.random.split(key, k)
    d2 = jnp.min(sqdist(x, codes), axis=1)
    new = []
    for i in range(k):
        w = d2 * m
        w = jnp.where(w.sum() > 0, w, m)
        j = jax.random.categorical(keys[i], jnp.log(w))
        new.append(x[j])
        d2 = jnp.minimum(d2, jnp.sum(jnp.square(x - x[j]), axis=-1))
    new = jnp.stack(new)
    n_old = codes.shape[0]
    for _ in range(lloyd_steps):
        nearest = jnp.argmin(sqdist(x, jnp.concatenate([codes, new])), axis=1)
        own = jax.nn.one_hot(nearest - n_old, k, dtype=jnp.float32) * m[:, None]     # old codes' rows: zeros
        n = own.sum(0)
        new = jnp.where(n[:, None] > 0, (own.T @ x) / jnp.maximum(n, 1.0)[:, None], new)
    return new


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


class SplitStats(NamedTuple):
    """Per-code quantities of one batch for relocating codes (``split_statistics``); sums over rows."""
    cost: jax.Array    # [K] distortion increase if the code were removed (rows to their second-nearest code)
    gain: jax.Array    # [K] distortion decrease if the code were split in two along ``u`` (see below)
    low: jax.Array     # [K, c] the low half's mean projection on u, times u (a centre minus the code)
    high: jax.Array    # [K, c] the same for the high half (the side of the row that gave u)
    frac: jax.Array    # [K] fraction of the code's counted rows on the high side
    valid: jax.Array   # bool [K] both halves hold a counted row


def split_statistics(key: jax.Array, x: jax.Array, codes: jax.Array, dist: jax.Array,
                     weight: jax.Array) -> SplitStats:
    """Removal cost and split gain of each code on one batch (ELBG, Patanè & Russo 2001, estimated online).

    ``x`` [N, c] rows, ``codes`` [K, c], ``dist`` = sqdist(x, codes), ``weight`` [N] (0: padding). Each
    row belongs to its nearest code. ``cost_i`` = Σ over i's rows of (d² to the second-nearest code − d² to
    i): what the quantisation error would grow by if code i were removed. ``gain_i``: one of i's rows,
    drawn uniformly, gives a direction u from the code; i's other rows are projected on u, cut at their
    mean projection, and ``gain_i`` = n₊ n₋ / n · (p₊ − p₋)² is the error that two centres (one per side,
    at the sides' mean projections) would save over one. The drawn row is left out, so u does not depend
    on the rows projected on it: on one isotropic Gaussian cluster the gain is about (2/π) σ² n whatever
    the dimension c (a split fitted in all c dims would find ~σ² c more in noise alone).
    ``low`` / ``high`` are those two centres minus the code (both along u). Jit-able.
    """
    n_rows, k = dist.shape
    w = weight.astype(jnp.float32)
    nearest = jnp.argmin(dist, axis=1)
    own = jax.nn.one_hot(nearest, k, dtype=jnp.float32)                      # [N, K]
    d1 = jnp.min(dist, axis=1)
    d2 = jnp.min(jnp.where(own > 0, jnp.inf, dist), axis=1)
    cost = (own * (w * jnp.where(jnp.isfinite(d2), d2 - d1, 0.0))[:, None]).sum(0)
    # One row per code, uniform over its counted rows (Gumbel-max), gives the direction u.
    member = (own * w[:, None]) > 0
    pick = jnp.argmax(jnp.where(member, jax.random.gumbel(key, (n_rows, k)), -jnp.inf), axis=0)
    u = x[pick] - codes                                                      # [K, c]
    norm = jnp.sqrt(jnp.sum(u * u, axis=-1, keepdims=True))
    u = jnp.where(norm > 0, u / jnp.where(norm > 0, norm, 1.0), 0.0)
    proj = jnp.sum((x - codes[nearest]) * u[nearest], axis=-1)              # [N]
    a = own * (w * (pick[nearest] != jnp.arange(n_rows)))[:, None]          # counted rows, drawn row out
    n = a.sum(0)
    mean = (a.T @ proj) / jnp.maximum(n, 1e-12)
    hi = a * (proj >= mean[nearest])[:, None]
    n_hi = hi.sum(0)
    n_lo = n - n_hi
    m_hi = (hi.T @ proj) / jnp.maximum(n_hi, 1e-12)
    m_lo = (a.T @ proj - hi.T @ proj) / jnp.maximum(n_lo, 1e-12)
    valid = (n_hi > 0) & (n_lo > 0)
    gain = jnp.where(valid, n_hi * n_lo / jnp.maximum(n, 1e-12) * jnp.square(m_hi - m_lo), 0.0)
    return SplitStats(cost, gain, m_lo[:, None] * u, m_hi[:, None] * u, n_hi / jnp.maximum(n, 1e-12), valid)


def collapse_report(route_counts, num_domains: int | None = None, *, floor: float = 0.05) -> str | None:
    """One line naming the modules that (almost) no row is routed to, else None (NumPy, host side).

    ``route_counts`` [K]: rows per module (e.g. over an eval set). A module is unused when it receives at
    most ``floor`` of an even share (total / K) of the rows; None when every module gets more, when K < 2
    or when no row was counted. ``num_domains`` (optional) adds how the used modules compare with it.
    E.g. "modules 1, 2 of 4 receive no rows (routes 419 / 0 / 0 / 181): the router uses 2 modules".
    """
    c = np.asarray(route_counts, dtype=np.float64).reshape(-1)
    k, total = c.size, float(c.sum()) if c.size else 0.0
    if k < 2 or not total > 0:
        return None
    unused = np.flatnonzero(c <= floor * total / k)
    if unused.size == 0:
        return None
    whole = bool(np.all(c == np.round(c)))
    routes = " / ".join(str(int(x)) if whole else f"{x:.3g}" for x in c)
    names = ", ".join(str(int(i)) for i in unused)
    none = bool(np.all(c[unused] == 0))
    what = "no rows" if none else "almost no rows"
    note = "" if none else f"; at most {floor:.0%} of an even share"
    used = k - unused.size
    line = (f"{'module' if unused.size == 1 else 'modules'} {names} of {k} receive{'s' if unused.size == 1 else ''} "
            f"{what} (routes {routes}{note}): the router uses {used} module{'' if used == 1 else 's'}")
    if num_domains is not None:
        if used < num_domains:
            line += f", fewer than the {num_domains} domains"
        else:
            line += f" for {num_domains} domain{'' if num_domains == 1 else 's'}"
    return line
