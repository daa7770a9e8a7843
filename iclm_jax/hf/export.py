"""Export a trained ICLM to Hugging Face formats that plain ``transformers`` / ``peft`` load.

Layout of ``DIR`` (``export_model``; the command line ``iclm-export --workdir RUN --out DIR [--force]``
exports a run's latest checkpoint: ``iclm_jax/export.py``)::

    base/                 the un-merged base, a standard Llama checkpoint
    modules/<name>/       the base with that module's LoRA merged in (W + scale * A[m] @ B[m])
    adapters/<name>/      that module's LoRA in PEFT format, for ``PeftModel.from_pretrained``
    config.json, ...      the whole ICLM as a custom model (``export_custom``)

``<name>``: ``specific_0..K-1``, ``invariant`` and ``router`` (when those adapter slots exist).
Everything is written into a temporary directory beside ``DIR`` and renamed at the end, so an error
never leaves a half-written ``DIR``; a non-empty ``DIR`` is refused unless ``force``. Every problem
with ``DIR`` (a file on its path, no permission, a full disk) is an ``OutputError`` of one line
naming the path, found before the checkpoint is loaded where it can be.
Adapters name their base relatively (``../../base``), so a moved or copied export uses its own base.
Our kernels are [in, out]; torch Linear weights are [out, in], hence the transposes.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import numpy as np

from iclm_jax.hf.export_custom import write_custom_model
from iclm_jax.hf.files import DEFAULT_SHARD_BYTES, save_tokenizer, save_weights, write_json
from iclm_jax.hf.import_hf import _LAYER_NAMES, _TOP_NAMES
from iclm_jax.hf.weights import base_params, per_layer
from iclm_jax.model.transformer import TransformerConfig

__all__ = ["export_model", "check_out", "check_exportable", "OutputError", "NotExportable",
           "ADAPTER_BASE", "hf_config", "ours_to_hf", "module_names", "base_weights", "merged_weights",
           "peft_weights", "save_weights", "save_tokenizer"]

ADAPTER_BASE = "../../base"     # adapters/<name>/adapter_config.json: the base, from that directory
_OURS_TO_HF_LAYER = {ours: (hf, t) for hf, (ours, t) in _LAYER_NAMES.items()}
_OURS_TO_HF_TOP = {ours: (hf, t) for hf, (ours, t) in _TOP_NAMES.items()}
_PEFT_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                 "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def ours_to_hf(name: str) -> tuple[str, bool]:
    """(transformers Llama name, transpose?) of one of our base parameter names."""
    if name in _OURS_TO_HF_TOP:
        return _OURS_TO_HF_TOP[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _OURS_TO_HF_LAYER:
        hf, transpose = _OURS_TO_HF_LAYER[parts[2]]
        return f"model.layers.{parts[1]}.{hf}.weight", transpose
    raise KeyError(f"{name!r}: no transformers Llama counterpart")


def hf_config(cfg: TransformerConfig, tokenizer=None, *, max_positions: int = 4096) -> dict:
    """LlamaConfig fields of ``cfg`` (float32; both the v5 ``rope_parameters`` and ``rope_theta``)."""
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": max_positions, "initializer_range": 0.02,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "pretraining_tp": 1, "use_cache": True,
        "tie_word_embeddings": bool(cfg.tie_embeddings), "torch_dtype": "float32",
        "dtype": "float32",
    }
    if tokenizer is not None:
        out.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                   pad_token_id=tokenizer.pad_id)
    return out


def _np(value) -> np.ndarray:
    return np.asarray(jax.device_get(value), dtype=np.float32)


def base_weights(base) -> dict[str, np.ndarray]:
    """{our name: float32 array} of a Transformer's base parameters (no LoRA), per layer in either layout."""
    return per_layer({name: _np(v.get_value()) for name, v in base_params(base).items()})


