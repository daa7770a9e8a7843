"""The ICLM: one shared base, stacked LoRA modules, a VQ router and an aggregator.

Adapter slots on the stacked ``module`` axis: ``0..K-1`` domain-specific, ``K`` invariant (if any),
then the router's own adapter (if ``router_source == "adapter"``). Per step we run the base once for the
invariant module and once for the *routed* specific module of each row (a per-row adapter gather), so the
cost does not depend on K — unlike the original code, which runs all K+2 model copies on every input. Only
``soft`` routing and ``mi_apply_to="all"`` (the paper's choice) run every specific module.

A single-module baseline is this same class with K = 1 and ``invariant=False``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from iclm_jax import partitioning
from iclm_jax.model.aggregator import Aggregator
from iclm_jax.model.lora import LoraConfig, LoRAParam
from iclm_jax.model.mi import APPLY_TO, POOLS
from iclm_jax.model.router import RouteOut, Router, RouterConfig, pool_prompt
from iclm_jax.model.transformer import RESIDUAL, Transformer, TransformerConfig

ROUTER_SOURCES = ("invariant", "base", "adapter")


@dataclasses.dataclass(frozen=True)
class ICLMConfig:
    base: TransformerConfig
    num_modules: int = 2                      # K domain-specific modules
    invariant: bool = True                    # the domain-invariant module (False: no-invariant baseline)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    router_source: str = "invariant"
    router: RouterConfig = RouterConfig()     # a dict of RouterConfig fields is converted
    aggregator: str = "concat"
    invariant_weight: float = 0.5
    mi_apply_to: str = "routed"               # "routed" | "all"
    mi_pool: str = "prompt"                   # the pooled states MI reads: "prompt" | "answer" positions
    aux_heads: bool = False                   # also return each module's own base-head logits

    def __post_init__(self):
        if isinstance(self.router, dict):
            object.__setattr__(self, "router", RouterConfig(**self.router))
        if self.num_modules < 1:
            raise ValueError(f"model.num_modules={self.num_modules}: expected >= 1")
        if self.router_source not in ROUTER_SOURCES:
            raise ValueError(f"router.source={self.router_source!r}: expected one of {ROUTER_SOURCES}")
        if self.mi_apply_to not in APPLY_TO:
            raise ValueError(f"mi.apply_to={self.mi_apply_to!r}: expected one of {APPLY_TO}")
        if self.mi_pool not in POOLS:
            raise ValueError(f"mi.pool={self.mi_pool!r}: expected one of {POOLS}")
        if self.router_source == "invariant" and self.num_modules > 1 and not self.invariant:
            raise ValueError("router.source='invariant' needs model.invariant=True; use 'base' or 'adapter'")

    @property
    def invariant_slot(self) -> int:
        return self.num_modules

    @property
    def router_slot(self) -> int:
        return self.num_modules + int(self.invariant)

    @property
    def num_adapters(self) -> int:
        return self.num_modules + int(self.invariant) + int(self.router_source == "adapter")

    @property
    def uses_router(self) -> bool:
        return self.num_modules > 1 or self.router.mode == "oracle"


class ICLMHidden(NamedTuple):
    """The forward pass up to the heads: what the losses read, so logits are computed only where needed."""
    x_inv: jax.Array | None           # [B, L, d] pre-final-norm invariant hidden state (None: no invariant)
    x_spec: jax.Array                 # [B, L, d] pre-final-norm routed specific hidden state
    route: RouteOut                   # routing decision and VQ loss
    pooled_inv: jax.Array | None      # [B, d] prompt-pooled invariant representation
    pooled_spec: jax.Array            # [B, d] prompt-pooled routed specific representation
    pooled_all: jax.Array | None      # [K, B, d] every specific module (mi_apply_to="all")


class ICLMOutput(NamedTuple):
    logits: jax.Array                 # [B, L, V] float32 aggregated next-token logits (or log-probs)
    route: RouteOut                   # routing decision and VQ loss
    pooled_inv: jax.Array | None      # [B, d] prompt-pooled invariant representation
    pooled_spec: jax.Array            # [B, d] prompt-pooled routed specific representation
    pooled_all: jax.Array | None      # [K, B, d] every specific module (mi_apply_to="all")
    aux_logits: dict[str, jax.Array]  # module's own base-head logits, when aux_heads


class ICLM(nnx.Module):
    def __init__(self, cfg: ICLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        lora = LoraConfig(num_adapters=cfg.num_adapters, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                          dropout=cfg.lora_dropout, targets=tuple(cfg.lora_targets))
        self.base = Transformer(cfg.base, lora, rngs=rngs)
        d = cfg.base.d_model
        self.router = Router(d, cfg.num_modules, cfg.router, rngs=rngs) if cfg.uses_router else None
        self.aggregator = (Aggregator(self.base, cfg.aggregator, cfg.invariant_weight, rngs=rngs)
                           if cfg.invariant else None)

    def derive_heads(self) -> None:
        """Re-derive every head parameter that is a function of the base (the concat head) from the
        current base: call after replacing the base's weights (e.g. loading a pretrained model), so the
        heads are those the new base would have had at construction. The logits/probs aggregators and
        the auxiliary heads use the base head itself and hold nothing to derive."""
        if self.aggregator is not None:
            self.aggregator.derive_from(self.base)

    # ------------------------------------------------------------------ passes
    def hidden(self, batch: dict[str, jax.Array], adapter: jax.Array, *, train: bool) -> jax.Array:
        """Pre-final-norm last hidden state of the base with a per-row adapter."""
        return self.base(batch["inputs"], batch["positions"], batch["segments"], adapter,
                         deterministic=not train)

    def pooled(self, x: jax.Array, batch) -> jax.Array:
        return pool_prompt(self.base.final_norm(x), batch["prompt_mask"])

    def mi_pooled(self, x: jax.Array, batch) -> jax.Array:
        """The per-row representation the MI estimate reads: final-normed states averaged over the prompt
        (``mi_pool="prompt"``) or over the positions that predict an answer token (``"answer"``)."""
        if self.cfg.mi_pool == "prompt":
            return self.pooled(x, batch)
        return pool_prompt(self.base.final_norm(x), batch["loss_mask"] > 0)

    def route(self, batch, x_inv: jax.Array | None, *, train: bool) -> RouteOut:
        b = batch["inputs"].shape[0]
        if self.router is None:
            zero = jnp.zeros((), jnp.float32)
            return RouteOut(jnp.zeros((b,), jnp.int32), jnp.ones((b, 1), jnp.float32), zero,
                            jnp.zeros((b, 1), jnp.float32), jnp.ones((), jnp.float32))
        src = self.cfg.router_source
        if src == "invariant":
            e = jax.lax.stop_gradient(self.pooled(x_inv, batch))
        elif src == "base":
            x0 = self.hidden(batch, jnp.full((b,), -1, jnp.int32), train=False)
            e = jax.lax.stop_gradient(self.pooled(x0, batch))
        else:
            e = self.pooled(self.hidden(batch, jnp.full((b,), self.cfg.router_slot, jnp.int32),
                                        train=train), batch)
        valid = jnp.any(batch["segments"] > 0, axis=1)      # all-padding rows are not data
        return self.router(e, domain=batch.get("domain"), train=train, valid=valid)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, jax.Array], *, train: bool = False,
                route_index: jax.Array | None = None) -> ICLMHidden:
        """Everything but the heads: hidden states, routing and pooled representations. ``route_index``
        ([B] int32) overrides the router's choice (an intervention: e.g. route each row by its domain)."""
        cfg = self.cfg
        b = batch["inputs"].shape[0]
        x_inv = None
        if cfg.invariant:
            x_inv = self.hidden(batch, jnp.full((b,), cfg.invariant_slot, jnp.int32), train=train)
        route = self.route(batch, x_inv, train=train)
        if route_index is not None:
            route = route._replace(index=route_index.astype(jnp.int32),
                                   weights=jax.nn.one_hot(route_index, route.weights.shape[1], dtype=jnp.float32))
        mode = cfg.router.mode

        pooled_all = None
        if (mode == "soft" and self.router is not None) or cfg.mi_apply_to == "all":
            xs = [self.hidden(batch, jnp.full((b,), m, jnp.int32), train=train)
                  for m in range(cfg.num_modules)]
            if cfg.mi_apply_to == "all":
                pooled_all = jnp.stack([self.mi_pooled(x, batch) for x in xs])
        if mode == "soft" and self.router is not None:
            w = route.weights
            x_spec = sum(w[:, m, None, None] * xs[m] for m in range(cfg.num_modules))
        else:
            x_spec = self.hidden(batch, route.index, train=train)
            if mode == "gumbel":   # straight-through: value 1, gradient of the relaxed choice
                gate = jnp.take_along_axis(route.weights, route.index[:, None], axis=1)
                x_spec = x_spec * gate[:, :, None]

        x_spec = partitioning.constrain(x_spec, RESIDUAL)   # the aggregator's inputs keep the batch split
        return ICLMHidden(
            x_inv=x_inv, x_spec=x_spec, route=route,
            pooled_inv=self.mi_pooled(x_inv, batch) if cfg.invariant else None,
            pooled_spec=self.mi_pooled(x_spec, batch), pooled_all=pooled_all)

    def heads(self, x_inv: jax.Array | None, x_spec: jax.Array, *, aux: bool = True
              ) -> dict[str, jax.Array]:
        """Float32 logits [B, T, V] of hidden states [B, T, d] at any T positions (all, or a gathered
        subset): ``"logits"`` the aggregated output, plus (``aux`` and ``cfg.aux_heads``) each module's
        own base-head logits as ``"specific"`` / ``"invariant"``."""
        cfg = self.cfg
        if cfg.invariant:
            logits = self.aggregator(self.base, x_inv, x_spec)
        else:
            logits = self.base.logits(x_spec)
        out = {"logits": partitioning.constrain(logits, ("batch", "length", "vocab"))}
        if aux and cfg.aux_heads:
            out["specific"] = self.base.logits(x_spec)
            if cfg.invariant:
                out["invariant"] = self.base.logits(x_inv)
        return out

    def __call__(self, batch: dict[str, jax.Array], *, train: bool = False) -> ICLMOutput:
        """The forward pass with logits at every position (training reads them only where a loss
        does: ``forward`` then ``heads`` on the gathered positions, see ``losses.read_stats``)."""
        h = self.forward(batch, train=train)
        heads = self.heads(h.x_inv, h.x_spec)
        logits = heads.pop("logits")
        return ICLMOutput(logits=logits, route=h.route, pooled_inv=h.pooled_inv, pooled_spec=h.pooled_spec,
                          pooled_all=h.pooled_all, aux_logits=heads)

    def module_logits(self, batch, module: int) -> jax.Array:
        """Logits of one module alone (its adapter on the base head): per-module evaluation/export."""
        b = batch["inputs"].shape[0]
        return self.base.logits(self.hidden(batch, jnp.full((b,), module, jnp.int32), train=False))


def param_filter(train_base: bool) -> Any:
    """Which parameters the optimiser updates: everything, or (frozen pretrained base) all but the base."""
    if train_base:
        return nnx.Param
    return nnx.Any(LoRAParam, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("base"))))
