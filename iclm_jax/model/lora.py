"""Stacked per-row LoRA: one base weight, M adapters, each batch row picks its own adapter.

ICLM runs K domain modules, one invariant module (and optionally the router) on one shared base
model. Rather than M separate forwards, every LoRA weight is stacked on a leading ``module`` axis
and each row gathers its own ``A[m], B[m]``. The cost is then independent of M, and adapters that
no row selects receive exactly zero gradient (the gather's transpose is a scatter-add that only
touches the selected indices).

Parameter kinds: base weights are ``nnx.Param``; adapter weights are ``LoRAParam`` (a subclass),
so ``nnx.Optimizer(model, tx, wrt=LoRAParam)`` trains adapters only, and
``nnx.All(nnx.Param, nnx.Not(LoRAParam))`` selects the base weights.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from iclm_jax.model import rows

#: Projection names a LoraConfig may target (attention q/k/v/o, SwiGLU gate/up/down).
LORA_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

#: Base-weight init; matches transformers' Llama ``initializer_range`` default.
BASE_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Shape and placement of the stacked adapters (scale = alpha / rank, the PEFT convention)."""

    num_adapters: int
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if not isinstance(self.num_adapters, int) or self.num_adapters < 1:
            raise ValueError(f"LoraConfig.num_adapters must be an int >= 1, got {self.num_adapters!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be an int >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        targets = tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"LoraConfig.targets has unknown names {unknown}; allowed: {LORA_TARGETS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAParam(nnx.Param):
    """An adapter weight; a distinct type so optimisers and filters can tell it from base weights."""


class LoRALinear(nnx.Module):
    """Bias-free dense ``y = x @ W`` plus, per row b, ``scale * dropout(x) @ A[m_b] @ B[m_b]``.

    ``W``: Param [in, out] with logical names (in_axis, out_axis). ``A``: LoRAParam [M, in, r]
    ("module", in_axis, "lora"), PEFT init (kaiming-uniform, a=sqrt(5) -> U(+-1/sqrt(in))).
    ``B``: LoRAParam [M, r, out] ("module", "lora", out_axis), zeros, so a fresh adapter changes
    nothing. Multi-head projections are flattened (heads*head_dim) by the caller.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        in_axis: str,
        out_axis: str,
        lora: LoraConfig | None,
        dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.lora = lora
        self.kernel = nnx.Param(
            BASE_INIT_STD * jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32),
            out_sharding=(in_axis, out_axis),
        )
        if lora is None:
            self.lora_a = nnx.data(None)
            self.lora_b = nnx.data(None)
            self.dropout = nnx.data(None)
            return
        bound = 1.0 / math.sqrt(in_features)
        m, r = lora.num_adapters, lora.rank
        self.lora_a = LoRAParam(
            jax.random.uniform(rngs.params(), (m, in_features, r), jnp.float32, -bound, bound),
            out_sharding=("module", in_axis, "lora"),
        )
        self.lora_b = LoRAParam(
            jnp.zeros((m, r, out_features), jnp.float32), out_sharding=("module", "lora", out_axis)
        )
        # Dropout only owns an rng stream when it can actually fire.
        self.dropout = nnx.Dropout(lora.dropout, rngs=rngs) if lora.dropout > 0 else nnx.data(None)

    def __call__(
        self, x: jax.Array, adapter: jax.Array | None, *, deterministic: bool = True
    ) -> jax.Array:
        """x [B, L, in]; adapter int32 [B] (row b uses adapter[b], -1 = base only) or None."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LoRALinear: x last dim {x.shape[-1]} != in_features {self.in_features}")
        x = x.astype(self.dtype)
        y = rows.matmul(x, self.kernel[...].astype(self.dtype))
        if adapter is None or self.lora is None:
            return y
        adapter = jnp.asarray(adapter)
        if adapter.shape != x.shape[:1]:
            raise ValueError(f"LoRALinear: adapter shape {adapter.shape} must be [B]={x.shape[:1]}")
        idx = jnp.clip(adapter, 0, self.lora.num_adapters - 1)
        a = self.lora_a[...].astype(self.dtype)[idx]  # [B, in, r]: per-row gather, cost free of M
        b = self.lora_b[...].astype(self.dtype)[idx]  # [B, r, out]
        h = x if self.dropout is None else self.dropout(x, deterministic=deterministic)
        delta = jnp.einsum("blr,bro->blo", jnp.einsum("bli,bir->blr", h, a), b)
        delta = delta * jnp.asarray(self.lora.scale, self.dtype)
        # `where` (not a multiply) makes -1 rows bit-identical to the base and blocks their grads.
        return jnp.where((adapter >= 0)[:, None, None], y + delta, y)
