"""The train state: everything a resumed run needs, as one NNX object (so one split, one checkpoint).

Holds the ICLM (its router statistics and RNG streams are variables inside it), the model optimiser, the MINE
critic with its own optimiser and the MINE moving average used for the bias-corrected critic gradient.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

from iclm_jax.model.iclm import ICLM, param_filter
from iclm_jax.model.mi import MineCritic


class MineEMA(nnx.Variable):
    """Moving average of E[exp T] over marginal samples (0 = not yet initialised)."""


class SkipCount(nnx.Variable):
    """Steps skipped because a loss term or the gradient was not finite (train.nonfinite='skip')."""


class TrainState(nnx.Module):
    def __init__(self, model: ICLM, tx: optax.GradientTransformation, *, train_base: bool,
                 critic: MineCritic | None = None, critic_tx: optax.GradientTransformation | None = None):
        self.model = model
        self.train_base = train_base
        self.opt = nnx.Optimizer(model, tx, wrt=param_filter(train_base))
        self.critic = critic
        self.critic_opt = nnx.Optimizer(critic, critic_tx, wrt=nnx.Param) if critic is not None else None
        self.mine_ema = MineEMA(jnp.zeros((), jnp.float32))
        self.skipped = SkipCount(jnp.zeros((), jnp.int32))

    @property
    def step(self) -> int:
        return int(self.opt.step[...])
