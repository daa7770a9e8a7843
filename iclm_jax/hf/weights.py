"""Pretrained tensors -> our Transformer: safetensors reading, shape checks, sharded placement.

Importers (``import_hf``, ``import_gguf``) produce a flat ``{our name: array}`` dict whose arrays
already have our layout (kernels [in, out]); this module checks that dict against a Transformer
(every problem in one error) and writes it in, each array created directly in its target sharding
by ``jax.make_array_from_callback`` so a host only reads the slices its devices hold.

Our names are the Transformer's parameter paths joined by dots: ``embedding``, ``lm_head``,
``norm.weight``, ``layers.{i}.{attn_norm,mlp_norm}.weight`` and
``layers.{i}.{q,k,v,o,gate,up,down}.kernel``. A model with stacked blocks (``model.scan_layers``) holds
``layers.{name}`` [L, ...] instead: ``load_into`` stacks the importers' per-layer tensors for it
(``stacked_weights``), and ``per_layer`` splits them again for the exporters.
LoRA weights (``LoRAParam``) are never touched.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from iclm_jax.model.layer_stack import plain_path
from iclm_jax.model.lora import LoRAParam

# safetensors dtype tags -> little-endian numpy dtypes. BF16 is why we read the format ourselves:
# safetensors.numpy has no bfloat16, and most released checkpoints are bfloat16.
_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


class WeightMismatchError(ValueError):
    """Imported tensors do not fit the model; the message lists every tensor at fault by name."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as a read-only memory-mapped view (no copy/pickle).

    Format: 8-byte little-endian header size, a JSON header ``{name: {dtype, shape,
    data_offsets}}``, then the raw little-endian data. Views keep the map alive while referenced.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{path}: header size {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
    header.pop("__metadata__", None)
    if not header:
        return {}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        tag = info.get("dtype")
        if tag not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {tag}; weights must be one of "
                             f"{sorted(_SAFETENSORS_DTYPES)}")
        dtype, shape = _SAFETENSORS_DTYPES[tag], tuple(int(s) for s in info["shape"])
        start, end = (8 + n + int(o) for o in info["data_offsets"])
        if end - start != int(np.prod(shape)) * dtype.itemsize or end > size:
            raise ValueError(f"{path}: tensor {name!r} ({tag}, shape {shape}) has data offsets "
                             f"{info['data_offsets']} that do not fit its shape or the file")
        out[name] = data[start:end].view(dtype).reshape(shape)
    return out


