"""Device mesh from config and the mapping of logical axis names onto it.

Model code names only logical axes (docs/conventions.md); the rules here say which mesh axis each one
uses. Logical names whose mesh axis is absent (or already used by another dim of the same array) are
replicated, so one set of rules serves every mesh shape.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "module")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("module", "module"),
    ("codes", None),
    ("lora", None),
)


def resolve_axes(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Axis sizes in MESH_AXES order with a -1 filled by the remaining devices (no device needed,
    so config validation and make_mesh agree on the shape)."""
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axis names {unknown}; expected some of {MESH_AXES}")
    names = [a for a in MESH_AXES if a in axes]
    sizes = [int(axes[a]) for a in names]
    fixed = int(np.prod([s for s in sizes if s != -1])) if sizes else 1
    return {a: num_devices // fixed if s == -1 else s for a, s in zip(names, sizes)}


def make_mesh(axes: Mapping[str, int], devices: Sequence | None = None) -> Mesh:
    """Mesh with the named axes (in MESH_AXES order); one size may be -1 (fill with remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_axes(axes, len(devices))
    sizes = list(shape.values())
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {shape} needs {int(np.prod(sizes))} devices, have {len(devices)}")
    arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, tuple(shape), axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def logical_to_spec(names: Sequence[str | None] | None, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
    table = dict(rules)
    used: set[str] = set()
    out = []
    for n in names or ():
        target = table.get(n) if n is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1 and a not in used)
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def _names_of(variable) -> tuple | None:
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
    return tuple(names) if names else None


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """A NamedSharding for every array of an NNX state, from its variables' logical names."""
    def one(v):
        value = v.get_value() if isinstance(v, nnx.Variable) else v
        names = _names_of(v) if isinstance(v, nnx.Variable) else None
        ndim = getattr(value, "ndim", 0)
        if names is None or len(names) != ndim:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, logical_to_spec(names, mesh, rules))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, P(axes if axes else None))


def data_ways(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a host batch on the mesh, rows split over (data, fsdp). Multi-host: each process passes its rows."""
    s = batch_sharding(mesh)
    if jax.process_count() == 1:
        return {k: jax.device_put(v, s) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(s, v) for k, v in batch.items()}


def abstract_state(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
    """ShapeDtypeStructs of ``state`` carrying this mesh's shardings: a restore (reshard) target."""
    shard = state_shardings(state, mesh, rules)
    return jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
        state, shard, is_leaf=lambda x: isinstance(x, nnx.Variable))
