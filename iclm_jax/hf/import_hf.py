"""Import a Llama-family checkpoint from a local Hugging Face directory (safetensors; no torch).

``config.json`` becomes a TransformerConfig; ``model.safetensors`` (or the shards named by
``model.safetensors.index.json``) become ``{our name: array}`` in our layout (torch Linear weights
are [out, in]; our kernels are [in, out]). Anything our Transformer cannot compute exactly --
attention/MLP biases, RoPE scaling, sliding windows, other activations -- is refused with the
config field at fault rather than imported into a silently different model.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from iclm_jax.hf.weights import load_into, map_name, read_safetensors, to_float32
from iclm_jax.model.transformer import TransformerConfig

__all__ = ["config_from_hf", "hf_to_ours", "load_hf_weights", "load_into"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_LAYER_NAMES = {  # HF suffix inside a layer -> (ours, transpose)
    "input_layernorm": ("attn_norm.weight", False),
    "post_attention_layernorm": ("mlp_norm.weight", False),
    "self_attn.q_proj": ("q.kernel", True), "self_attn.k_proj": ("k.kernel", True),
    "self_attn.v_proj": ("v.kernel", True), "self_attn.o_proj": ("o.kernel", True),
    "mlp.gate_proj": ("gate.kernel", True), "mlp.up_proj": ("up.kernel", True),
    "mlp.down_proj": ("down.kernel", True),
}
_TOP_NAMES = {"model.embed_tokens.weight": ("embedding", False),
              "model.norm.weight": ("norm.weight", False),
              "lm_head.weight": ("lm_head", True)}


def _rope(hf: dict) -> tuple[float, str]:
    """(theta, rope_type) of transformers 5 ``rope_parameters`` or older rope_theta/rope_scaling."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:            # per-layer-type form
        params = params["full_attention"]
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), kind


def config_from_hf(hf_config: dict, *, dtype: Any = jnp.float32) -> TransformerConfig:
    """TransformerConfig of a Hugging Face ``config.json`` dict (Llama; windowless Mistral)."""
    kind = hf_config.get("model_type")
    archs = hf_config.get("architectures") or []
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.json: model_type={kind!r} (architectures {archs}) is not "
                         f"supported; iclm_jax imports {SUPPORTED_MODEL_TYPES} decoders only")
    problems = []
    theta, rope_type = _rope(hf_config)
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (only unscaled 'default' RoPE is implemented)")
    for field in ("attention_bias", "mlp_bias"):
        if hf_config.get(field):
            problems.append(f"{field}=true (our projections have no bias)")
    if hf_config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf_config['hidden_act']!r} (SwiGLU needs 'silu')")
    if hf_config.get("sliding_window") is not None:
        problems.append(f"sliding_window={hf_config['sliding_window']} (full attention only)")
    if problems:
        raise ValueError("config.json: cannot import exactly: " + "; ".join(problems))
    heads = int(hf_config["num_attention_heads"])
    return TransformerConfig(
        vocab_size=int(hf_config["vocab_size"]),
        d_model=int(hf_config["hidden_size"]),
        n_layers=int(hf_config["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(hf_config.get("num_key_value_heads") or heads),
        head_dim=int(hf_config.get("head_dim") or hf_config["hidden_size"] // heads),
        mlp_dim=int(hf_config["intermediate_size"]),
        rope_theta=theta,
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        dtype=dtype,
    )


def hf_to_ours(name: str) -> tuple[str, bool] | None:
    """(our name, transpose?) of a transformers Llama tensor name; None if it has no counterpart."""
    return map_name(name, _TOP_NAMES, _LAYER, _LAYER_NAMES)


def _files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no 'weight_map' of tensor name -> shard file")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {directory}: {missing}")
        return [os.path.join(directory, f) for f in files]
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(
        f"{directory}: no model.safetensors or model.safetensors.index.json (found "
        f"{sorted(os.listdir(directory))}); pickle checkpoints (*.bin, *.pt) are refused -- "
        f"convert them to safetensors")


def load_hf_weights(directory: str, *, dtype: Any = jnp.float32,
                    lazy: bool = False) -> tuple[TransformerConfig, dict[str, np.ndarray]]:
    """(config, {our name: array}) of a local Hugging Face Llama directory.

    Arrays are float32 copies, or with ``lazy=True`` read-only memory-mapped views in the file's
    dtype (transposes are views too) that ``load_into`` reads device slice by device slice: the way
    to load a model larger than one host's float32 copy. Tensors without a counterpart keep their
    HF name, so ``load_into`` refuses them by name; the rotary ``inv_freq`` buffers of old
    checkpoints are dropped (recomputed), and so is a saved ``lm_head`` of a tied model
    (transformers ignores it too).
    """
    with open(os.path.join(directory, "config.json")) as f:
        cfg = config_from_hf(json.load(f), dtype=dtype)
    weights: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for path in _files(directory):
        for name, array in read_safetensors(path).items():
            tied_head = name == "lm_head.weight" and cfg.tie_embeddings
            if name.endswith("rotary_emb.inv_freq") or tied_head:
                continue
            mapped = hf_to_ours(name)
            ours, transpose = mapped if mapped else (name, False)
            if ours in weights:
                raise ValueError(f"{name} appears twice: in {origin[ours]} and {path}")
            weights[ours], origin[ours] = (array.T if transpose else array), path
    return cfg, (weights if lazy else to_float32(weights))
