"""Pretrained Llama-family weights into our Transformer (Hugging Face directories and GGUF files).

One entry point for a run's ``model.init``::

    cfg, weights = load_pretrained(spec)          # spec: "smollm2" | HF directory | *.gguf file
    load_into(model.base, weights)                # or a train state's state["model"]["base"]
    tok = pretrained_tokenizer(spec)              # its tokenizer comes along

``load_into`` refuses missing, unexpected and mis-shaped tensors together, by name.
"""
from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from iclm_jax.data import tokenizer as tk
from iclm_jax.hf.import_gguf import load_gguf, smollm2_gguf_path
from iclm_jax.hf.import_hf import config_from_hf, load_hf_weights
from iclm_jax.hf.weights import WeightMismatchError, check_weights, load_into, read_safetensors
from iclm_jax.model.transformer import TransformerConfig

__all__ = ["load_pretrained", "pretrained_tokenizer", "resolve", "load_into", "load_hf_weights",
           "load_gguf", "config_from_hf", "smollm2_gguf_path", "check_weights",
           "read_safetensors", "WeightMismatchError"]


def resolve(spec: str) -> tuple[str, str]:
    """("gguf" | "hf", path) of a ``model.init``: "smollm2", a .gguf file or an HF directory."""
    if spec == "smollm2":
        return "gguf", smollm2_gguf_path()
    if os.path.isfile(spec) and spec.endswith(".gguf"):
        return "gguf", spec
    if os.path.isfile(os.path.join(spec, "config.json")):
        return "hf", spec
    raise FileNotFoundError(f"model.init={spec!r}: expected 'smollm2', a .gguf file, or a Hugging "
                            f"Face directory with config.json and safetensors weights")


def load_pretrained(spec: str, *, dtype: Any = jnp.float32,
                    lazy: bool = False) -> tuple[TransformerConfig, dict[str, np.ndarray]]:
    """(config, {our name: array}) of ``spec`` (see ``resolve``); ``lazy``: HF directories only."""
    kind, path = resolve(spec)
    if kind == "gguf":
        return load_gguf(path, dtype=dtype)
    return load_hf_weights(path, dtype=dtype, lazy=lazy)


def pretrained_tokenizer(spec: str):
    """The tokenizer shipped with ``spec``: the GGUF's vocabulary or the dir's tokenizer.json."""
    if spec == "smollm2":
        return tk.smollm2_tokenizer()     # cached build of the same GGUF vocabulary
    kind, path = resolve(spec)
    return tk.tokenizer_from_gguf(path) if kind == "gguf" else tk.load_tokenizer(path)
