"""Turn a validated ml_collections config into the objects a run needs (model, state, loss config)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from iclm_jax.fields import csv
from iclm_jax.losses import LossConfig
from iclm_jax.model.iclm import ICLM, ICLMConfig
from iclm_jax.model.mi import MineCritic
from iclm_jax.model.transformer import TransformerConfig
from iclm_jax.train.optim import make_optimizer
from iclm_jax.train.state import TrainState

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_config(config, vocab_size: int) -> ICLMConfig:
    m, r = config.model, config.router
    base = TransformerConfig(
        vocab_size=m.vocab_size or vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, mlp_dim=m.mlp_dim, rope_theta=m.rope_theta,
        norm_eps=m.norm_eps, tie_embeddings=m.tie_embeddings, dtype=_DTYPES[m.dtype],
        remat=m.get("remat", "none"), canon=m.get("canon", 0),   # older stored configs lack these
        scan_layers=m.get("scan_layers", False))
    router = dict(proj_dim=r.proj_dim, update=r["update"], mode=r.mode, ema_decay=r.ema_decay,
                  commitment=r.commitment, dead_threshold=r.dead_threshold, temperature=r.temperature,
                  center=r.center, normalize=r.normalize)
    return ICLMConfig(
        base=base, num_modules=m.num_modules, invariant=m.invariant, lora_rank=config.lora.rank,
        lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
        lora_targets=tuple(csv(config.lora.targets)), router_source=r.source, router=router,
        aggregator=m.aggregator, invariant_weight=m.invariant_weight, mi_apply_to=config.mi.apply_to,
        aux_heads=config.loss.aux_weight > 0)


def loss_config(config) -> LossConfig:
    return LossConfig(routing_weight=config.router.weight, mi_estimator=config.mi.estimator,
                      mi_weight=config.mi.weight, mi_reverse=config.mi.reverse,
                      aux_weight=config.loss.aux_weight,
                      context_weight=config.loss.get("context_weight", 0.0),   # older stored configs lack it
                      logit_chunk=config.loss.get("logit_chunk", 64))


def train_state(config, vocab_size: int, *, seed: int | None = None) -> TrainState:
    """Build the full train state (model, optimisers, MINE critic) from the config."""
    seed = config.seed if seed is None else seed
    rngs = nnx.Rngs(params=seed, dropout=seed + 1, router=seed + 2)
    mcfg = model_config(config, vocab_size)
    model = ICLM(mcfg, rngs=rngs)
    t = config.train
    tx = make_optimizer(lr=t.lr, steps=t.steps, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
                        grad_clip=t.grad_clip, b1=t.b1, b2=t.b2, grad_accum=t.grad_accum,
                        final_lr_fraction=t.final_lr_fraction, eps=t.get("adam_eps", 1e-8))
    critic = critic_tx = None
    if config.mi.estimator == "mine" and mcfg.invariant:
        d = mcfg.base.d_model
        critic = MineCritic(d, d, hidden=config.mi.critic_hidden, depth=config.mi.critic_depth,
                            rngs=nnx.Rngs(seed + 3))
        import optax
        critic_tx = optax.adam(config.mi.critic_lr, eps=t.get("adam_eps", 1e-8))
    return TrainState(model, tx, train_base=config.model.train_base, critic=critic, critic_tx=critic_tx)
