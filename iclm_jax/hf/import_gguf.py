"""Import a Llama-architecture GGUF file (llama.cpp's format) via the ``gguf`` package.

Tensors are dequantised to float32 with ``gguf.quants.dequantize`` -- the routine transformers'
own GGUF loader uses, so both sides see identical weights. llama.cpp's converter reorders the rows
of every q/k projection, head by head, from RoPE's rotate-half layout (pairs ``(i, i + d/2)``) to
its interleaved layout (pairs ``(2i, 2i + 1)``); ``unpermute`` restores the Hugging Face order our
``rope`` expects. Dequantised arrays come as [out, in] like torch's Linear and are transposed.
"""
from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from iclm_jax.data.tokenizer import smollm2_gguf_path, tokenizer_from_gguf
from iclm_jax.hf.weights import load_into, map_name
from iclm_jax.model.transformer import TransformerConfig

__all__ = ["load_gguf", "gguf_config", "unpermute", "smollm2_gguf_path", "tokenizer_from_gguf",
           "load_into"]

_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_LAYER_NAMES = {  # GGUF name inside a block -> (ours, transpose)
    "attn_norm": ("attn_norm.weight", False), "ffn_norm": ("mlp_norm.weight", False),
    "attn_q": ("q.kernel", True), "attn_k": ("k.kernel", True), "attn_v": ("v.kernel", True),
    "attn_output": ("o.kernel", True), "ffn_gate": ("gate.kernel", True),
    "ffn_up": ("up.kernel", True), "ffn_down": ("down.kernel", True),
}
_TOP_NAMES = {"token_embd.weight": ("embedding", False),
              "output_norm.weight": ("norm.weight", False),
              "output.weight": ("lm_head", True)}


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp ``convert_hf_to_gguf.py`` ``permute`` on a [heads*head_dim, in] weight.

    ``permute`` views each head's rows as (2, head_dim/2) and swaps the axes; we view them as
    (head_dim/2, 2) and swap back. ``n_heads`` is the projection's own head count (kv heads for k).
    """
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _fields(reader) -> dict[str, Any]:
    return {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith("tokenizer.ggml.")}


def gguf_config(reader, *, dtype: Any = jnp.float32, path: str = "GGUF") -> TransformerConfig:
    """TransformerConfig of a GGUFReader's ``llama.*`` metadata (tied iff no ``output.weight``)."""
    meta = _fields(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture={arch!r}; only 'llama' GGUF files are "
                         f"supported")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"{path}: metadata llama.{key} is missing")
        return value

    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"{path}: llama.rope.scaling.type={scaling!r}; only unscaled RoPE is "
                         f"implemented")
    d, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length") or d // heads)
    rot = meta.get("llama.rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise ValueError(f"{path}: llama.rope.dimension_count={rot} != head_dim {head_dim}; "
                         f"partial rotary embeddings are not implemented")
    names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = meta.get("llama.vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None:
        vocab = int(next(t.shape[-1] for t in reader.tensors if t.name == "token_embd.weight"))
    return TransformerConfig(
        vocab_size=int(vocab), d_model=d, n_layers=int(get("block_count")), n_heads=heads,
        n_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        mlp_dim=int(get("feed_forward_length")), rope_theta=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names, dtype=dtype)


def gguf_to_ours(name: str) -> tuple[str, bool] | None:
    """(our name, transpose?) of a GGUF llama tensor name; None if it has no counterpart."""
    return map_name(name, _TOP_NAMES, _LAYER, _LAYER_NAMES)


def load_gguf(path: str, *,
              dtype: Any = jnp.float32) -> tuple[TransformerConfig, dict[str, np.ndarray]]:
    """(config, {our name: float32 array}) of a llama GGUF (tokenizer: ``tokenizer_from_gguf``).

    Tensors without a counterpart (e.g. ``rope_freqs.weight`` of scaled-RoPE files) keep their GGUF
    name so ``load_into`` refuses them by name.
    """
    import gguf

    reader = gguf.GGUFReader(path)
    cfg = gguf_config(reader, dtype=dtype, path=path)
    weights = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        w = w.reshape(tuple(int(s) for s in reversed(t.shape)))   # GGUF lists dims innermost first
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, cfg.n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, cfg.n_kv_heads)
        mapped = gguf_to_ours(t.name)
        ours, transpose = mapped if mapped else (t.name, False)
        weights[ours] = np.ascontiguousarray(w.T) if transpose else w
    return cfg, weights
