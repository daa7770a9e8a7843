"""Turn a validated ml_collections config into the typed objects a run needs, once.

Each config group the code consumes has a frozen dataclass next to the code that reads it
(``TransformerConfig``, ``LoraConfig`` in the ICLM's fields, ``RouterConfig``, ``MIConfig``, ``LossConfig``,
``OptimConfig``, ``DataConfig``; the loop's ``LoopConfig``, ``EvalConfig``, ``CheckpointConfig`` and the
``continual`` group's ``ContinualConfig`` are here); ``fields.typed`` fills one from its group. Fields a
stored config predates keep their defaults, so older runs still load.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax
from flax import nnx

from iclm_jax.fields import csv, typed
from iclm_jax.losses import LossConfig
from iclm_jax.model.iclm import ICLM, ICLMConfig
from iclm_jax.model.mi import MIConfig, MineCritic
from iclm_jax.model.router import RouterConfig
from iclm_jax.model.transformer import TransformerConfig
from iclm_jax.train.optim import OptimConfig, make_optimizer
from iclm_jax.train.state import TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The loop's fields of the ``train`` group (the optimiser's are ``OptimConfig``)."""
    steps: int
    batch_size: int
    log_every: int
    time_limit_s: float = 0.0     # 0 = none; else stop training after this many seconds (evaluation excluded)
    nonfinite: str = "stop"       # step.NONFINITE
    skip_limit: float = 1.0       # nonfinite=skip: stop above this fraction of skipped steps (older runs: never)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int                    # 0 = at the end only
    batch_size: int
    during: str = ""              # comma list of the eval sets evaluated every `every` steps ("": all)
    at_start: bool = False        # also before the first step


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int                    # 0 = at the end only
    keep: int
    best_metric: str = ""         # "<eval set>/<metric>": also keep the best checkpoint by it


CONTINUAL_MODES = ("grow", "finetune")


@dataclasses.dataclass(frozen=True)
class ContinualConfig:
    """The ``continual`` group: learn a new domain starting from a trained run (``train/continual.py``)."""
    from_run: str = ""            # "" = off; else the workdir of the run to start from
    mode: str = "grow"            # grow: a new module and code, the old ones frozen | finetune: the baseline
    train_invariant: bool = False  # grow: also train the invariant module (else it stays frozen too)


def continual_config(config) -> ContinualConfig:
    return typed(ContinualConfig, config.get("continual") or {})


def frozen_codes(config) -> int:
    """The router codes that stay fixed: with ``continual.mode=grow``, every code but the new last one."""
    c = continual_config(config)
    return config.model.num_modules - 1 if c.from_run and c.mode == "grow" else 0


def router_config(config) -> RouterConfig:
    return typed(RouterConfig, config.router)


def mi_config(config) -> MIConfig:
    return typed(MIConfig, config.mi)


def optim_config(config) -> OptimConfig:
    return typed(OptimConfig, config.train)


def model_config(config, vocab_size: int) -> ICLMConfig:
    m = config.model
    base = typed(TransformerConfig, m, vocab_size=m.vocab_size or vocab_size, dtype=DTYPES[m.dtype])
    lo = config.lora
    return ICLMConfig(
        base=base, num_modules=m.num_modules, invariant=m.invariant, lora_rank=lo.rank,
        lora_alpha=lo.alpha, lora_dropout=lo.dropout, lora_targets=tuple(csv(lo.targets)),
        router_source=config.router.source, router=router_config(config), aggregator=m.aggregator,
        invariant_weight=m.invariant_weight, mi_apply_to=config.mi.apply_to, mi_pool=config.mi.get("pool", "prompt"),
        aux_heads=config.loss.aux_weight > 0)


def loss_config(config) -> LossConfig:
    return typed(LossConfig, config.loss, routing_weight=config.router.weight, mi=mi_config(config))


def train_state(config, vocab_size: int, *, seed: int | None = None) -> TrainState:
    """Build the full train state (model, optimisers, MINE critic) from the config."""
    seed = config.seed if seed is None else seed
    rngs = nnx.Rngs(params=seed, dropout=seed + 1, router=seed + 2)
    mcfg = model_config(config, vocab_size)
    model = ICLM(mcfg, rngs=rngs)
    if frozen_codes(config) and model.router is not None:
        model.router.freeze_codes(frozen_codes(config))
    ocfg, mi = optim_config(config), mi_config(config)
    tx = make_optimizer(ocfg)
    critic = critic_tx = None
    if mi.estimator == "mine" and mcfg.invariant:
        d = mcfg.base.d_model
        critic = MineCritic(d, d, hidden=mi.critic_hidden, depth=mi.critic_depth,
                            rngs=nnx.Rngs(seed + 3))
        critic_tx = optax.adam(mi.critic_lr, eps=ocfg.adam_eps)
    return TrainState(model, tx, train_base=config.model.train_base, critic=critic, critic_tx=critic_tx)