def _lora_layers(base):
    """(layer index, projection name, LoRALinear) of every projection carrying adapters."""
    for i, layer in enumerate(base.blocks()):
        for proj in _PEFT_TARGETS:
            lin = getattr(layer, proj)
            if lin.lora is not None:
                yield i, proj, lin


def merged_weights(base, slot: int, weights: Mapping[str, np.ndarray] | None = None
                   ) -> dict[str, np.ndarray]:
    """Base weights with adapter ``slot`` merged: kernel + scale * A[slot] @ B[slot]."""
    out = dict(base_weights(base) if weights is None else weights)
    for i, proj, lin in _lora_layers(base):
        a, b = _np(lin.lora_a[...][slot]), _np(lin.lora_b[...][slot])
        name = f"layers.{i}.{proj}.kernel"
        out[name] = (out[name] + np.float32(lin.lora.scale) * (a @ b)).astype(np.float32)
    return out


def peft_weights(base, slot: int) -> dict[str, np.ndarray]:
    """PEFT tensors of adapter ``slot``: lora_A [r, in] = A.T, lora_B [out, r] = B.T."""
    out = {}
    for i, proj, lin in _lora_layers(base):
        hf = ours_to_hf(f"layers.{i}.{proj}.kernel")[0].removesuffix(".weight")
        prefix = f"base_model.model.{hf}"
        out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(_np(lin.lora_a[...][slot]).T)
        out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(_np(lin.lora_b[...][slot]).T)
    return out


def to_hf_names(weights: Mapping[str, np.ndarray], tie: bool) -> dict[str, np.ndarray]:
    """Our names/layout -> transformers names/layout (a tied model saves no lm_head)."""
    out = {}
    for name, array in weights.items():
        if tie and name == "lm_head":
            continue
        hf, transpose = ours_to_hf(name)
        out[hf] = np.ascontiguousarray(array.T if transpose else array, dtype=np.float32)
    return out


class OutputError(Exception):
    """The export directory cannot be written: one line naming the path and the problem."""


class NotExportable(Exception):
    """The model has a part no transformers class computes: one line naming the config field."""


def check_exportable(cfg: TransformerConfig) -> None:
    if cfg.canon:
        raise NotExportable(f"model.canon={cfg.canon}: a canon layer on the embeddings has no transformers "
                            f"Llama counterpart, so this run cannot be exported (model.canon=0 runs can)")


def save_llama(weights: Mapping[str, np.ndarray], cfg: TransformerConfig, tokenizer,
               directory: str, *, shard_bytes: int, max_positions: int) -> None:
    """A standard Llama checkpoint of ``weights`` (our names) in ``directory``."""
    os.makedirs(directory, exist_ok=True)
    write_json(os.path.join(directory, "config.json"),
               hf_config(cfg, tokenizer, max_positions=max_positions))
    save_weights(to_hf_names(weights, cfg.tie_embeddings), directory, shard_bytes=shard_bytes)
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)


def module_names(icfg) -> dict[str, int]:
    """{export name: adapter slot} of an ICLMConfig (see ``ICLM``'s slot order)."""
    names = {f"specific_{m}": m for m in range(icfg.num_modules)}
    if icfg.invariant:
        names["invariant"] = icfg.invariant_slot
    if icfg.router_source == "adapter":
        names["router"] = icfg.router_slot
    return names


def _adapter_config(icfg) -> dict:
    targets = [_PEFT_TARGETS[t] for t in _PEFT_TARGETS if t in tuple(icfg.lora_targets)]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": icfg.lora_rank,
            "lora_alpha": icfg.lora_alpha, "lora_dropout": icfg.lora_dropout,
            "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
            "base_model_name_or_path": ADAPTER_BASE, "revision": None}


