"""Device meshes from config, shardings of whole states and batches, and which rows each process loads.

The logical-name rules themselves (``DEFAULT_RULES``, ``logical_to_spec``, ``constrain``,
``activation_sharding``) live in the leaf module ``partitioning.py``, which the model imports; they
are re-exported here for the infrastructure.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding

from iclm_jax.partitioning import (  # noqa: F401  (re-exported for the infrastructure)
    BATCH_AXES,
    DEFAULT_RULES,
    MESH_AXES,
    activation_sharding,
    constrain,
    logical_to_spec,
    spec_of,
)


def rules_from_config(rules: Mapping[str, str] | None) -> tuple[tuple[str, Any], ...]:
    """``config.rules`` (logical name -> comma-separated mesh axes, "" = replicated) as a rules tuple.

    Names missing from the config keep their default; unknown mesh axes are refused by name.
    """
    table = dict(DEFAULT_RULES)
    for name, value in dict(rules or {}).items():
        axes = tuple(a.strip() for a in str(value or "").split(",") if a.strip())
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"rules.{name}={value!r}: unknown mesh axes {bad}; expected some of {MESH_AXES}")
        table[name] = axes[0] if len(axes) == 1 else (axes or None)
    return tuple(table.items())


def resolve_axes(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """The full mesh shape of ``config.mesh`` (MESH_AXES order) on ``num_devices``, with no device needed,
    so config validation, planning and make_mesh agree on it. A -1 is filled by the remaining devices;
    with ``slices = S > 1`` the sizes are one slice's (num_devices / S) and ``data`` is S x its size.
    The product is not checked here (callers report a mismatch in their own terms)."""
    slices = int(axes.get("slices", 1) or 1)
    axes = {k: v for k, v in axes.items() if k != "slices"}
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axis names {unknown}; expected some of {MESH_AXES}")
    if slices > 1:
        axes = {"data": 1, **axes}
        num_devices //= slices
    names = [a for a in MESH_AXES if a in axes]
    sizes = [int(axes[a]) for a in names]
    fixed = int(np.prod([s for s in sizes if s != -1])) if sizes else 1
    shape = {a: num_devices // fixed if s == -1 else s for a, s in zip(names, sizes)}
    if slices > 1:
        shape["data"] *= slices
    return shape


def abstract_mesh(axes: Mapping[str, int], num_devices: int) -> AbstractMesh:
    """A device-free mesh of ``config.mesh`` for ``num_devices``: the shape ``make_mesh`` builds."""
    shape = resolve_axes(axes, num_devices)
    if math.prod(shape.values()) != num_devices:
        raise ValueError(f"mesh {dict(axes)} makes {shape}: {math.prod(shape.values())} devices, "
                         f"not {num_devices}")
    return AbstractMesh(tuple(shape.values()), tuple(shape))


def _granules(devices: Sequence, slices: int) -> list[list]:
    """Split devices into ``slices`` groups joined by the slow network (DCN): TPU slices by
    ``slice_index``, else hosts (processes) when there are several, else equal contiguous blocks
    (one host with fake devices: what the tests use)."""
    for key in ("slice_index", "process_index"):
        ids = sorted({getattr(d, key, 0) for d in devices})
        if len(ids) > 1:
            if len(ids) % slices:
                raise ValueError(f"mesh.slices={slices} does not divide the {len(ids)} groups of devices "
                                 f"by {key}")
            per = len(ids) // slices
            return [[d for d in devices if ids.index(getattr(d, key, 0)) // per == g] for g in range(slices)]
    if len(devices) % slices:
        raise ValueError(f"mesh.slices={slices} does not divide the {len(devices)} devices")
    n = len(devices) // slices
    return [list(devices[g * n:(g + 1) * n]) for g in range(slices)]


def make_mesh(axes: Mapping[str, int], devices: Sequence | None = None) -> Mesh:
    """Mesh with the named axes (in MESH_AXES order); one size may be -1 (fill with remaining devices).

    ``axes["slices"] = S > 1`` builds a hybrid ICI x DCN mesh: the other sizes are the shape of one
    slice (fast interconnect), and the ``data`` axis is repeated across the S slices, so only the
    data-parallel gradient reduction crosses the slow network (``data`` becomes S x its size).
    """
    devices = list(jax.devices() if devices is None else devices)
    slices = int(axes.get("slices", 1) or 1)
    if slices < 1:
        raise ValueError(f"mesh.slices must be >= 1, got {slices}")
    shape = resolve_axes(axes, len(devices))
    if slices == 1:
        if math.prod(shape.values()) != len(devices):
            raise ValueError(f"mesh {shape} needs {math.prod(shape.values())} devices, have {len(devices)}")
        arr = np.asarray(devices).reshape(list(shape.values()))
    else:
        groups = _granules(devices, slices)
        per_slice = dict(shape, data=shape["data"] // slices)
        if math.prod(per_slice.values()) != len(groups[0]):
            raise ValueError(f"mesh slice shape {per_slice} needs {math.prod(per_slice.values())} "
                             f"devices per slice, have {len(groups[0])} ({slices} slices)")
        arr = np.concatenate([np.asarray(g).reshape(list(per_slice.values())) for g in groups],
                             axis=list(shape).index("data"))
    return Mesh(arr, tuple(shape), axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """A NamedSharding for every array of an NNX state, from its variables' logical names."""
    return jax.tree.map(lambda v: NamedSharding(mesh, spec_of(v, mesh, rules)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
    """Input rows split by the ``batch`` rule (default over data x fsdp); other dims replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",), mesh, rules))


def data_ways(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> int:
    """How many ways the batch is split (its rows must be a multiple of this)."""
    spec = logical_to_spec(("batch",), mesh, rules)[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return math.prod(mesh.shape[a] for a in axes)


def process_rows(mesh: Mesh, global_rows: int, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                 process_index: int | None = None) -> tuple[int, int]:
    """The contiguous block ``[lo, hi)`` of a global batch's rows that this process's devices hold,
    i.e. what its input pipeline must load (the global batch is then the same for any process count)."""
    s = batch_sharding(mesh, rules)
    pid = jax.process_index() if process_index is None else process_index
    rows = set()
    for d, idx in s.devices_indices_map((global_rows,)).items():
        if d.process_index == pid:
            rows.update(range(*idx[0].indices(global_rows)))
    if not rows:
        raise ValueError(f"process {pid} holds no device of the mesh {dict(mesh.shape)}")
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo:
        raise ValueError(f"process {pid} holds non-contiguous batch rows on mesh {dict(mesh.shape)}: order "
                         "the mesh devices by process (jax.devices() order) so each host loads one block")
    return lo, hi


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
              rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> dict[str, jax.Array]:
    """Place a host batch on the mesh, rows split by the ``batch`` rule. Multi-host: each process passes
    its block of rows (``process_rows``) and the global batch is assembled without copying between hosts."""
    s = batch_sharding(mesh, rules)
    if jax.process_count() == 1:
        return {k: jax.device_put(v, s) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(s, v) for k, v in batch.items()}


def abstract_state(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
    """ShapeDtypeStructs of ``state`` carrying this mesh's shardings: a restore (reshard) target."""
    shard = state_shardings(state, mesh, rules)
    return jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
        state, shard, is_leaf=lambda x: isinstance(x, nnx.Variable))
