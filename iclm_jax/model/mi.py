"""Mutual-information estimators for the ICLM independence penalty λ·Î(invariant; specific).

``x`` [B, dx] and ``z`` [B, dz] are the pooled per-sequence representations of the invariant
module and of the routed specific module. Two estimators:

* **MINE** (Belghazi et al. 2018): a critic ``T(x, z)`` and the Donsker–Varadhan bound
  ``I_DV = mean_b T(x_b, z_b) - log mean_b exp T(x_b, z_{(b+1) mod B})``. The marginal samples
  come from rolling ``z`` one step along the batch axis (a global roll under ``jax.jit`` with a
  sharded batch). The critic *ascends* the bound with its own optimiser through
  :func:`mine_critic_objective` (bias-corrected gradient, see there); the language model
  *descends* ``λ·mine_estimate(critic, x, z)`` with the critic held fixed.
* **plugin** (the ICLM paper's estimator, :func:`plugin_mi`): KL between the batch joint of the
  per-sample softmax distributions over hidden dims and the product of their batch marginals.

Critic parameter logical axis names (map them in the sharding rules; replicating them is fine,
the critic is tiny):

| param | shape | logical names |
|---|---|---|
| ``layers[0].kernel`` | [dx + dz, hidden] | ``("mi_in", "mi_hidden")`` |
| ``layers[i].kernel``, 0 < i < depth | [hidden, hidden] | ``("mi_hidden", "mi_hidden")`` |
| ``layers[i].bias``, i < depth | [hidden] | ``("mi_hidden",)`` |
| ``out.kernel`` | [hidden, 1] | ``("mi_hidden", None)`` |

The output layer has no bias: the DV bound is unchanged by adding a constant to ``T``, so that bias would
have an exactly zero true gradient, and Adam would turn its rounding noise into lr-sized random steps.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

ESTIMATORS = ("mine", "plugin", "none")
APPLY_TO = ("routed", "all")
POOLS = ("prompt", "answer")     # the states the estimate reads: prompt-pooled, or answer-position-pooled
REDUCE = ("mean", "sum")         # over the K modules with apply_to="all" (the official code sums)


@dataclasses.dataclass(frozen=True)
class MIConfig:
    """The ``mi`` config group: the estimator and weight (read by the loss), what it is applied to (the
    model), the MINE critic's shape and optimiser (the train state) and its moving average (the step)."""
    estimator: str = "mine"       # ESTIMATORS
    weight: float = 0.1           # λ
    reverse: bool = False         # plugin only: the official code's KL(product || joint)
    apply_to: str = "routed"      # APPLY_TO: the routed specific module, or every one (the paper)
    pool: str = "prompt"          # POOLS (read by the model, ICLMConfig.mi_pool)
    reduce: str = "mean"          # REDUCE: the K estimates of apply_to="all" are averaged or summed
    critic_hidden: int = 64
    critic_depth: int = 2
    critic_lr: float = 1e-3
    ema_decay: float = 0.99       # of the DV denominator (bias-corrected critic gradient)
    clip: float = 20.0            # marginal critic scores are capped at clip inside the exponent

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"mi.estimator={self.estimator!r}: expected one of {ESTIMATORS}")
        if self.apply_to not in APPLY_TO:
            raise ValueError(f"mi.apply_to={self.apply_to!r}: expected one of {APPLY_TO}")
        if self.pool not in POOLS:
            raise ValueError(f"mi.pool={self.pool!r}: expected one of {POOLS}")
        if self.reduce not in REDUCE:
            raise ValueError(f"mi.reduce={self.reduce!r}: expected one of {REDUCE}")
        if self.weight < 0:
            raise ValueError(f"mi.weight={self.weight}: expected >= 0")


_INIT = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class _Dense(nnx.Module):
    """Affine layer with logical axis names on its params, float32 accumulation and a float32 bias.

    Not ``nnx.Linear(kernel_metadata=...)``: that draws an RNG key for the (zero) bias too, which would
    shift every later critic layer's initialisation (recorded runs would not reproduce), and it adds the
    bias in the compute dtype (bfloat16), where this adds it to the float32 accumulator.
    """

    def __init__(self, n_in: int, n_out: int, names: tuple, *, rngs: nnx.Rngs, bias: bool = True):
        self.kernel = nnx.Param(_INIT(rngs.params(), (n_in, n_out), jnp.float32),
                                out_sharding=names)
        self.bias = nnx.Param(jnp.zeros((n_out,), jnp.float32), out_sharding=(names[1],)) if bias else None

    def __call__(self, h: jax.Array, dtype) -> jax.Array:
        y = jnp.dot(h.astype(dtype), self.kernel[...].astype(dtype),
                    preferred_element_type=jnp.float32)
        return y if self.bias is None else y + self.bias[...]


class MineCritic(nnx.Module):
    """MLP critic ``T(x, z) = MLP(concat[x, z])`` -> one float32 score per sample.

    ``depth`` hidden layers of width ``hidden`` with ELU (smooth, so the quadratic log density
    ratios of Gaussian-like data are easy to fit). ``dtype`` is the matmul compute dtype;
    accumulation, activations and the score are float32 because the DV bound exponentiates them.
    """

    def __init__(self, x_dim: int, z_dim: int, *, hidden: int = 128, depth: int = 2,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if depth < 1:
            raise ValueError(f"MineCritic: depth must be >= 1, got depth={depth}")
        self.x_dim, self.z_dim, self.dtype = x_dim, z_dim, dtype
        layers = [_Dense(x_dim + z_dim, hidden, ("mi_in", "mi_hidden"), rngs=rngs)]
        layers += [_Dense(hidden, hidden, ("mi_hidden", "mi_hidden"), rngs=rngs)
                   for _ in range(depth - 1)]
        self.layers = nnx.List(layers)
        self.out = _Dense(hidden, 1, ("mi_hidden", None), rngs=rngs, bias=False)

    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        if x.ndim != 2 or z.ndim != 2 or x.shape[0] != z.shape[0]:
            raise ValueError(f"MineCritic: expected x [B, {self.x_dim}] and z [B, {self.z_dim}], "
                             f"got x {x.shape} and z {z.shape}")
        if x.shape[1] != self.x_dim or z.shape[1] != self.z_dim:
            raise ValueError(f"MineCritic built for x_dim={self.x_dim}, z_dim={self.z_dim}; "
                             f"got x {x.shape}, z {z.shape}")
        h = jnp.concatenate([x.astype(jnp.float32), z.astype(jnp.float32)], axis=-1)
        for layer in self.layers:
            h = jax.nn.elu(layer(h, self.dtype))
        return self.out(h, self.dtype)[:, 0]


def dv_bound(t_joint: jax.Array, t_marg: jax.Array) -> jax.Array:
    """``mean(t_joint) - log mean exp(t_marg)`` in float32, via logsumexp (finite for T ~ 1e3)."""
    t_joint = t_joint.astype(jnp.float32)
    t_marg = t_marg.astype(jnp.float32)
    log_mean_exp = jax.nn.logsumexp(t_marg) - math.log(t_marg.size)
    return jnp.mean(t_joint) - log_mean_exp


def marginal_shift(z: jax.Array, shift: int = 1) -> jax.Array:
    """Pair ``x_b`` with ``z_{(b - shift) mod B}``: samples of p(x)p(z) without new data.

    Only the pairing matters, so the roll direction is irrelevant; ``shift`` must not be a
    multiple of B (that would return the joint).
    """
    if z.shape[0] > 0 and shift % z.shape[0] == 0:
        raise ValueError(f"marginal_shift: shift={shift} is a multiple of batch size "
                         f"{z.shape[0]}, the 'marginal' would equal the joint")
    return jnp.roll(z, shift, axis=0)


def _scores(critic: MineCritic, x: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Joint and marginal critic scores in one MLP pass over the 2B stacked pairs."""
    b = x.shape[0]
    t = critic(jnp.concatenate([x, x], axis=0), jnp.concatenate([z, marginal_shift(z)], axis=0))
    return t[:b], t[b:]


def mine_estimate(critic: MineCritic, x: jax.Array, z: jax.Array) -> jax.Array:
    """Scalar ``I_DV`` (nats), differentiable w.r.t. x, z and the critic.

    The model's penalty is ``λ·mine_estimate``; differentiate it w.r.t. the model only (the
    critic is updated separately by :func:`mine_critic_objective`).
    """
    t_joint, t_marg = _scores(critic, x, z)
    return dv_bound(t_joint, t_marg)


def mine_critic_objective(critic: MineCritic, x: jax.Array, z: jax.Array, ema: jax.Array, *,
                          decay: float = 0.99, clip: float = 20.0
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Critic loss with MINE's bias-corrected gradient. Returns ``(loss, new_ema, i_dv)``.

    Why: the naive DV gradient ``E[∇T_j] - E[e^{T_m} ∇T_m] / E[e^{T_m}]`` divides by a
    minibatch mean and is biased; MINE replaces that denominator by a moving average.

    Exact convention (``T_j``, ``T_m``: joint/marginal scores, ``c = min(T_m, clip)``):

    * ``m = mean_b exp(c_b)`` (no gradient);
    * ``new_ema = m`` if ``ema <= 0`` (0 = "not initialised yet": start the train state at 0),
      else ``new_ema = decay * ema + (1 - decay) * m``;
    * ``i_dv = dv_bound(T_j, T_m)`` (unclipped, stable logsumexp);
    * ``loss = -mean(T_j) + sg(log mean exp T_m) + (mean exp(c) - sg(mean exp(c))) / sg(new_ema)``.

    So ``loss == -i_dv`` in value and
    ``∇loss = -(mean ∇T_j - mean_b[exp(c_b) 1{T_m,b < clip} ∇T_m,b] / new_ema)``: the naive DV
    gradient with the denominator ``mean exp(T_m)`` replaced by ``new_ema`` (and clipped scores
    contributing nothing). With ``ema = 0`` and no clipping it equals ``∇(-i_dv)`` exactly.
    ``x`` and ``z`` are wrapped in ``stop_gradient``: this loss trains the critic only. If every
    ``exp(c)`` underflows (``m == 0``) the EMA stays 0 (uninitialised) and the denominator is
    floored at the smallest normal float32, so the step stays finite.
    """
    x, z = jax.lax.stop_gradient(x), jax.lax.stop_gradient(z)
    ema = jnp.asarray(ema, jnp.float32)
    if ema.shape != ():
        raise ValueError(f"mine_critic_objective: ema must be a scalar array, got {ema.shape}")
    t_joint, t_marg = _scores(critic, x, z)
    exp_c = jnp.exp(jnp.minimum(t_marg, clip))
    batch_mean = jnp.mean(exp_c)
    m = jax.lax.stop_gradient(batch_mean)
    new_ema = jnp.where(ema > 0, decay * ema + (1.0 - decay) * m, m)
    i_dv = dv_bound(t_joint, t_marg)
    log_mean_exp = jax.lax.stop_gradient(jnp.mean(t_joint) - i_dv)
    denom = jax.lax.stop_gradient(jnp.maximum(new_ema, jnp.finfo(jnp.float32).tiny))
    loss = -jnp.mean(t_joint) + log_mean_exp + (batch_mean - m) / denom
    return loss, new_ema, i_dv


def plugin_mi(x: jax.Array, z: jax.Array, *, reverse: bool = False,
              eps: float = 1e-12) -> jax.Array:
    """ICLM's plug-in MI (nats) between per-sample softmax distributions over hidden dims.

    ``joint = mean_b softmax(x_b) ⊗ softmax(z_b)`` [dx, dz], ``prod = mean_b softmax(x_b) ⊗
    mean_b softmax(z_b)``; returns ``KL(joint || prod)``, or ``KL(prod || joint)`` with
    ``reverse=True`` (the direction of the official ICLM code). Both are >= 0 and = 0 iff the
    joint factorises. ``eps`` guards the logs of underflowed entries. float32 throughout.
    """
    if x.ndim != 2 or z.ndim != 2 or x.shape[0] != z.shape[0]:
        raise ValueError(f"plugin_mi: expected x [B, dx] and z [B, dz], got x {x.shape}, "
                         f"z {z.shape}")
    p_x = jax.nn.softmax(x.astype(jnp.float32), axis=-1)
    p_z = jax.nn.softmax(z.astype(jnp.float32), axis=-1)
    joint = jnp.einsum("bi,bj->ij", p_x, p_z, precision=jax.lax.Precision.HIGHEST) / x.shape[0]
    prod = jnp.outer(jnp.mean(p_x, axis=0), jnp.mean(p_z, axis=0))
    p, q = (prod, joint) if reverse else (joint, prod)
    return jnp.sum(p * (jnp.log(p + eps) - jnp.log(q + eps)))