def check_out(out: str, force: bool) -> str:
    """Absolute ``out`` if an export can be written there, else ``OutputError`` (one line).

    Cheap, so it runs before the checkpoint is loaded: ``out`` must not be a file, nor a non-empty
    directory unless ``force``; its nearest existing ancestor must be a directory in which a new
    directory can be created (tried: permissions alone do not tell, e.g. for root or a read-only
    file system).
    """
    final = os.path.abspath(out)
    if os.path.lexists(final) and not os.path.isdir(final):
        raise OutputError(f"--out {final}: exists and is not a directory")
    try:
        run = _run_inside(final) if os.path.isdir(final) else None
        if run is not None:
            raise OutputError(f"--out {final}: holds a training run ({run}); an export never replaces a run, "
                              "even with --force")
        if os.path.isdir(final) and os.listdir(final) and not force:
            raise OutputError(f"--out {final}: directory exists and is not empty; pass --force to "
                              f"replace it")
    except OSError as e:
        raise OutputError(f"--out {final}: cannot read it ({e.strerror})") from None
    existing = os.path.dirname(final)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputError(f"--out {final}: {existing} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".iclm-export-probe-", dir=existing))
    except OSError as e:
        raise OutputError(f"--out {final}: cannot create a directory in {existing} "
                          f"({e.strerror})") from None
    return final


def is_run_dir(path: str) -> bool:
    """A training run's workdir: it has ``checkpoints/`` or the workdir lock."""
    return os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, ".lock"))


def _run_inside(path: str) -> str | None:
    """The first run directory at or below ``path``, if any."""
    for root, dirs, _ in os.walk(path):
        if is_run_dir(root):
            return root
        dirs[:] = [d for d in dirs if not d.startswith(".iclm-export")]
    return None


def _write_all(model, tokenizer, tmp: str, *, shard_bytes: int, max_positions: int,
               custom: bool) -> None:
    icfg, base = model.cfg, model.base
    cfg = base.cfg
    kw = dict(shard_bytes=shard_bytes, max_positions=max_positions)
    plain = base_weights(base)
    save_llama(plain, cfg, tokenizer, os.path.join(tmp, "base"), **kw)
    for name, slot in module_names(icfg).items():
        save_llama(merged_weights(base, slot, plain), cfg, tokenizer,
                   os.path.join(tmp, "modules", name), **kw)
        adir = os.path.join(tmp, "adapters", name)
        os.makedirs(adir)
        write_json(os.path.join(adir, "adapter_config.json"), _adapter_config(icfg))
        save_weights(peft_weights(base, slot), adir, shard_bytes=1 << 62, stem="adapter_model")
    if custom:
        write_custom_model(model, tokenizer, tmp, shard_bytes=shard_bytes)


def export_model(model, tokenizer, out: str, *, force: bool = False,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, max_positions: int = 4096,
                 custom: bool = True) -> str:
    """Write every export of ``model`` (an ICLM) into ``out`` atomically; returns its absolute path.

    ``custom``: also write the whole ICLM as a transformers custom model (needs ``export_custom``).
    """
    check_exportable(model.base.cfg)
    final = check_out(out, force)
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    except OSError as e:
        raise OutputError(f"--out {final}: cannot create {e.filename or parent} "
                          f"({e.strerror})") from None
    try:
        _write_all(model, tokenizer, tmp, shard_bytes=shard_bytes,
                   max_positions=max_positions, custom=custom)
        check_out(final, force)                  # something may have appeared meanwhile
        old = None
        if os.path.isdir(final):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=parent)
            os.rename(final, os.path.join(old, "x"))
        try:
            os.rename(tmp, final)
        except OSError:
            if old is not None:                  # put the replaced export back
                os.rename(os.path.join(old, "x"), final)
                os.rmdir(old)
            raise
        if old is not None:
            shutil.rmtree(old)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = str(e.filename or "the export")
        if where.startswith(tmp + os.sep):
            where = os.path.relpath(where, tmp)
        raise OutputError(f"--out {final}: cannot write {where} ({e.strerror or e}); nothing was "
                          f"written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
