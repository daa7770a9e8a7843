"""Logical axis names -> PartitionSpecs, and activation constraints by logical names.

The model names only logical axes (docs/conventions.md) and calls :func:`constrain` at the points
whose layout matters; the rules (``config.rules``, defaults below) say which mesh axes each name uses.
Logical names whose mesh axis is absent, of size 1, already used by another dim of the same array, or
not dividing the dim are replicated, so one set of rules serves every mesh shape. ``constrain`` is the
identity unless a step is traced under :func:`activation_sharding`. A leaf module: it imports nothing
of the project, so the model can use it without the launcher's mesh building (``sharding.py``).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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
    ("layers", None),           # the stacked blocks' layer axis (model.scan_layers): never split
    ("module", "module"),       # the stacked adapter axis: expert parallelism over "module"
    ("codes", None),
    ("lora", None),
    ("mi_in", None),
    ("mi_hidden", None),
)


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


def names_of(variable) -> tuple | None:
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
    return tuple(names) if names else None


def spec_of(variable, mesh: Mesh | AbstractMesh, rules=DEFAULT_RULES) -> P:
    """The PartitionSpec of one NNX variable (or bare array) by its logical names; unnamed arrays and
    names of the wrong rank are replicated."""
    value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
    names = names_of(variable) if isinstance(variable, nnx.Variable) else None
    if names is None or len(names) != getattr(value, "ndim", 0):
        return P()
    return logical_to_spec(names, mesh, rules, shape=value.shape)
