"""Llama-family decoder (semantics of transformers' LlamaForCausalLM) with stacked per-row LoRA.

One base model serves every ICLM module: each call takes an adapter index per row, and every
projection listed in ``LoraConfig.targets`` applies that row's adapter (see ``lora.py``).

Layout choices: q/k/v/o kernels are 2-D on a flattened heads*head_dim axis, named "heads"
(q, o) or "kv" (k, v), so each projection is one ``LoRALinear`` and sharding "heads"/"kv"
shards whole heads. Query head h uses kv head h // (n_heads / n_kv_heads), as transformers'
``repeat_kv``. The residual stream stays float32; matmuls run in ``cfg.dtype``; norms, RoPE
tables and softmax are float32.

One optional departure from Llama, off by default: ``cfg.canon = K`` adds a canon layer on the token
embeddings (``canon.canon_mix``: each token also carries its K-1 predecessors), which the CPU recipe uses;
a model with it has no transformers counterpart and is not exported.

Incremental decoding: ``init_cache`` + ``extend`` run new tokens against a ``KVCache`` of the
earlier ones (same layers and weights as ``__call__``, which is unchanged); see ``generate.py``.

Scale: the residual stream is pinned at every block boundary by logical names
(``partitioning.constrain``, a no-op outside a step traced under ``partitioning.activation_sharding``),
``cfg.remat`` rematerialises each block in the backward pass, and ``cfg.scan_layers`` stores the blocks
stacked on a leading ``layers`` axis and runs them as one ``lax.scan`` (``scan_blocks``; the layout and its
conversion: ``layer_stack.py``). None of them changes a value; ``extend`` runs the blocks one by one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from iclm_jax import partitioning
from iclm_jax.model import rows
from iclm_jax.model.canon import canon_mix, canon_sum
from iclm_jax.model.layer_stack import stack_blocks, unstack_blocks
from iclm_jax.model.lora import BASE_INIT_STD, LoraConfig, LoRALinear

#: What a rematerialised block keeps for the backward pass (``cfg.remat``): "none" = no remat (all of
#: it), "block" = only its inputs (recompute the whole block), "dots" = also its weight matmuls' outputs.
REMAT_POLICIES = {"none": None, "block": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
RESIDUAL = ("batch", "length", "act_embed")   # logical names of the residual stream [B, L, d]

_MASK_VALUE = float(jnp.finfo(jnp.float32).min)  # finite: fully masked (padding) rows stay NaN-free

#: model.attention: "materialised" (``attend``'s own einsum kernel), "xla" (``jax.nn.dot_product_attention``'s
#: XLA implementation: the same values), "cudnn" (its cuDNN fused kernel: GPU only, bfloat16/float16).
ATTENTION = ("materialised", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: Any = jnp.float32  # compute dtype; params are always float32
    remat: str = "none"       # REMAT_POLICIES key; memory only, not part of the saved state's structure
    canon: int = 0            # K > 0: a canon layer of width K on the token embeddings (``canon_mix``)
    scan_layers: bool = False  # blocks stored stacked on a "layers" axis, run as one lax.scan; same values
    attention: str = "materialised"   # ATTENTION: the kernel (``attend``); compute only, same values

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"TransformerConfig.n_heads ({self.n_heads}) must be divisible by "
                f"TransformerConfig.n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"TransformerConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"TransformerConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"TransformerConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if not isinstance(self.canon, int) or isinstance(self.canon, bool) or self.canon < 0:
            raise ValueError(f"TransformerConfig.canon must be an int >= 0, got {self.canon!r}")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"TransformerConfig.scan_layers (model.scan_layers) must be a bool, "
                             f"got {self.scan_layers!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"TransformerConfig.attention (model.attention) must be one of {ATTENTION}, "
                             f"got {self.attention!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"TransformerConfig.remat (model.remat) must be one of "
                             f"{tuple(REMAT_POLICIES)}, got {self.remat!r}")


class RMSNorm(nnx.Module):
    """``weight * x / rms(x)``, computed in float32, returned in ``dtype`` (Llama's RMSNorm)."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, axis_name: str = "embed",
                 dtype: Any = jnp.float32):
        del rngs  # ones init; kept for a uniform constructor signature
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (self.weight[...] * x).astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half RoPE (as transformers' Llama). x [B, L, H, D], positions int [B, L]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention_mask(segments: jax.Array) -> jax.Array:
    """bool [B, L, L]: q may see k iff k <= q, both real, and same segment or k in prefix (1)."""
    q, k = segments[:, :, None], segments[:, None, :]
    n = segments.shape[1]
    causal = jnp.arange(n)[None, :, None] >= jnp.arange(n)[None, None, :]
    return causal & (q != 0) & (k != 0) & ((k == q) | (k == 1))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, kernel: str = "materialised") -> jax.Array:
    """Grouped-query attention; softmax in float32.

    q [B, Lq, H, D], k/v [B, Lk, Hkv, D], mask bool [B, Lq, Lk] -> [B, Lq, H, D]. Lq and Lk are
    separate so a KV cache can pass cached keys with a matching mask. A query that sees no key (a padding
    row) gets the mean of the values with every kernel but cuDNN's (its loss weight is zero anyway).
    ``kernel``: one of ``ATTENTION``.
    """
    if kernel != "materialised":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=q.shape[-1] ** -0.5,
                                            implementation=kernel)
    b, lq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, lq, hkv, h // hkv, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
    return out.reshape(b, lq, h, d)


