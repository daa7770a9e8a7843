"""Export a trained ICLM to Hugging Face formats that plain ``transformers`` / ``peft`` load.

Layout of ``DIR`` (``python -m iclm_jax.hf.export --workdir RUN --out DIR [--force]``)::

    base/                 the un-merged base, a standard Llama checkpoint
    modules/<name>/       the base with that module's LoRA merged in (W + scale * A[m] @ B[m])
    adapters/<name>/      that module's LoRA in PEFT format, for ``PeftModel.from_pretrained``
    config.json, ...      the whole ICLM as a custom model (``export_custom``, when available)

``<name>``: ``specific_0..K-1``, ``invariant`` and ``router`` (when those adapter slots exist).
Everything is written into a temporary directory beside ``DIR`` and renamed at the end, so an error
never leaves a half-written ``DIR``; a non-empty ``DIR`` is refused unless ``force``. Every problem
with ``DIR`` (a file on its path, no permission, a full disk) is an ``OutputError`` of one line
naming the path, found before the checkpoint is loaded where it can be.
Adapters name their base relatively (``../../base``), so a moved or copied export uses its own base.
Our kernels are [in, out]; torch Linear weights are [out, in], hence the transposes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Mapping

import jax
import numpy as np

from iclm_jax.hf.import_hf import _LAYER_NAMES, _TOP_NAMES
from iclm_jax.hf.weights import base_params
from iclm_jax.model.transformer import TransformerConfig

__all__ = ["export", "export_model", "check_out", "check_exportable", "OutputError", "NotExportable",
           "ADAPTER_BASE", "hf_config", "ours_to_hf", "module_names", "base_weights", "merged_weights",
           "peft_weights", "save_weights", "save_tokenizer", "main"]

DEFAULT_SHARD_BYTES = 2 * 2**30
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
    """{our name: float32 array} of a Transformer's base parameters (no LoRA)."""
    return {name: _np(v.get_value()) for name, v in base_params(base).items()}


def _lora_layers(base):
    """(layer index, projection name, LoRALinear) of every projection carrying adapters."""
    for i, layer in enumerate(base.layers):
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


def _save_file(tensors: Mapping[str, np.ndarray], path: str) -> None:
    """safetensors' ``save_file``; its I/O errors (a full disk) become the OSError they are."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file
    try:
        save_file(dict(tensors), path, metadata={"format": "pt"})
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), path) from None


def save_weights(tensors: Mapping[str, np.ndarray], directory: str, *,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, stem: str = "model") -> None:
    """``stem.safetensors``, or shards + ``stem.safetensors.index.json`` above ``shard_bytes``."""
    total = sum(a.nbytes for a in tensors.values())
    if total <= shard_bytes:
        _save_file(tensors, os.path.join(directory, f"{stem}.safetensors"))
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        a = tensors[name]
        if shards[-1] and size + a.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"{stem}-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_file(shard, os.path.join(directory, file))
        weight_map.update({name: file for name in shard})
    _write_json(os.path.join(directory, f"{stem}.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def save_tokenizer(tokenizer, directory: str) -> None:
    """tokenizer.json (+ our special_tokens.json) and the files AutoTokenizer needs.

    Every training row starts with BOS when the tokenizer has one (``data.pipeline``), so the
    exported tokenizer.json adds it (a post-processor; ``add_bos_token`` says the same to
    transformers): ``AutoTokenizer(text)`` gives the ids training used, ``add_special_tokens=False``
    the bare text. EOS is never added: it ends answers, not prompts. The same files go into every
    directory of an export (base, modules, adapters' base, the whole-ICLM root).
    """
    from tokenizers import Tokenizer as _Tk
    from tokenizers.processors import TemplateProcessing

    from iclm_jax.data.tokenizer import Tokenizer
    tk = _Tk.from_str(tokenizer.tk.to_str())       # a copy: the caller's tokenizer is unchanged
    name = tk.id_to_token
    special = {"eos_token": name(tokenizer.eos_id), "pad_token": name(tokenizer.pad_id)}
    if tokenizer.bos_id is not None:
        bos = special["bos_token"] = name(tokenizer.bos_id)
        tk.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                               special_tokens=[(bos, tokenizer.bos_id)])
    unk = getattr(tk.model, "unk_token", None)
    if unk is not None and tk.token_to_id(unk) is not None:
        special["unk_token"] = unk
    Tokenizer(tk, pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id,
              bos_id=tokenizer.bos_id).save(directory)
    _write_json(os.path.join(directory, "special_tokens_map.json"), special)
    _write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
        "add_bos_token": tokenizer.bos_id is not None, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, **special})


def save_llama(weights: Mapping[str, np.ndarray], cfg: TransformerConfig, tokenizer,
               directory: str, *, shard_bytes: int, max_positions: int) -> None:
    """A standard Llama checkpoint of ``weights`` (our names) in ``directory``."""
    os.makedirs(directory, exist_ok=True)
    _write_json(os.path.join(directory, "config.json"),
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


def _write_all(model, tokenizer, tmp: str, final: str, *, shard_bytes: int, max_positions: int,
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
        _write_json(os.path.join(adir, "adapter_config.json"), _adapter_config(icfg))
        save_weights(peft_weights(base, slot), adir, shard_bytes=1 << 62, stem="adapter_model")
    if custom:
        try:
            from iclm_jax.hf.export_custom import write_custom_model
        except ImportError as e:
            print(f"export: item 3 (whole-ICLM custom model in {final}) skipped: {e}",
                  file=sys.stderr)
        else:
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
        _write_all(model, tokenizer, tmp, final, shard_bytes=shard_bytes,
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


def export(workdir: str, out: str, *, force: bool = False,
           shard_bytes: int = DEFAULT_SHARD_BYTES, custom: bool = True) -> str:
    """Export the latest checkpoint of the run in ``workdir`` to ``out`` (see module docstring)."""
    final = check_out(out, force)             # before the checkpoint load (seconds to minutes)
    model, tokenizer, max_len = _load_run(workdir)
    return export_model(model, tokenizer, final, force=force, shard_bytes=shard_bytes,
                        max_positions=max(4096, max_len), custom=custom)


def _load_run(workdir: str):
    """(ICLM, tokenizer, max_len) of the latest checkpoint of the run in ``workdir``."""
    from flax import nnx

    from iclm_jax.train.restore_run import load
    run = load(workdir)
    return nnx.merge(run.graphdef, run.state).model, run.data.tokenizer, int(run.data.max_len)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="iclm-export", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="run directory (config.json + checkpoints)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES,
                   help="shard safetensors above this many bytes (default 2 GiB)")
    args = p.parse_args(argv)
    try:
        path = export(args.workdir, args.out, force=args.force, shard_bytes=args.shard_bytes)
    except (OutputError, NotExportable, FileNotFoundError) as e:
        print(f"iclm-export: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.workdir} -> {path}")
    return 0


def cli() -> None:
    """Console script ``iclm-export``."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
