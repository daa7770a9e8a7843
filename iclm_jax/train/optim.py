"""optax chains: AdamW with warmup + cosine decay, global-norm clipping, gradient accumulation."""
from __future__ import annotations

import dataclasses

import jax
import optax

from iclm_jax.model.layer_stack import in_stack


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimiser's fields of the ``train`` config group."""
    lr: float = 2e-3
    steps: int = 250
    warmup_steps: int = 25        # above ``steps``: ``effective_warmup``
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0        # global norm; 0 = off
    b1: float = 0.9
    b2: float = 0.95
    grad_accum: int = 1
    adam_eps: float = 1e-8


def effective_warmup(warmup_steps: int, steps: int) -> int:
    """The warmup a run uses: ``warmup_steps``, or a tenth of ``steps`` when it would not fit in the run
    (so ``--config.train.steps=20`` works without a second flag; the loop says so in one line)."""
    return warmup_steps if warmup_steps <= steps else steps // 10


def make_schedule(lr: float, steps: int, warmup_steps: int, final_lr_fraction: float = 0.1):
    """Linear warmup to ``lr`` (over ``effective_warmup`` steps) then cosine decay to
    ``final_lr_fraction · lr`` at ``steps``."""
    warmup_steps = max(effective_warmup(warmup_steps, steps), 0)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
        decay_steps=max(steps, warmup_steps + 1), end_value=lr * final_lr_fraction)


def _decay_mask(params):
    """Weight decay on matrices only (decaying norm scales or biases towards zero only hurts; a stacked
    block's ``layers`` axis does not count), and never on a VQ codebook (``router.update=gradient``): its
    codes must sit on the data, not shrink."""
    def decay(path, p):
        ndim = getattr(p, "ndim", 0) - int(in_stack(path))
        return ndim >= 2 and "codebook" not in jax.tree_util.keystr(path)
    return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW on ``cfg``'s schedule, after global-norm clipping, accumulating ``cfg.grad_accum`` steps."""
    schedule = make_schedule(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.final_lr_fraction)
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                             mask=_decay_mask))
    tx = optax.chain(*parts)
    if cfg.grad_accum > 1:
        # Accumulates `grad_accum` micro-batch gradients, applying one update per `grad_accum` calls.
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx
