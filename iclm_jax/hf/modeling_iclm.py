"""Transformers custom model of a whole ICLM (router, stacked LoRA modules, aggregator) in PyTorch.

This file is copied verbatim into an exported directory as ``modeling_iclm.py`` and loaded with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``, so it imports only torch and
transformers. It mirrors ``iclm_jax.model`` at inference: one Llama base with per-row LoRA (each row
picks its adapter slot: ``0..K-1`` specific, ``K`` invariant, then the router's own), an invariant
pass, a nearest-code router over the prompt-pooled, final-normed hidden state, the routed specific
pass, and the aggregator. Routing is nearest code (hard); the JAX model's oracle mode needs gold
domains, which a downstream user does not have.

Generation: ``generate()`` routes ONCE, on the prompt (the first forward of the call), and keeps that
module for the continuation, as ``iclm_jax.generate`` does. It uses a KV cache by default, in
transformers' convention (``cache``, the name transformers 5 gives ``past_key_values``, which is still
accepted): one ``DynamicCache`` holding both passes, layers ``0..L-1`` the invariant pass and
``L..2L-1`` the routed specific pass (the same base with different adapters, so different K/V; only
``0..L-1`` without an invariant module). The cache generate() builds has one layer per config layer;
the forward appends the missing ``DynamicLayer``s. The routed module is stored on the cache
(``cache.iclm_route``) with the K/V it produced, so a forward that extends a cache keeps it; each new
token then costs one step of each pass over its cache. ``use_cache=False`` re-runs the whole
sequence every step (quadratic) and gives the same tokens. Only ``DynamicCache`` is supported (no
static, quantized or sliding caches).
Batched prompts of different lengths must be LEFT-padded with an ``attention_mask`` (the transformers
convention: with a cache it covers the cached tokens and the new ones); RoPE positions come from the
mask so each row matches its unpadded run.

Dtypes: float32 (the checkpoint's), or ``dtype=torch.bfloat16`` / ``torch.float16`` at load time. As
in transformers' Llama, norms, RoPE angles and the attention softmax run in float32 and return the
model's dtype; routing and the log-prob mixture run in float32 throughout; logits come back float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast


class ICLMConfig(PretrainedConfig):
    model_type = "iclm"

    def __init__(self, vocab_size: int = 32, hidden_size: int = 16, num_hidden_layers: int = 1,
                 num_attention_heads: int = 1, num_key_value_heads: int = 1, head_dim: int = 16,
                 intermediate_size: int = 32, rope_theta: float = 10000.0, rms_norm_eps: float = 1e-5,
                 tie_embeddings: bool = False, num_modules: int = 1, invariant: bool = False,
                 num_adapters: int = 1, lora_rank: int = 8, lora_alpha: float = 16.0,
                 lora_targets=("q", "k", "v", "o", "gate", "up", "down"),
                 router_source: str = "invariant", use_router: bool = False, router_mode: str = "hard",
                 router_center: bool = False, router_normalize: bool = False, router_proj_dim: int = 0,
                 aggregator: str = "concat", invariant_weight: float = 0.5, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.head_dim = num_key_value_heads, head_dim
        self.intermediate_size, self.rope_theta, self.rms_norm_eps = intermediate_size, rope_theta, rms_norm_eps
        # Our own name: transformers' `tie_word_embeddings` would make it tie/untie weights itself.
        self.tie_embeddings = bool(tie_embeddings)
        self.num_modules, self.invariant, self.num_adapters = num_modules, bool(invariant), num_adapters
        self.lora_rank, self.lora_alpha, self.lora_targets = lora_rank, lora_alpha, list(lora_targets)
        self.router_source, self.use_router, self.router_mode = router_source, bool(use_router), router_mode
        self.router_center, self.router_normalize = bool(router_center), bool(router_normalize)
        self.router_proj_dim = router_proj_dim
        self.aggregator, self.invariant_weight = aggregator, float(invariant_weight)
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    @property
    def invariant_slot(self) -> int:
        return self.num_modules

    @property
    def router_slot(self) -> int:
        return self.num_modules + int(self.invariant)


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalised ``x``, computed in float32 and returned in ``x``'s dtype (as Llama's)."""
    f = x.float()
    return (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * _rms(x, self.eps)


class LoRALinear(nn.Module):
    """``x @ W.T`` plus ``scale * x @ A[m_b] @ B[m_b]`` for rows whose adapter m_b >= 0.

    ``weight`` [out, in] (torch layout); ``lora_A`` [M, in, r], ``lora_B`` [M, r, out] (the JAX layout).
    """

    def __init__(self, n_in: int, n_out: int, lora: Optional[tuple[int, int, float]]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_out, n_in))
        self.scale = None
        if lora is not None:
            m, r, self.scale = lora
            self.lora_A = nn.Parameter(torch.zeros(m, n_in, r))
            self.lora_B = nn.Parameter(torch.zeros(m, r, n_out))

    def forward(self, x: torch.Tensor, adapter: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        if self.scale is None:
            return y
        idx = adapter.clamp(0, self.lora_A.shape[0] - 1)
        delta = torch.einsum("blr,bro->blo", torch.einsum("bli,bir->blr", x, self.lora_A[idx]),
                             self.lora_B[idx]) * self.scale
        return torch.where((adapter >= 0)[:, None, None], y + delta, y)


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE; x [B, L, H, D], positions [B, L]; float32 angles, cos/sin in x's dtype."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    freqs = positions.float()[..., None] * inv
    emb = torch.cat([freqs, freqs], -1)[:, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * emb.cos().to(x.dtype) + torch.cat([-x2, x1], -1) * emb.sin().to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ICLMConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        lora = (cfg.num_adapters, cfg.lora_rank, cfg.lora_alpha / cfg.lora_rank)
        dense = lambda name, i, o: LoRALinear(i, o, lora if name in cfg.lora_targets else None)  # noqa: E731
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = dense("q", d, cfg.num_attention_heads * hd)
        self.k_proj = dense("k", d, cfg.num_key_value_heads * hd)
        self.v_proj = dense("v", d, cfg.num_key_value_heads * hd)
        self.o_proj = dense("o", cfg.num_attention_heads * hd, d)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.gate_proj = dense("gate", d, cfg.intermediate_size)
        self.up_proj = dense("up", d, cfg.intermediate_size)
        self.down_proj = dense("down", cfg.intermediate_size, d)

    def forward(self, x, positions, mask, adapter, cache: Optional[Cache] = None, layer_idx: int = 0):
        """``x`` [B, n, d] new tokens, ``mask`` [B, n, T] over the T = cached + n keys; with ``cache``,
        this layer's new K/V are appended to its layer ``layer_idx`` and attention reads all T."""
        cfg = self.cfg
        b, n, _ = x.shape
        h, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        a = self.input_layernorm(x)
        q = _rope(self.q_proj(a, adapter).view(b, n, h, hd), positions, cfg.rope_theta)
        # keys/values in the cache layout [B, Hkv, n, D]
        k = _rope(self.k_proj(a, adapter).view(b, n, hkv, hd), positions, cfg.rope_theta).transpose(1, 2)
        v = self.v_proj(a, adapter).view(b, n, hkv, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)        # -> [B, Hkv, T, D]
        qg = q.view(b, n, hkv, h // hkv, hd)
        scores = torch.einsum("bqhgd,bhkd->bhgqk", qg, k) * hd ** -0.5
        scores = scores.float().masked_fill(~mask[:, None, None], torch.finfo(torch.float32).min)
        probs = scores.softmax(-1).to(v.dtype)          # softmax in float32, as Llama's
        out = torch.einsum("bhgqk,bhkd->bqhgd", probs, v).reshape(b, n, h * hd)
        x = x + self.o_proj(out, adapter)
        a = self.post_attention_layernorm(x)
        g = F.silu(self.gate_proj(a, adapter)) * self.up_proj(a, adapter)
        return x + self.down_proj(g, adapter)


@dataclass
class ICLMCausalLMOutput(CausalLMOutputWithPast):
    route: Optional[torch.LongTensor] = None   # [B] specific module each row was routed to
    # (``cache``, from CausalLMOutputWithPast: both passes' K/V, see the module doc)


class ICLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ICLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config: ICLMConfig):
        super().__init__(config)
        cfg = config
        d, v = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = nn.Embedding(v, d)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(d, v, bias=False)
        if cfg.use_router:
            c = cfg.router_proj_dim or d
            self.router_codebook = nn.Parameter(torch.zeros(cfg.num_modules, c))
            if cfg.router_center:
                self.router_mean = nn.Parameter(torch.zeros(d))
            if cfg.router_proj_dim:
                self.router_proj = nn.Parameter(torch.zeros(d, c))
        if cfg.invariant and cfg.aggregator == "concat":
            self.aggregator_scale = nn.Parameter(torch.ones(2 * d))
            self.aggregator_kernel = nn.Parameter(torch.zeros(2 * d, v))
        self._gen: Optional[dict] = None   # set by generate(): prompt length and its routing
        self.post_init()

    def _init_weights(self, module):   # every tensor comes from the checkpoint
        pass

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> Optional[nn.Linear]:
        """The untied ``lm_head``, if the logits come from it; None when the embeddings are tied
        (logits use ``embed_tokens.weight``) or a concat aggregator makes the logits."""
        cfg = self.config
        if cfg.tie_embeddings or (cfg.invariant and cfg.aggregator == "concat"):
            return None
        return self.lm_head

    # ------------------------------------------------------------------ passes
    def hidden(self, ids, positions, mask, adapter, cache: Optional[Cache] = None,
               first_layer: int = 0) -> torch.Tensor:
        """Pre-final-norm hidden state [B, n, d] with adapter slot ``adapter`` [B] (-1: base only).

        With ``cache``, block ``i`` reads and extends the cache's layer ``first_layer + i``."""
        x = self.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, mask, adapter, cache, first_layer + i)
        return x

    def _cache_layers(self, cache: Cache) -> None:
        """Make room in ``cache`` for both passes' layers (module doc): generate() builds a
        ``DynamicCache`` with one layer per config layer; a lazy one grows by itself."""
        if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise ValueError(f"ICLM: only a DynamicCache of full-attention layers is supported, got "
                             f"{type(cache).__name__}")
        need = self.config.num_hidden_layers * (1 + int(self.config.invariant))
        if cache.layer_class_to_replicate is None:
            while len(cache.layers) < need:
                cache.layers.append(DynamicLayer())

    def base_logits(self, x: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens if self.config.tie_embeddings else self.lm_head
        return self.norm(x) @ w.weight.T

    def route(self, x_inv, pool_mask, ids, positions, mask) -> torch.Tensor:
        """Nearest code of the prompt-pooled, final-normed router hidden state -> int64 [B].

        Pooling and distances run in float32 whatever the model's dtype: a bf16 distance would
        round near-ties to a different module than the float32 model picks."""
        cfg, b = self.config, ids.shape[0]
        if not cfg.use_router:
            return torch.zeros(b, dtype=torch.long, device=ids.device)
        if cfg.router_source == "invariant":
            x = x_inv
        else:
            slot = -1 if cfg.router_source == "base" else cfg.router_slot
            x = self.hidden(ids, positions, mask, torch.full((b,), slot, device=ids.device))
        m = pool_mask.float()
        h = _rms(x.float(), cfg.rms_norm_eps) * self.norm.weight.float()
        s = torch.einsum("bld,bl->bd", h, m)
        n = m.sum(1, keepdim=True)
        e = torch.where(n > 0, s / n.clamp(min=1.0), torch.zeros_like(s))
        if cfg.router_center:
            e = e - self.router_mean.float()
        if cfg.router_normalize:
            e = e * torch.rsqrt((e * e).sum(-1, keepdim=True) + 1e-12)
        if cfg.router_proj_dim:
            e = e @ self.router_proj.float()
        dist = (e[:, None, :] - self.router_codebook.float()[None]).pow(2).sum(-1)
        return dist.argmin(1)

    def aggregate(self, x_inv, x_spec) -> torch.Tensor:
        cfg = self.config
        if not cfg.invariant:
            return self.base_logits(x_spec)
        if cfg.aggregator == "concat":
            eps = cfg.rms_norm_eps
            h = torch.cat([_rms(x_inv, eps), _rms(x_spec, eps)], -1) * self.aggregator_scale
            return h @ self.aggregator_kernel
        w = cfg.invariant_weight
        l_inv, l_spec = self.base_logits(x_inv), self.base_logits(x_spec)
        if cfg.aggregator == "logits":
            return w * l_inv + (1.0 - w) * l_spec
        lp_inv, lp_spec = l_inv.float().log_softmax(-1), l_spec.float().log_softmax(-1)
        if w == 0.0:
            return lp_spec
        if w == 1.0:
            return lp_inv
        return torch.logaddexp(math.log(w) + lp_inv, math.log1p(-w) + lp_spec)

    # ------------------------------------------------------------------ forward / generate
    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                prompt_mask: Optional[torch.Tensor] = None, labels: Optional[torch.LongTensor] = None,
                cache: Optional[Cache] = None, use_cache: Optional[bool] = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> ICLMCausalLMOutput:
        """Logits [B, n, V] of the whole ICLM for the n tokens ``input_ids`` [B, n].

        ``attention_mask`` [B, P + n] (1 = real token; left or right padding) covers the P tokens
        already in ``cache`` (0 without one) and the new ones; ``prompt_mask`` [B, n] the tokens the
        router pools (default: the real tokens, i.e. the whole input is the prompt). ``cache``: a
        ``DynamicCache`` (``past_key_values`` is accepted too), extended in place and returned; with
        ``use_cache=True`` and no cache, a new one is made. The router runs only when no route is
        known yet: an extended cache keeps the route it was filled with (``cache.iclm_route``), and
        inside ``generate()`` the routing of the prompt is kept for every later step.
        ``logits_to_keep``: as transformers' (0 = every position, k = the last k; generate() asks 1).
        """
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if cache is None and use_cache:
            cache = DynamicCache()
        b, n = input_ids.shape
        dev = input_ids.device
        past = 0
        if cache is not None:
            self._cache_layers(cache)
            past = cache.get_seq_length()
        total = past + n
        real_all = (torch.ones(b, total, dtype=torch.bool, device=dev) if attention_mask is None
                    else attention_mask.bool())
        if real_all.shape != (b, total):
            raise ValueError(f"ICLM: attention_mask has shape {tuple(real_all.shape)}, expected ({b}, {total}) "
                             f"= the {past} cached tokens and the {n} new ones")
        positions = (real_all.long().cumsum(1) - 1).clamp(min=0)[:, past:]
        real = real_all[:, past:]
        causal = torch.ones(n, total, dtype=torch.bool, device=dev).tril(diagonal=past)
        mask = causal[None] & real[:, :, None] & real_all[:, None, :]     # [B, n, T]
        cfg, gen = self.config, self._gen
        route = getattr(cache, "iclm_route", None) if past else None
        if route is None and gen is not None:
            route = gen.get("route")
        if route is None and past:
            raise ValueError("ICLM: the cache holds tokens but no route (cache.iclm_route); fill it "
                             "with this model's forward or generate()")
        x_inv = None
        if cfg.invariant:
            x_inv = self.hidden(input_ids, positions, mask, torch.full((b,), cfg.invariant_slot, device=dev),
                                cache, 0)
        if route is None:
            pool = real if prompt_mask is None else prompt_mask.bool() & real
            route = self.route(x_inv, pool, input_ids, positions, mask)
            if gen is not None:
                gen["route"] = route
        if cache is not None:
            cache.iclm_route = route        # the specific pass's K/V below are this route's
        x_spec = self.hidden(input_ids, positions, mask, route, cache,
                             cfg.num_hidden_layers if cfg.invariant else 0)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.aggregate(None if x_inv is None else x_inv[:, keep], x_spec[:, keep]).float()
        loss = None
        if labels is not None:
            if logits.shape[1] != n:
                raise ValueError("ICLM: labels need the logits of every position (logits_to_keep=0)")
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return ICLMCausalLMOutput(loss=loss, logits=logits, cache=cache, route=route)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate``, routing once on the prompt (module doc); KV-cached unless
        ``use_cache=False``."""
        self._gen = {"route": None}
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._gen = None
