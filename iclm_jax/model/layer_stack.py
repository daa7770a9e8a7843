"""The decoder blocks stored stacked on a leading ``layers`` axis (``model.scan_layers``), and the
conversion between that layout and one module per layer.

Unrolled, a Transformer holds ``layers = nnx.List([Block, ...])``: parameter paths ``layers/<i>/q/kernel``
of shape [in, out]. Stacked, it holds ``layers = Block`` whose every variable has a leading axis of
size ``n_layers`` and the logical name ``"layers"`` first: ``layers/q/kernel`` of shape [L, in, out].
The stacked block is built from the same ``n_layers`` blocks the unrolled model builds, so both layouts
of one seed hold the same values; the forward pass scans over it (``transformer.scan_blocks``), and the
optimiser sees one array per kind of weight instead of one per layer, so a step compiles in a time that
does not grow with depth.

``convert(tree, like)`` turns a nested dict (a pure state, a checkpoint's tree, its abstract target) of
one layout into the other, wherever ``like`` has the other layout: checkpoints of either layout restore
into a model of either. ``unstack_blocks`` gives a stacked block's layers as ordinary ``Block``s.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

LAYERS = "layers"   # the attribute of the stack, and the logical name of its leading axis


def _add_axis_name(v: nnx.Variable) -> nnx.Variable:
    meta = v.get_metadata()
    names = meta.get("out_sharding")
    if names is not None:
        v.set_metadata("out_sharding", (LAYERS,) + tuple(names))
    return v


def stack_blocks(blocks: Sequence[nnx.Module]) -> nnx.Module:
    """One module of ``blocks[0]``'s structure whose variables stack every block's on a new leading
    axis (named ``"layers"`` for sharding; RNG streams stack too, so dropout stays per layer)."""
    graphdef, _ = nnx.split(blocks[0])
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(b) for b in blocks])
    stacked = jax.tree.map(_add_axis_name, stacked, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)


def unstack_blocks(stacked: nnx.Module) -> list[nnx.Module]:
    """The layers of a stacked block, in order, as the unrolled model's blocks (copies: writes do not go back)."""
    graphdef, state = nnx.split(stacked)
    n = jax.tree.leaves(state)[0].shape[0]
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(n)]


def is_stacked(node: Any) -> bool:
    """A ``layers`` node in the stacked layout (a dict of named fields, not of layer indices)."""
    return isinstance(node, dict) and bool(node) and not all(_index(k) is not None for k in node)


def in_stack(path: Sequence) -> bool:
    """Whether a ``jax.tree_util`` key path (or a tuple of keys) runs through a stacked ``layers`` node,
    i.e. the leaf's first axis is the layer axis."""
    keys = plain_path(path)
    return any(k == LAYERS and _index(nxt) is None for k, nxt in zip(keys, keys[1:]))


def plain_key(k):
    """One entry of a ``jax.tree_util`` key path as a plain key (dict key, list index or attribute name)."""
    for attr in ("key", "idx", "name"):   # DictKey, SequenceKey, GetAttrKey
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def plain_path(path: Sequence) -> tuple:
    """A ``jax.tree_util`` key path as a tuple of plain keys."""
    return tuple(plain_key(k) for k in path)


def _index(key) -> int | None:
    if isinstance(key, int):
        return key
    return int(key) if isinstance(key, str) and key.isdigit() else None


def _get(tree: dict, key):
    """``tree[key]``, tolerating int vs digit-string keys (orbax's trees name list items by strings)."""
    if key in tree:
        return tree[key]
    i = _index(key)
    for k in tree:
        if i is not None and _index(k) == i:
            return tree[k]
    raise KeyError(key)


def _default_stack(leaves):
    return jnp.stack(leaves)


def _default_take(leaf, i: int):
    return leaf[i]


def convert(tree: Any, like: Any, *, stack: Callable = _default_stack, take: Callable = _default_take) -> Any:
    """``tree`` with every ``layers`` node put in the layout ``like`` has there; everything else unchanged
    (keys ``like`` lacks too).

    ``tree`` and ``like`` are nested dicts; ``like``'s leaves are never read, so the metadata tree of a
    checkpoint serves. Per-layer keys come out as ints (``nnx.to_pure_dict``'s). ``stack(list of leaves)``
    and ``take(leaf, i)`` make a stacked leaf from per-layer ones and back (arrays by default; pass
    others for ShapeDtypeStructs)."""
    if not isinstance(tree, dict) or not isinstance(like, dict):
        return tree
    out = {}
    for key, have in tree.items():
        try:
            sub = _get(like, key)
        except KeyError:
            out[key] = have
            continue
        if key == LAYERS and isinstance(sub, dict) and isinstance(have, dict) and is_stacked(sub) != is_stacked(have):
            if is_stacked(sub):     # per-layer -> stacked
                parts = [have[k] for k in sorted(have, key=_index)]
                have = jax.tree.map(lambda *a: stack(list(a)), *parts)
            else:                   # stacked -> per-layer
                have = {i: jax.tree.map(lambda a, i=i: take(a, i), have)
                        for i in sorted(_index(k) for k in sub)}
        out[key] = convert(have, sub, stack=stack, take=take)
    return out


def layouts_differ(tree: Any, like: Any) -> bool:
    """Whether some ``layers`` node of ``tree`` has a different layout from ``like``'s."""
    if not isinstance(like, dict) or not isinstance(tree, dict):
        return False
    for key, sub in like.items():
        try:
            have = _get(tree, key)
        except KeyError:
            continue
        if key == LAYERS and isinstance(sub, dict) and isinstance(have, dict) and is_stacked(sub) != is_stacked(have):
            return True
        if layouts_differ(have, sub):
            return True
    return False
