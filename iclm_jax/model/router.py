"""Unsupervised vector-quantisation router (ICLM, Gendron et al. 2024).

Each row's prompt is pooled into one embedding ``e``, optionally projected to ``c`` dims, and
routed to the nearest of ``K`` codes (squared L2). The codebook is a k-means quantiser of the prompt
embeddings: it is seeded by k-means++ on the first training batch and then follows either the VQ-VAE
EMA update (``update="ema"``, the codebook is router state, never seen by the optimiser) or the
VQ-VAE loss (``update="gradient"``, the codebook is an ``nnx.Param``). A code that serves (almost) no
rows, or whose removal would cost less than splitting another code gains, is relocated onto a split of
that other code (ELBG, Patanè & Russo 2001), so no module starves. Everything runs inside ``jax.jit``
with value-dependent choices made by ``lax.cond`` / ``jnp.where``: one compilation serves the run.

EMA recurrence (train step, ``n_i`` = valid rows nearest to code ``i``, ``s_i`` = their summed
projected embeddings, ``γ`` = ema_decay, ``share = n_valid / K``)::

    first call only:  codebook ← kmeans++(batch);  N_i ← share;  m_i ← share · codebook_i;  R_i, G_i ← 0
    N_i ← γ N_i + (1 − γ) n_i          m_i ← γ m_i + (1 − γ) s_i
    Ñ_i = (N_i + ε) / (Σ N + K ε) · Σ N      (Laplace smoothing; N itself is stored unsmoothed)
    codebook_i ← m_i / Ñ_i
    R_i ← γ R_i + (1 − γ) r_i          G_i ← γ G_i + (1 − γ) g_i          (codebook.split_statistics)
        r_i: removal cost, Σ over i's rows of (d² to their second-nearest code − d² to code i)
        g_i: split gain: a row of i drawn at random gives a direction u from code i; i's other rows are
             projected on u and cut at their mean projection; g_i = n₊ n₋ / n · (p₊ − p₋)², the error
             two centres at the halves' mean projections p± would save over one (1-d: it does not grow
             with c, as a split fitted to the rows in all c dims would)
    relocation, at most one code per step (r, g, the directions and halves from the batch and the
    codebook before this step's update):
        dead:  N_i < dead_threshold · share
        i = a dead code if any, else argmin R;   j = argmax G over the codes ≠ i that are not dead
        move if j's split has a row on each side and (i is dead, or relocate and R_i < G_j):
            codebook_i ← codebook_j + p₊ u;  codebook_j ← codebook_j + p₋ u      (j split in two)
            N_i ← f N_j;  N_j ← (1 − f) N_j  (f: j's rows on the + side);  m ← N · codebook for both
            R_i, R_j ← G_j  (removing either half undoes the split);  G_i, G_j ← 0;  relocations += 1

A code that stops receiving rows has R_i decaying by γ a step while the G of a code covering two
clusters grows, so it moves within a few to tens of steps (a code never used since the k-means++ init
has R_i = 0 and moves on the first step some split gains anything); the ``dead_threshold`` rule alone
would take log(dead_threshold) / log(γ) steps (≈ 690 for 1e-3 and 0.99). With more codes than clusters,
the clusters are split between codes (each split lowers the error), and a configuration stays once
no removal costs less than some split gains, so codes do not keep moving between clusters
(tests/test_router_clusters.py: K = 4 on 2 clusters gives two codes per cluster, or three and one).

``update="gradient"`` keeps the same N, R, G recurrences and writes the codebook Param only for the
k-means++ init and relocation; the VQ loss moves it otherwise.

Routing uses the statistics *before* this step's update (the usual VQ convention).

Continual learning (``Router.freeze_codes(n)``, ``train/continual.py``): the first ``n`` codes belong to
modules trained earlier on other domains and must keep routing those domains as before. A train step then
leaves their codebook rows and statistics (N, m, R, G) as they are, never relocates them nor onto a split of
them, and neither updates the running mean nor centres on the batch mean: training centres on the stored
mean, as evaluation does, so the codes the new domain's rows are routed to during training are those they
are routed to afterwards. With ``n = 0`` (the default) nothing of this runs.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from iclm_jax.model.codebook import kmeans_plus_plus, split_statistics, sqdist

UPDATES = ("ema", "gradient")
MODES = ("hard", "soft", "gumbel", "oracle")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """The ``router`` config group as the router reads it (``router.source`` and ``router.weight`` belong to
    the ICLM and the loss)."""
    proj_dim: int = 0             # 0: route on the pooled embedding itself; else a learned projection
    update: str = "ema"           # UPDATES: codebook by EMA k-means or by gradient
    mode: str = "hard"            # MODES
    ema_decay: float = 0.99
    eps: float = 1e-5
    commitment: float = 0.25
    dead_threshold: float = 1e-3  # a code whose EMA row count N_i < this · (n_valid / K) is relocated at once
    relocate: bool = True         # also relocate a code when that lowers the estimated distortion (ELBG)
    temperature: float = 1.0      # soft and gumbel modes
    center: bool = False
    normalize: bool = False

    def __post_init__(self):
        if self.update not in UPDATES:
            raise ValueError(f"Router update={self.update!r}: expected one of {UPDATES}")
        if self.mode not in MODES:
            raise ValueError(f"Router mode={self.mode!r}: expected one of {MODES}")
        if self.proj_dim < 0:
            raise ValueError(f"Router proj_dim={self.proj_dim}: expected >= 0")
        if not 0.0 <= self.ema_decay < 1.0 or self.temperature <= 0:
            raise ValueError(f"Router: ema_decay={self.ema_decay} must be in [0, 1), "
                             f"temperature={self.temperature} > 0")


class RouterStat(nnx.Variable):
    """Non-trainable router state (EMA statistics, flags): checkpointed, never optimised."""


class RouteOut(NamedTuple):
    index: jax.Array       # int32 [B] chosen module per row
    weights: jax.Array     # float32 [B, K] (see Router.__call__)
    vq_loss: jax.Array     # float32 scalar
    distances: jax.Array   # float32 [B, K] squared L2 to each code (pre-update codebook)
    perplexity: jax.Array  # float32 scalar exp(H(mean assignment)) in [1, K]


def pool_prompt(h: jax.Array, prompt_mask: jax.Array) -> jax.Array:
    """Masked mean of ``h`` [B, L, d] over prompt tokens ([B, L]) in float32; rows without any -> 0.

    The router must see the prompt only: padding and answer tokens would leak the target or the
    sequence length into the routing decision.
    """
    if h.ndim != 3 or prompt_mask.shape != h.shape[:2]:
        raise ValueError(f"pool_prompt: h {h.shape} must be [B, L, d] and prompt_mask "
                         f"{prompt_mask.shape} must be [B, L]")
    m = prompt_mask.astype(jnp.float32)
    s = jnp.einsum("bld,bl->bd", h.astype(jnp.float32), m)
    n = m.sum(axis=1, keepdims=True)
    return jnp.where(n > 0, s / jnp.maximum(n, 1.0), 0.0)


def _rng_stream(rngs: nnx.Rngs) -> nnx.RngStream:
    """The ``router`` stream if given (else ``default``, else ``params``), forked for the router."""
    if "router" in rngs or "default" in rngs:
        return rngs["router"].fork()
    return rngs.params.fork()


class Router(nnx.Module):
    """Nearest-code router over pooled prompt embeddings; the module docstring gives the update."""

    def __init__(self, d_in: int, num_codes: int, config: RouterConfig = RouterConfig(), *, rngs: nnx.Rngs,
                 **overrides):
        """``overrides``: RouterConfig fields replacing those of ``config`` (``Router(d, k, mode="soft")``)."""
        cfg = dataclasses.replace(config, **overrides) if overrides else config
        if num_codes < 1 or d_in < 1:
            raise ValueError(f"Router: need num_codes >= 1, d_in >= 1; got {num_codes}, {d_in}")
        self.cfg = cfg
        self.d_in, self.num_codes, self.update, self.mode = d_in, num_codes, cfg.update, cfg.mode
        self.ema_decay, self.eps, self.commitment = cfg.ema_decay, cfg.eps, cfg.commitment
        self.dead_threshold, self.temperature = cfg.dead_threshold, cfg.temperature
        self.relocate = cfg.relocate
        proj_dim, update, center, normalize = cfg.proj_dim, cfg.update, cfg.center, cfg.normalize
        c = proj_dim or d_in
        self.code_dim = c
        self.proj = (nnx.Param(jax.nn.initializers.lecun_normal()(rngs.params(), (d_in, c)),
                               out_sharding=("embed", None)) if proj_dim else None)
        codes = jax.random.normal(rngs.params(), (num_codes, c), jnp.float32)
        code_t = nnx.Param if update == "gradient" else RouterStat
        self.codebook = code_t(codes, out_sharding=("codes", None))
        if update == "ema":
            self.ema_sums = RouterStat(jnp.array(codes, copy=True), out_sharding=("codes", None))
        self.counts = RouterStat(jnp.ones((num_codes,), jnp.float32), out_sharding=("codes",))
        # Moving average of the mean routing weights: logged as route_usage (smoother than one batch).
        self.usage = RouterStat(jnp.full((num_codes,), 1.0 / num_codes, jnp.float32),
                                out_sharding=("codes",))
        self.initialized = RouterStat(jnp.array(False))
        # Relocation statistics (module docstring): EMA removal cost and split gain per code, and how
        # many codes have been relocated so far (a run can log it).
        self.removal_cost = RouterStat(jnp.zeros((num_codes,), jnp.float32), out_sharding=("codes",))
        self.split_gain = RouterStat(jnp.zeros((num_codes,), jnp.float32), out_sharding=("codes",))
        self.relocations = RouterStat(jnp.array(0, jnp.int32))
        self.rng = _rng_stream(rngs)
        self.center, self.normalize = center, normalize
        if center:
            self.mean = RouterStat(jnp.zeros((d_in,), jnp.float32), out_sharding=("embed",))
        self.frozen_codes = 0      # freeze_codes: the first n codes stay as they are (continual learning)

    def freeze_codes(self, n: int) -> None:
        """Keep the first ``n`` codes (and the running mean) fixed in every later train step (module docstring);
        a static setting (one compilation), not state: a checkpoint of the router restores under any ``n``."""
        if not 0 <= n < self.num_codes:
            raise ValueError(f"Router.freeze_codes({n}): expected 0 <= n < num_codes={self.num_codes} (at least "
                             "one code must stay free to learn)")
        self.frozen_codes = int(n)

    def standardize(self, e: jax.Array, v: jax.Array, train: bool) -> jax.Array:
        """Optionally subtract a running mean and L2-normalise the pooled embeddings.

        Pooled states of a base that trains from scratch share a large, drifting common component;
        the domain signal is the (small) rest. Centring removes the common part, normalising removes
        the drifting scale, so the lagging EMA codebook stays meaningful (cosine routing, as in
        improved VQGAN). Like batch norm, training centres on the batch mean and keeps an EMA of it (same
        decay as the codes) that evaluation uses.
        """
        e = e.astype(jnp.float32)
        if self.center:
            m = self.mean[...]
            if train and not self.frozen_codes:
                n = v.sum()
                bm = jnp.sum(e * v[:, None], axis=0) / jnp.maximum(n, 1.0)
                g = self.ema_decay
                new = jnp.where(self.initialized[...], g * m + (1.0 - g) * bm, bm)
                self.mean[...] = jnp.where(n > 0, jax.lax.stop_gradient(new), m)
                m = jnp.where(n > 0, bm, m)     # train: the batch mean (like batch norm)
            e = e - jax.lax.stop_gradient(m)
        if self.normalize:
            e = e * jax.lax.rsqrt(jnp.sum(e * e, axis=-1, keepdims=True) + 1e-12)
        return e

    def project(self, e: jax.Array) -> jax.Array:
        e = e.astype(jnp.float32)
        return e if self.proj is None else e @ self.proj[...]

    def __call__(self, e: jax.Array, *, domain: jax.Array | None = None, train: bool = False,
                 valid: jax.Array | None = None) -> RouteOut:
        """Route ``e`` [B, d_in] (float32 pooled prompts) to one of K modules.

        ``weights``: one-hot for hard/oracle; soft: softmin(distances / temperature); gumbel:
        train samples index = argmax(softmax((−distances + g) / T)) and returns its straight-through
        one-hot (forward exactly one-hot, gradient of the relaxed softmax); eval: argmin, one-hot.
        oracle: index = ``domain`` mod K (so an unknown domain −1 goes to module K−1 — callers
        should mask such rows out); ``domain`` is required (ValueError otherwise).
        ``vq_loss`` and the codebook statistics always use the nearest code, whatever the mode:
        the codebook stays an unsupervised quantiser (so its purity can be reported under oracle).
        ``valid`` (optional [B], default all ones) drops rows (e.g. batch padding) from statistics,
        loss and perplexity. ``vq_loss`` is a mean over valid rows of squared L2 norms (summed over
        the c dims). Train mode updates state (module docstring); eval changes none, and before the
        first train call it routes with the random initial codebook.
        """
        k = self.num_codes
        if e.ndim != 2 or e.shape[1] != self.d_in:
            raise ValueError(f"Router: e has shape {e.shape}, expected [B, {self.d_in}]")
        b = e.shape[0]
        if self.mode == "oracle":
            if domain is None:
                raise ValueError("Router mode='oracle' needs domain (int32 [B], batch['domain'])")
            if domain.shape != (b,):
                raise ValueError(f"Router: domain has shape {domain.shape}, expected ({b},)")
        v = (jnp.ones((b,), jnp.float32) if valid is None
             else jnp.asarray(valid, jnp.float32).reshape(b))
        n_valid = v.sum()
        z = self.project(self.standardize(e, v, train))
        zs = jax.lax.stop_gradient(z)
        init = self.initialized[...]
        key = self.rng() if train else None

        codebook = self.codebook[...]
        if train:
            k_init, k_seed, k_gumbel = jax.random.split(key, 3)
            codebook = jax.lax.cond(init, lambda: codebook,
                                    lambda: kmeans_plus_plus(k_init, zs, k, mask=v))
        dist = sqdist(z, codebook)
        nearest = jnp.argmin(dist, axis=1).astype(jnp.int32)
        hard = jax.nn.one_hot(nearest, k, dtype=jnp.float32)

        # VQ loss on the nearest code: mean over valid rows of squared L2 norms.
        c_sel = codebook[nearest]
        row = lambda a: jnp.sum(a * v) / jnp.maximum(n_valid, 1.0)  # noqa: E731
        commit = self.commitment * row(jnp.sum(jnp.square(z - jax.lax.stop_gradient(c_sel)), -1))
        vq_loss = commit
        if self.update == "gradient":
            vq_loss = vq_loss + row(jnp.sum(jnp.square(zs - c_sel), -1))

        index, weights = nearest, hard
        if self.mode == "soft":
            weights = jax.nn.softmax(-dist / self.temperature, axis=1)
        elif self.mode == "gumbel" and train:
            logits = (-dist + jax.random.gumbel(k_gumbel, dist.shape)) / self.temperature
            y = jax.nn.softmax(logits, axis=1)
            index = jnp.argmax(logits, axis=1).astype(jnp.int32)
            weights = jax.nn.one_hot(index, k, dtype=jnp.float32) + (y - jax.lax.stop_gradient(y))
        elif self.mode == "oracle":
            index = jnp.mod(domain.astype(jnp.int32), k)
            weights = jax.nn.one_hot(index, k, dtype=jnp.float32)

        p = jnp.sum(weights * v[:, None], axis=0) / jnp.maximum(n_valid, 1.0)
        entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
        perplexity = jnp.exp(entropy)

        if train:
            self._update_state(zs, v, n_valid, hard, jax.lax.stop_gradient(codebook),
                               jax.lax.stop_gradient(p), k_seed)
        return RouteOut(index, weights, vq_loss, dist, perplexity)

    def _update_state(self, zs, v, n_valid, hard, codebook, p, key) -> None:
        """EMA statistics, code relocation, init flag; no valid row in the batch: no change."""
        k, g = self.num_codes, self.ema_decay
        init = self.initialized[...]
        ok = n_valid > 0
        share = n_valid / k
        onehot = hard * v[:, None]
        n = onehot.sum(axis=0)
        counts = g * jnp.where(init, self.counts[...], share) + (1.0 - g) * n
        if self.update == "ema":
            s = onehot.T @ zs
            sums = g * jnp.where(init, self.ema_sums[...], share * codebook) + (1.0 - g) * s
            total = counts.sum()
            smoothed = (counts + self.eps) / (total + k * self.eps) * total
            new_codes = sums / smoothed[:, None]
        else:
            new_codes = codebook
        # Relocation (module docstring): at most one code per step leaves for a split of another.
        st = split_statistics(key, zs, codebook, sqdist(zs, codebook), v)
        warm = lambda old, new: g * jnp.where(init, old, 0.0) + (1.0 - g) * new  # noqa: E731
        cost, gain = warm(self.removal_cost[...], st.cost), warm(self.split_gain[...], st.gain)
        codes_k = jnp.arange(k)
        free = codes_k >= self.frozen_codes                   # all codes unless some are frozen
        if self.frozen_codes:       # frozen codes keep their row and statistics, and take no part in relocation
            fixed = lambda new, old: jnp.where(free.reshape((k,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
            counts, cost, gain = (fixed(counts, self.counts[...]), fixed(cost, self.removal_cost[...]),
                                  fixed(gain, self.split_gain[...]))
            new_codes = fixed(new_codes, codebook)
            if self.update == "ema":
                sums = fixed(sums, self.ema_sums[...])
        dead = counts < self.dead_threshold * share
        if self.frozen_codes:
            dead = dead & free
            i = jnp.argmin(jnp.where(free, jnp.where(dead, -jnp.inf, cost), jnp.inf))
            target = jnp.where((codes_k != i) & ~dead & free, gain, -jnp.inf)
        else:
            i = jnp.argmin(jnp.where(dead, -jnp.inf, cost))
            target = jnp.where((codes_k != i) & ~dead, gain, -jnp.inf)
        j = jnp.argmax(target)
        better = (cost[i] < gain[j]) if self.relocate else jnp.array(False)
        move = ok & (k > 1) & jnp.isfinite(target[j]) & st.valid[j] & (dead[i] | better)
        if self.frozen_codes:
            move = move & free[i] & free[j]
        to_i, to_j = move & (codes_k == i), move & (codes_k == j)
        split = to_i | to_j
        new_codes = jnp.where(to_i[:, None], codebook[j] + st.high[j],
                              jnp.where(to_j[:, None], codebook[j] + st.low[j], new_codes))
        counts = jnp.where(to_i, counts[j] * st.frac[j], jnp.where(to_j, counts[j] * (1.0 - st.frac[j]), counts))
        cost = jnp.where(split, gain[j], cost)      # removing either half would undo the split
        gain = jnp.where(split, 0.0, gain)
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        if self.update == "ema":
            sums = jnp.where(split[:, None], counts[:, None] * new_codes, sums)
            self.ema_sums[...] = keep(sums, self.ema_sums[...])
            self.codebook[...] = keep(new_codes, self.codebook[...])
        else:
            # Gradient mode: only the k-means++ init and relocation overwrite the Param.
            changed = jnp.logical_or(~init, move)
            self.codebook[...] = jnp.where(ok & changed, new_codes, self.codebook[...])
        self.counts[...] = keep(counts, self.counts[...])
        self.removal_cost[...] = keep(cost, self.removal_cost[...])
        self.split_gain[...] = keep(gain, self.split_gain[...])
        self.relocations[...] = self.relocations[...] + move.astype(jnp.int32)
        self.usage[...] = keep(g * self.usage[...] + (1.0 - g) * p, self.usage[...])
        self.initialized[...] = jnp.logical_or(init, ok)
