"""Device mesh from config and the mapping of logical axis names onto it.

Model code names only logical axes (docs/conventions.md); the rules (``config.rules``, defaults below)
say which mesh axes each one uses. Logical names whose mesh axis is absent, of size 1, already used by
another dim of the same array, or not dividing the dim are replicated, so one set of rules serves every
mesh shape. Activations are constrained with :func:`constrain` while a step is traced under
:func:`activation_sharding`.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "module")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),      # activations' batch dim (and the input batch)
    ("length", None),           # sequence dim of activations (sequence parallelism if mapped)
    ("vocab", "tensor"),
    ("embed", "fsdp"),          # parameters: ZeRO-3 style; activations' embed dim is "act_embed"
    ("act_embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("layers", None),           # reserved for scanned (stacked) layers; ours are unrolled
    ("module", "module"),       # the stacked adapter axis: expert parallelism over "module"
    ("codes", None),
    ("lora", None),
    ("mi_in", None),
    ("mi_hidden", None),
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


def logical_to_spec(names: Sequence[str | None] | None, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                    shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for an array whose dims carry logical ``names``.

    A mesh axis is skipped (that dim stays replicated over it) when it is absent or of size 1, when
    another dim of the same array already uses it, or, given ``shape``, when it does not divide the
    dim: e.g. a 37-token vocabulary over ``tensor=2`` is replicated rather than refused by XLA.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, n in enumerate(names or ()):
        target = table.get(n) if n is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1 and a not in used)
        if shape is not None:
            kept, ways = [], 1
            for a in axes:
                if int(shape[i]) % (ways * mesh.shape[a]) == 0:
                    kept.append(a)
                    ways *= mesh.shape[a]
            axes = tuple(kept)
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("iclm_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    """While tracing under this context, :func:`constrain` pins activations to ``mesh`` by ``rules``;
    outside it (tests, eager use, generation) ``constrain`` is the identity."""
    token = _ACTIVE.set(None if mesh is None else (mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` of an activation by logical names, e.g. ("batch", "length",
    "act_embed") at block boundaries, so XLA keeps the batch split instead of choosing a layout."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of shape {x.shape}")
    spec = logical_to_spec(names, mesh, rules, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _names_of(variable) -> tuple | None:
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
    return tuple(names) if names else None


def spec_of(variable, mesh: Mesh | AbstractMesh, rules=DEFAULT_RULES) -> P:
    """The PartitionSpec of one NNX variable (or bare array) by its logical names; unnamed arrays and
    names of the wrong rank are replicated."""
    value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
    names = _names_of(variable) if isinstance(variable, nnx.Variable) else None
    if names is None or len(names) != getattr(value, "ndim", 0):
        return P()
    return logical_to_spec(names, mesh, rules, shape=value.shape)


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
