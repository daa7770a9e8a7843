"""Writing export files: safetensors weights (sharded with an index above a size), JSON, and the
tokenizer files ``AutoTokenizer`` reads. Shared by every export layout (``export``, ``export_custom``)."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np
from tokenizers import Tokenizer as _Tk
from tokenizers.processors import TemplateProcessing

from iclm_jax.data.tokenizer import Tokenizer

DEFAULT_SHARD_BYTES = 2 * 2**30   # safetensors shard size of an export


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
    write_json(os.path.join(directory, f"{stem}.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_json(path: str, obj: Any) -> None:
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
    write_json(os.path.join(directory, "special_tokens_map.json"), special)
    write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
        "add_bos_token": tokenizer.bos_id is not None, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, **special})