def to_float32(weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Materialise (possibly lazy, strided, bfloat16) arrays as contiguous float32 copies."""
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}


def _flat(tree) -> dict[str, Any]:
    """Dotted path -> leaf (Variables kept whole) of an nnx.State, nested dict or flat dict."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {".".join(str(k) for k in plain_path(path)): leaf for path, leaf in leaves}


def base_params(base) -> dict[str, nnx.Variable]:
    """Our name -> base ``nnx.Param`` of a Transformer (or of its state), LoRA excluded."""
    state = nnx.state(base) if isinstance(base, nnx.Module) else base
    return {name: v for name, v in _flat(state).items()
            if isinstance(v, nnx.Param) and not isinstance(v, LoRAParam)}


_STACKED = re.compile(r"layers\.([^0-9.][^.]*\..+)")
_PER_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


class _LayerStack:
    """Per-layer arrays read as one [L, ...] array (a model with stacked blocks), slice by slice: numpy
    indexing of the stack reads only the layers and elements asked for."""

    def __init__(self, parts: list):
        self.parts = parts
        self.shape = (len(parts),) + tuple(np.shape(parts[0]))

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        first, rest = (index[0], index[1:]) if index else (slice(None), ())
        layers = range(*first.indices(self.shape[0])) if isinstance(first, slice) else [first]
        out = np.stack([np.asarray(self.parts[i][rest], np.float32) for i in layers])
        return out if isinstance(first, slice) else out[0]


def stacked_weights(weights: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, Any]:
    """``weights`` (per-layer names, as every importer writes them) renamed for ``targets``' layout: where
    a target is a stacked block's ``layers.<name>`` [L, ...], the ``layers.<i>.<name>`` of every i in
    0..L-1 become one lazily stacked tensor. Anything incomplete stays as it was (``check_weights`` then
    names it)."""
    stacked = {m.group(1): targets[name].shape[0] for name in targets if (m := _STACKED.fullmatch(name))}
    if not stacked:
        return dict(weights)
    groups: dict[str, dict[int, str]] = {}
    for name in weights:
        m = _PER_LAYER.fullmatch(name)
        if m and m.group(2) in stacked:
            groups.setdefault(m.group(2), {})[int(m.group(1))] = name
    out = dict(weights)
    for rest, names in groups.items():
        if sorted(names) == list(range(stacked[rest])):
            out[f"layers.{rest}"] = _LayerStack([out.pop(names[i]) for i in range(stacked[rest])])
    return out


def per_layer(weights: Mapping[str, Any]) -> dict[str, Any]:
    """The reverse of ``stacked_weights`` on arrays: every stacked ``layers.<name>`` [L, ...] becomes the
    ``layers.<i>.<name>`` of each layer (the names importers and exporters use)."""
    out = {}
    for name, array in weights.items():
        m = _STACKED.fullmatch(name)
        if m:
            out.update({f"layers.{i}.{m.group(1)}": array[i] for i in range(np.shape(array)[0])})
        else:
            out[name] = array
    return out


def check_weights(targets: Mapping[str, Any], weights: Mapping[str, Any]) -> None:
    """Refuse missing, unexpected and mis-shaped tensors, all listed in one error."""
    lines = []
    for name in sorted(set(targets) - set(weights)):
        lines.append(f"  missing    {name}: expected {tuple(targets[name].shape)}, found nothing")
    for name in sorted(set(weights) - set(targets)):
        found = tuple(np.shape(weights[name]))
        lines.append(f"  unexpected {name}: expected nothing, found {found}")
    for name in sorted(set(targets) & set(weights)):
        want, got = tuple(targets[name].shape), tuple(np.shape(weights[name]))
        if want != got:
            lines.append(f"  mismatched {name}: expected {want}, found {got}")
    if lines:
        raise WeightMismatchError(
            f"pretrained weights do not fit the model ({len(lines)} tensors):\n" + "\n".join(lines))


def _placed(src, shape: tuple[int, ...], sharding) -> jax.Array:
    """float32 jax.Array of ``src`` in ``sharding``; each device's slice is read from ``src``."""
    def piece(index):
        return np.ascontiguousarray(src[index], dtype=np.float32)
    return jax.make_array_from_callback(shape, sharding, piece)


def load_into(base, weights: Mapping[str, Any], *, shardings=None) -> None:
    """Write ``weights`` (our names) into the base parameters of ``base``, in place.

    ``base``: a Transformer, or its state (e.g. ``state["model"]["base"]`` of a train state);
    values may be arrays or ``ShapeDtypeStruct``s (an abstract model is filled without ever holding
    random weights). Each array goes straight into its sharding: ``shardings[name]`` when given (a
    ``{name: Sharding}`` dict or a state tree of shardings, e.g. ``sharding.state_shardings``),
    else the current value's sharding, else the default device. Values of ``weights`` only need
    ``shape`` and numpy indexing, so memory-mapped views are read slice by slice.
    Raises WeightMismatchError (nothing written) if any tensor is missing, unexpected or mis-shaped.
    """
    targets = base_params(base)
    weights = stacked_weights(weights, targets)
    check_weights(targets, weights)
    shardings = {k: v.get_value() if isinstance(v, nnx.Variable) else v
                 for k, v in _flat(shardings or {}).items()}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for name, var in targets.items():
        value = var.get_value()
        sharding = shardings.get(name) or getattr(value, "sharding", None) or default
        var.set_value(_placed(weights[name], tuple(value.shape), sharding))


def map_name(name: str, top: dict, layer_re, layer_names: dict) -> tuple[str, bool] | None:
    """(our name, transpose?) of a checkpoint tensor name, given one format's name tables; None if the
    tensor has no counterpart. Shared by the HF and GGUF importers (only their tables differ)."""
    if name in top:
        return top[name]
    m = layer_re.fullmatch(name)
    if m and m.group(2) in layer_names:
        ours, transpose = layer_names[m.group(2)]
        return f"layers.{m.group(1)}.{ours}", transpose
    return None
