"""orbax checkpoints of a whole run: train state, data iterator position, resolved config, metadata.

The NNX state is stored as a pure nested dict of arrays; typed PRNG keys are stored as their raw key
data (orbax cannot serialise key dtypes) and re-wrapped on restore. Restoring into abstract arrays that
carry shardings places (and reshards) every array directly, so a run saved on 8 devices resumes on 1.
Only *finalized* steps are ever listed by orbax: a save killed mid-write leaves a temporary directory
that is ignored, and the previous step stays the latest.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_storable(state: nnx.State) -> dict:
    pure = nnx.to_pure_dict(state)
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, pure)


def abstract_of(state: nnx.State) -> nnx.State:
    """ShapeDtypeStructs (with the current shardings) of a placed state: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _abstract_storable(state: nnx.State) -> dict:
    def f(x):
        if _is_key(x):
            x = jax.ShapeDtypeStruct(jax.eval_shape(jax.random.key_data, x).shape, jax.numpy.uint32,
                                     sharding=getattr(x, "sharding", None))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(f, nnx.to_pure_dict(state))


def from_storable(abstract_state: nnx.State, stored: dict) -> nnx.State:
    like = nnx.to_pure_dict(abstract_state)
    restored = jax.tree.map(lambda a, s: jax.random.wrap_key_data(s) if _is_key(a) else s, like, stored)
    nnx.replace_by_pure_dict(abstract_state, restored)
    return abstract_state


def manager(workdir: str, keep: int = 3, subdir: str = "checkpoints", best_metric: str = "",
            best_mode: str = "max") -> ocp.CheckpointManager:
    """Keeps the last ``keep`` steps; with ``best_metric`` it keeps the best ``keep`` by that metric."""
    opts = dict(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    if best_metric:
        opts.update(best_fn=lambda m: m[best_metric], best_mode=best_mode,
                    keep_checkpoints_without_metrics=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, subdir)),
                                 options=ocp.CheckpointManagerOptions(**opts))


def save(mngr: ocp.CheckpointManager, step: int, state: nnx.State, meta: dict[str, Any],
         data_state: Any = None, metrics: dict | None = None, force: bool = False) -> bool:
    items = dict(state=ocp.args.StandardSave(to_storable(state)), meta=ocp.args.JsonSave(meta))
    if data_state is not None:
        items["data"] = ocp.args.JsonSave(_jsonable(data_state))
    return mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)


def restore(mngr: ocp.CheckpointManager, abstract_state: nnx.State, step: int | None = None,
            with_data: bool = False) -> tuple[nnx.State, dict, int, Any]:
    """Restore the latest (or given) finalized step into ``abstract_state`` (ShapeDtypeStructs).

    Returns (state, meta, step, data_state or None).
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finalized checkpoint under {mngr.directory}")
    items = dict(state=ocp.args.StandardRestore(_abstract_storable(abstract_state)),
                 meta=ocp.args.JsonRestore())
    if with_data and "data" in mngr.item_metadata(step):
        items["data"] = ocp.args.JsonRestore()
    out = mngr.restore(step, args=ocp.args.Composite(**items))
    data = out["data"] if "data" in items else None
    return from_storable(abstract_state, out["state"]), out["meta"], step, data


def _jsonable(x):
    """grain iterator states are dicts of ints/strings/bytes; bytes go through latin-1."""
    if isinstance(x, bytes):
        return {"__bytes__": x.decode("latin-1")}
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def from_jsonable(x):
    if isinstance(x, dict):
        if set(x) == {"__bytes__"}:
            return x["__bytes__"].encode("latin-1")
        return {k: from_jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_jsonable(v) for v in x]
    return x
