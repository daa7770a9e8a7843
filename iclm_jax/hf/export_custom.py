"""Export a whole ICLM as a transformers custom model (``trust_remote_code=True``).

``write_custom_model`` writes ``config.json`` (with ``auto_map``), ``modeling_iclm.py`` (a copy of
``iclm_jax/hf/modeling_iclm.py``, which needs only torch + transformers), ``model.safetensors`` and the
tokenizer files (the same as every module directory's: ``files.save_tokenizer``). Tensor layout:
base weights under the usual Llama names in torch layout ([out, in]), LoRA stacks in our layout
(``lora_A`` [M, in, r], ``lora_B`` [M, r, out], M adapter slots), router and aggregator tensors as
``router_*`` / ``aggregator_*``. Nothing here imports torch.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np

from iclm_jax.hf.files import save_tokenizer, save_weights
from iclm_jax.model.iclm import ICLM

_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modeling_iclm.py")
_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
          "up": "up_proj", "down": "down_proj"}


def _np(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32))


def custom_config(model: ICLM, tokenizer=None) -> dict:
    """The ``config.json`` dict of ``modeling_iclm.ICLMConfig`` for ``model``."""
    cfg, base = model.cfg, model.cfg.base
    router = cfg.router
    mode = router.mode
    if mode == "soft" and model.router is not None:
        raise ValueError("export: router.mode='soft' mixes every module per row; the custom model "
                         "implements hard (nearest-code) routing only")
    if mode == "oracle":
        warnings.warn("export: router.mode='oracle' needs gold domains; the exported model routes "
                      "to the nearest code instead", stacklevel=2)
    out = {
        "model_type": "iclm", "architectures": ["ICLMForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_iclm.ICLMConfig",
                     "AutoModelForCausalLM": "modeling_iclm.ICLMForCausalLM"},
        "torch_dtype": "float32", "dtype": "float32",
        "vocab_size": base.vocab_size, "hidden_size": base.d_model,
        "num_hidden_layers": base.n_layers, "num_attention_heads": base.n_heads,
        "num_key_value_heads": base.n_kv_heads, "head_dim": base.head_dim,
        "intermediate_size": base.mlp_dim, "rope_theta": float(base.rope_theta),
        "rms_norm_eps": float(base.norm_eps), "tie_embeddings": bool(base.tie_embeddings),
        "num_modules": cfg.num_modules, "invariant": bool(cfg.invariant),
        "num_adapters": cfg.num_adapters, "lora_rank": cfg.lora_rank,
        "lora_alpha": float(cfg.lora_alpha), "lora_targets": list(cfg.lora_targets),
        "router_source": cfg.router_source, "use_router": model.router is not None,
        "router_mode": mode, "router_center": router.center,
        "router_normalize": router.normalize,
        "router_proj_dim": router.proj_dim,
        "aggregator": cfg.aggregator, "invariant_weight": float(cfg.invariant_weight),
    }
    if tokenizer is not None:
        out.update(pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
                   bos_token_id=tokenizer.bos_id)
    return out


def custom_tensors(model: ICLM) -> dict[str, np.ndarray]:
    """Every tensor ``ICLMForCausalLM`` loads, by its state-dict name."""
    base, cfg = model.base, model.cfg
    t = {"embed_tokens.weight": _np(base.embedding[...]), "norm.weight": _np(base.norm.weight[...])}
    if not cfg.base.tie_embeddings:
        t["lm_head.weight"] = _np(base.lm_head[...]).T.copy()
    for i, layer in enumerate(base.blocks()):
        p = f"layers.{i}."
        t[p + "input_layernorm.weight"] = _np(layer.attn_norm.weight[...])
        t[p + "post_attention_layernorm.weight"] = _np(layer.mlp_norm.weight[...])
        for ours, theirs in _NAMES.items():
            lin = getattr(layer, ours)
            t[p + theirs + ".weight"] = _np(lin.kernel[...]).T.copy()
            if lin.lora_a is not None:
                t[p + theirs + ".lora_A"] = _np(lin.lora_a[...])
                t[p + theirs + ".lora_B"] = _np(lin.lora_b[...])
    r = model.router
    if r is not None:
        t["router_codebook"] = _np(r.codebook[...])
        if r.center:
            t["router_mean"] = _np(r.mean[...])
        if r.proj is not None:
            t["router_proj"] = _np(r.proj[...])
    agg = model.aggregator
    if agg is not None and agg.kind == "concat":
        t["aggregator_scale"] = _np(agg.scale[...])
        t["aggregator_kernel"] = _np(agg.kernel[...])
    return t


def write_custom_model(model: ICLM, tokenizer, out_dir: str, shard_bytes: int | None = None) -> None:
    """Write ``model`` (+ ``tokenizer``, may be None) into ``out_dir`` as a custom transformers model."""
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.base.vocab_size:
        raise ValueError(f"export: tokenizer vocab_size={tokenizer.vocab_size} exceeds the model's "
                         f"vocab_size={model.cfg.base.vocab_size}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(custom_config(model, tokenizer), f, indent=2)
    shutil.copyfile(_TEMPLATE, os.path.join(out_dir, "modeling_iclm.py"))
    # shards + model.safetensors.index.json above shard_bytes, like the module exports
    save_weights(custom_tensors(model), out_dir, shard_bytes=shard_bytes or 1 << 62)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir)
