"""orbax checkpoints of the whole train state (model, optimisers, critic, MINE EMA, router stats, RNG).

The NNX state is stored as a pure nested dict of arrays; typed PRNG keys are stored as their raw key data
(orbax cannot serialise key dtypes) and re-wrapped on restore. Restoring into abstract arrays that carry
shardings places (and reshards) every array directly.
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


def _abstract_storable(state: nnx.State) -> dict:
    def f(x):
        if _is_key(x):
            x = jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(f, nnx.to_pure_dict(state))


def from_storable(abstract_state: nnx.State, stored: dict) -> nnx.State:
    like = nnx.to_pure_dict(abstract_state)
    restored = jax.tree.map(lambda a, s: jax.random.wrap_key_data(s) if _is_key(a) else s, like, stored)
    nnx.replace_by_pure_dict(abstract_state, restored)
    return abstract_state


def manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True))


def save(mngr: ocp.CheckpointManager, step: int, state: nnx.State, meta: dict[str, Any]) -> None:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(to_storable(state)),
                                            meta=ocp.args.JsonSave(meta)))


def restore(mngr: ocp.CheckpointManager, abstract_state: nnx.State, step: int | None = None
            ) -> tuple[nnx.State, dict, int]:
    """Restore the latest (or given) step into ``abstract_state`` (an nnx.State of ShapeDtypeStructs)."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finalized checkpoint under {mngr.directory}")
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract_storable(abstract_state)), meta=ocp.args.JsonRestore()))
    return from_storable(abstract_state, out["state"]), out["meta"], step