class KVCache(NamedTuple):
    """Keys/values of the tokens a decoder has seen, for incremental decoding.

    Row b's tokens fill slots ``[0, lengths[b])`` in order and a token's RoPE position is its slot
    (unpacked rows, right padding): rows of different lengths need no position offsets, each just
    writes at its own ``lengths[b]``. Slots at or past ``lengths[b]`` hold stale values that the
    mask hides and later writes overwrite. Keys are stored after RoPE.
    """

    k: tuple[jax.Array, ...]   # per layer [B, Lmax, Hkv, D] in cfg.dtype
    v: tuple[jax.Array, ...]   # per layer [B, Lmax, Hkv, D] in cfg.dtype
    lengths: jax.Array         # int32 [B] filled slots per row
    tokens: jax.Array | None = None   # int32 [B, Lmax] the token ids per slot (canon layer only)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @staticmethod
    def concat(caches: "list[KVCache]") -> "KVCache":
        """Stack caches along the batch axis (rows of several adapters decoded in one pass)."""
        cat = lambda xs: jnp.concatenate(xs, axis=0)  # noqa: E731
        tokens = [c.tokens for c in caches]
        return KVCache(tuple(map(lambda *a: cat(a), *[c.k for c in caches])),
                       tuple(map(lambda *a: cat(a), *[c.v for c in caches])),
                       cat([c.lengths for c in caches]),
                       None if any(t is None for t in tokens) else cat(tokens))


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, cfg: TransformerConfig, lora: LoraConfig | None, *, rngs: nnx.Rngs):
        self.cfg = cfg

        def dense(name: str, n_in: int, n_out: int, in_axis: str, out_axis: str) -> LoRALinear:
            use = lora if lora is not None and name in lora.targets else None
            return LoRALinear(n_in, n_out, in_axis=in_axis, out_axis=out_axis, lora=use,
                              dtype=cfg.dtype, rngs=rngs)

        d, hd = cfg.d_model, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.norm_eps, rngs=rngs, dtype=cfg.dtype)
        self.q = dense("q", d, cfg.n_heads * hd, "embed", "heads")
        self.k = dense("k", d, cfg.n_kv_heads * hd, "embed", "kv")
        self.v = dense("v", d, cfg.n_kv_heads * hd, "embed", "kv")
        self.o = dense("o", cfg.n_heads * hd, d, "heads", "embed")
        self.mlp_norm = RMSNorm(d, cfg.norm_eps, rngs=rngs, dtype=cfg.dtype)
        self.gate = dense("gate", d, cfg.mlp_dim, "embed", "mlp")
        self.up = dense("up", d, cfg.mlp_dim, "embed", "mlp")
        self.down = dense("down", cfg.mlp_dim, d, "mlp", "embed")

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
                 adapter: jax.Array | None, deterministic: bool) -> jax.Array:
        q, k, v = self._qkv(x, positions, adapter, deterministic)
        return self._finish(x, attend(q, k, v, mask, self.cfg.attention), adapter, deterministic)

    def extend(self, x: jax.Array, positions: jax.Array, mask: jax.Array, adapter: jax.Array | None,
               k_cache: jax.Array, v_cache: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``__call__`` for new tokens at slots ``positions`` of a KV cache (see ``Transformer.extend``).

        Their keys/values are written into the caches [B, Lmax, Hkv, D] first, so the new tokens
        attend to the cached ones and to each other through ``mask`` [B, T, Lmax].
        """
        q, k, v = self._qkv(x, positions, adapter, True)
        rows = jnp.arange(x.shape[0])[:, None]
        k_cache = k_cache.at[rows, positions].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[rows, positions].set(v.astype(v_cache.dtype), mode="drop")
        return self._finish(x, attend(q, k_cache, v_cache, mask, self.cfg.attention), adapter, True), k_cache, v_cache

    def _qkv(self, x, positions, adapter, deterministic):
        cfg = self.cfg
        b, n, _ = x.shape
        kw = dict(deterministic=deterministic)
        h = self.attn_norm(x)
        q = self.q(h, adapter, **kw).reshape(b, n, cfg.n_heads, cfg.head_dim)
        k = self.k(h, adapter, **kw).reshape(b, n, cfg.n_kv_heads, cfg.head_dim)
        v = self.v(h, adapter, **kw).reshape(b, n, cfg.n_kv_heads, cfg.head_dim)
        return rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta), v

    def _finish(self, x, a, adapter, deterministic):
        """Output projection and MLP, both residual, on attention output a [B, L, H, D]."""
        cfg = self.cfg
        b, n = x.shape[:2]
        kw = dict(deterministic=deterministic)
        a = a.reshape(b, n, cfg.n_heads * cfg.head_dim)
        x = x + self.o(a, adapter, **kw).astype(jnp.float32)
        h = self.mlp_norm(x)
        g = jax.nn.silu(self.gate(h, adapter, **kw)) * self.up(h, adapter, **kw)
        return x + self.down(g, adapter, **kw).astype(jnp.float32)


def scan_blocks(stacked, x: jax.Array, positions: jax.Array, mask: jax.Array, adapter: jax.Array | None,
                deterministic: bool, policy) -> jax.Array:
    """The blocks of a stacked ``Block`` (``layer_stack.stack_blocks``) applied in order as one ``lax.scan``:
    the same values as the unrolled Python loop (dropout included: each layer keeps its own RNG stream,
    whose counts are written back), but the step compiles one block instead of ``n_layers`` and, with a
    remat ``policy``, the backward pass keeps only each block's input on every backend (XLA:CPU merges an
    unrolled recomputation back into the forward pass)."""
    graphdef, state = nnx.split(stacked)

    def body(h, layer_state):
        layer = nnx.merge(graphdef, layer_state)
        h = partitioning.constrain(layer(h, positions, mask, adapter, deterministic), RESIDUAL)
        return h, nnx.state(layer, nnx.RngState)

    if policy is not None:   # inside a scan the recomputation cannot be merged away: no barrier needed
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, rng_states = jax.lax.scan(body, x, state)
    nnx.update(stacked, rng_states)   # dropout advanced each layer's stream: keep the counts
    return x


class Transformer(nnx.Module):
    """Base Llama decoder; ``__call__`` gives pre-final-norm hidden states, ``logits`` the LM head."""

    def __init__(self, cfg: TransformerConfig, lora: LoraConfig | None, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.lora = lora
        self.embedding = nnx.Param(
            BASE_INIT_STD * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), jnp.float32),
            out_sharding=("vocab", "embed"),
        )
        if cfg.canon:   # torch Conv1d's default init for a depthwise width-K filter: U(+-1/sqrt(K))
            bound = cfg.canon ** -0.5
            self.canon = nnx.Param(jax.random.uniform(rngs.params(), (cfg.canon, cfg.d_model), jnp.float32,
                                                      -bound, bound), out_sharding=(None, "embed"))
        else:
            self.canon = nnx.data(None)
        blocks = [Block(cfg, lora, rngs=rngs) for _ in range(cfg.n_layers)]
        # scan_layers: one Block whose variables are stacked on a leading "layers" axis (layer_stack.py)
        self.layers = stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs, dtype=cfg.dtype)
        if cfg.tie_embeddings:
            self.lm_head = nnx.data(None)
        else:
            self.lm_head = nnx.Param(
                BASE_INIT_STD * jax.random.normal(rngs.params(), (cfg.d_model, cfg.vocab_size), jnp.float32),
                out_sharding=("embed", "vocab"),
            )

    def __call__(self, inputs: jax.Array, positions: jax.Array, segments: jax.Array,
                 adapter: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
        """inputs/positions/segments int [B, L]; adapter int [B] or None -> float32 [B, L, d]."""
        if not inputs.shape == positions.shape == segments.shape:
            raise ValueError(
                f"Transformer: inputs {inputs.shape}, positions {positions.shape} and segments "
                f"{segments.shape} must share shape [B, L]"
            )
        x = jnp.take(self.embedding[...], inputs, axis=0)  # float32 residual stream
        if self.canon is not None:
            x = canon_mix(x, self.canon[...], positions, segments)
        x = partitioning.constrain(x, RESIDUAL)
        mask = attention_mask(segments)

        policy = REMAT_POLICIES[self.cfg.remat]
        if self.cfg.scan_layers:
            return scan_blocks(self.layers, x, positions, mask, adapter, deterministic, policy)

        def run(layer, x, positions, mask, adapter):
            return layer(x, positions, mask, adapter, deterministic)

        if policy is not None:
            run = nnx.remat(run, policy=policy)
        for layer in self.layers:
            x = partitioning.constrain(run(layer, x, positions, mask, adapter), RESIDUAL)
        return x

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache of ``max_len`` slots per row."""
        cfg = self.cfg
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.n_layers))
        tokens = jnp.zeros((batch, max_len), jnp.int32) if cfg.canon else None
        return KVCache(zeros, zeros, jnp.zeros((batch,), jnp.int32), tokens)

    def extend(self, inputs: jax.Array, cache: KVCache, adapter: jax.Array | None = None,
               num_new: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """Run ``inputs`` int [B, T] as the next tokens of each row -> (float32 [B, T, d], cache).

        Token t of row b goes to slot (and position) ``cache.lengths[b] + t`` and attends to every
        slot up to its own. ``num_new`` int [B] (default T) is how many of the T tokens are real:
        a right-padded prefill passes the prompt lengths, so pad tokens are written but not counted
        and the next token overwrites them. Equals ``__call__`` on the whole sequence with
        ``segments`` 1 on real tokens, as long as ``lengths + T <= max_len`` (writes past the
        end are dropped, so the caller must size the cache).
        """
        b, t = inputs.shape
        if cache.lengths.shape != (b,):
            raise ValueError(f"Transformer.extend: inputs {inputs.shape} vs cache.lengths "
                             f"{cache.lengths.shape}: batch sizes differ")
        if len(cache.k) != self.cfg.n_layers:
            raise ValueError(f"Transformer.extend: cache has {len(cache.k)} layers, model "
                             f"{self.cfg.n_layers}")
        positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        mask = jnp.arange(cache.max_len)[None, None, :] <= positions[:, :, None]
        table = self.embedding[...]
        x = jnp.take(table, inputs, axis=0)
        tokens = cache.tokens
        if self.canon is not None:   # the canon layer reads the earlier tokens' ids from the cache
            if tokens is None:
                raise ValueError("Transformer.extend: a model with a canon layer needs a cache from its "
                                 "own init_cache (one that keeps token ids)")
            rows = jnp.arange(b)[:, None]
            tokens = tokens.at[rows, positions].set(inputs.astype(jnp.int32), mode="drop")
            def predecessor(i):   # the cached slot i back (slot = position), read as an embedding
                prev = jnp.take_along_axis(tokens, jnp.clip(positions - i, 0, cache.max_len - 1), 1)
                return table[prev], positions - i >= 0
            x = canon_sum(x, self.canon[...], predecessor)
        ks, vs = [], []
        for layer, k, v in zip(self.blocks(), cache.k, cache.v):
            x, k, v = layer.extend(x, positions, mask, adapter, k, v)
            ks.append(k)
            vs.append(v)
        added = jnp.full((b,), t, jnp.int32) if num_new is None else num_new.astype(jnp.int32)
        return x, KVCache(tuple(ks), tuple(vs), cache.lengths + added, tokens)

    def blocks(self) -> list[Block]:
        """The blocks in order, as separate ``Block``s in either layout (copies of a stacked one's layers)."""
        if self.cfg.scan_layers:
            return unstack_blocks(self.layers)
        return list(self.layers)

    def final_norm(self, x: jax.Array) -> jax.Array:
        return self.norm(x)

    def head(self, h: jax.Array) -> jax.Array:
        """LM head on normed h -> float32 logits [B, L, vocab] (tied: embedding transposed)."""
        h = h.astype(self.cfg.dtype)
        if self.lm_head is None:
            w = self.embedding[...].astype(self.cfg.dtype)
            out = rows.matmul(h, w.T, preferred_element_type=jnp.float32)
        else:
            w = self.lm_head[...].astype(self.cfg.dtype)
            out = rows.matmul(h, w, preferred_element_type=jnp.float32)
        return partitioning.constrain(out, ("batch", "length", "vocab"))

    def logits(self, x: jax.Array) -> jax.Array:
        return self.head(self.final_norm(x))
