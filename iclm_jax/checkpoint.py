"""orbax checkpoints of a whole run: train state, data iterator position, resolved config, metadata.

The NNX state is stored as a pure nested dict of arrays; typed PRNG keys are stored as their raw key
data (orbax cannot serialise key dtypes) and re-wrapped on restore. Restoring into abstract arrays that
carry shardings places (and reshards) every array directly, so a run saved on 8 devices resumes on 1.
Only *finalized* steps are ever listed by orbax: a save killed mid-write leaves a temporary directory
that is ignored, and the previous step stays the latest.

Integrity: orbax records no checksums, so a flipped byte in a data file would restore silently. After a
save finalizes, ``record_integrity`` writes the SHA-256 of every file of the step to
``<checkpoints>/../.<name>_integrity/<step>.json``; ``restore`` verifies them first and, when a step fails
(a digest differs, a file is missing or unreadable, orbax cannot read it), falls back to the previous
finalized step and says which and why (``restore(..., fallback=False)`` refuses instead). A step saved
without a record (older runs, or a process killed between finalizing and recording) is restored
unverified.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from iclm_jax.model import layer_stack


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
    # Handlers named per item, so reading a step's item metadata needs no restore args (orbax warns
    # "Item ... could not be restored" six times per resume otherwise).
    handlers = dict(state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler(),
                    data=ocp.JsonCheckpointHandler())
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, subdir)),
                                 options=ocp.CheckpointManagerOptions(**opts), item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, state: nnx.State, meta: dict[str, Any],
         data_state: Any = None, metrics: dict | None = None, force: bool = False) -> bool:
    items = dict(state=ocp.args.StandardSave(to_storable(state)), meta=ocp.args.JsonSave(meta))
    if data_state is not None:
        items["data"] = ocp.args.JsonSave(_jsonable(data_state))
    record = _integrity_path(mngr, step)
    if jax.process_index() == 0 and os.path.exists(record):   # a record left by a step deleted by hand
        os.remove(record)
    return mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)


class CorruptCheckpoint(ValueError):
    """A checkpoint step failed its integrity check or could not be read (the message says which)."""


def restore(mngr: ocp.CheckpointManager, abstract_state: nnx.State, step: int | None = None,
            with_data: bool = False, fallback: bool = True, say=None,
            quarantine: str | None = None) -> tuple[nnx.State, dict, int, Any]:
    """Restore the latest (or given) finalized step into ``abstract_state`` (ShapeDtypeStructs).

    A step that fails verification or reading is skipped for the previous one (``say`` is told which and
    why) when ``fallback``; else, or when no step is left, ``CorruptCheckpoint`` names the step and file.
    With ``quarantine`` (a directory), the skipped steps are moved there, so a resumed run can save those
    steps again (orbax never saves a step at or below its latest). Returns (state, meta, step, data or None).
    """
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    if not steps:
        raise FileNotFoundError(f"no finalized checkpoint under {mngr.directory}")
    failures = []
    for s in steps:
        verified = False
        try:
            verified = verify_integrity(mngr, s)
            out = _restore_step(mngr, abstract_state, s, with_data)
        except CorruptCheckpoint as e:
            failures.append(str(e))
        except Exception as e:   # noqa: BLE001  (a truncated or garbled file: orbax/tensorstore raise anything)
            if verified:         # intact files: the state does not fit (a caller's error, not corruption)
                raise
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            failures.append(f"checkpoint step {s} in {mngr.directory} could not be read ({type(e).__name__}: "
                            f"{first})")
        else:
            if failures:
                bad = [b for b in steps if b > s]
                if quarantine:
                    _quarantine(mngr, bad, quarantine)
                if say is not None:
                    moved = f" (moved to {quarantine})" if quarantine else ""
                    say("; ".join(failures) + f"; restored step {s} instead{moved}")
            return out
        if not fallback:
            break
    left = "" if not fallback else "; no usable checkpoint left"
    raise CorruptCheckpoint("; ".join(failures) + left)


def _quarantine(mngr, steps: list[int], where: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(where, exist_ok=True)
        for s in steps:
            dest = os.path.join(where, f"{os.path.basename(os.fspath(mngr.directory))}_{s}_{int(time.time())}")
            os.replace(os.path.join(os.fspath(mngr.directory), str(s)), dest)
            record = _integrity_path(mngr, s)
            if os.path.exists(record):
                os.replace(record, os.path.join(dest, "integrity.json"))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("iclm_quarantine")
    mngr.reload()


# State variables added after runs were saved without them, and the value they start from (their init):
# a checkpoint that lacks them restores everything else and starts them there. Leaf names.
ADDED_LATER = {"removal_cost": 0, "split_gain": 0, "relocations": 0}     # model/router.py (code relocation)


def _restore_step(mngr, abstract_state, step: int, with_data: bool):
    full = _abstract_storable(abstract_state)
    saved = _stored_tree(mngr, step)
    layout = _stored_layout(saved, full)    # the target in the layout the step was saved in
    added = _missing_added_later(saved, layout)
    target = _without(layout, added) if added else layout
    items = dict(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    if with_data and "data" in mngr.item_metadata(step):
        items["data"] = ocp.args.JsonRestore()
    out = mngr.restore(step, args=ocp.args.Composite(**items))
    data = out["data"] if "data" in items else None
    stored = out["state"]
    for path in added:              # start the variables the checkpoint predates at their init value
        leaf = _get(layout, path)
        _set(stored, path, jax.numpy.full(leaf.shape, ADDED_LATER[path[-1]], leaf.dtype, device=leaf.sharding))
    if layout is not full:          # saved with the other layer layout: convert, then place as the target
        stored = jax.tree.map(lambda a, t: jax.device_put(a, t.sharding) if t.sharding is not None else a,
                              layer_stack.convert(stored, full), full)
    return from_storable(abstract_state, stored), out["meta"], step, data


def _stored_tree(mngr, step: int) -> dict | None:
    """The stored step's state tree (metadata only, as nested dicts); None when it cannot be read."""
    try:
        return _plain(mngr.item_metadata(step)["state"])
    except Exception:   # noqa: BLE001  (no metadata to compare: restore as is, and fail there if it must)
        return None


def _stored_layout(stored: dict | None, full: dict) -> dict:
    """``full`` (abstract, storable) in the layer layout of the ``stored`` tree: itself when they agree (or
    nothing is known), else converted (``model.scan_layers`` changed: a stacked ``layers`` node stored per
    layer, or the reverse)."""
    if stored is None or not layer_stack.layouts_differ(full, stored):
        return full
    return layer_stack.convert(full, stored, stack=_stack_abstract, take=_take_abstract)


def _layer_sharding(sharding, add: bool):
    """The sharding of a leaf with its leading layer axis added (replicated) or removed."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding             # one device (or none): fits any shape
    spec = tuple(sharding.spec)
    spec = (None,) + spec if add else spec[1:]
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _stack_abstract(leaves):
    x = leaves[0]
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(x.shape), x.dtype, sharding=_layer_sharding(x.sharding, True))


def _take_abstract(leaf, i: int):
    return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype, sharding=_layer_sharding(leaf.sharding, False))


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))
    else:
        yield prefix


def _missing_added_later(stored: dict | None, target: dict) -> list[tuple]:
    """Paths of ``target`` in ADDED_LATER that the ``stored`` tree lacks (an older run; None: unknown)."""
    if stored is None or not any(p[-1] in ADDED_LATER for p in _paths(target)):
        return []
    have = {tuple(str(k) for k in p) for p in _paths(stored)}
    return [p for p in _paths(target) if p[-1] in ADDED_LATER and tuple(str(k) for k in p) not in have]


def _plain(tree):
    """orbax's metadata tree as nested dicts (its mappings are not always ``dict``)."""
    if hasattr(tree, "items"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def _without(tree: dict, paths: list[tuple]) -> dict:
    drop = set(paths)

    def walk(t, prefix):
        return {k: walk(v, prefix + (k,)) if isinstance(v, dict) else v
                for k, v in t.items() if prefix + (k,) not in drop}
    return walk(tree, ())


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _integrity_path(mngr, step: int) -> str:
    return _record_path(os.fspath(mngr.directory), step)


def _record_path(d: str, step: int) -> str:
    return os.path.join(os.path.dirname(d), f".{os.path.basename(d)}_integrity", f"{step}.json")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def finalized_steps(d: str) -> list[int]:
    """The steps whose save finalized under the checkpoint directory ``d``, read from the directory
    (orbax's own list also holds a step whose save is pending or failed): a finalized step is a directory
    named by its number (orbax renames its temporary directory when the save completes)."""
    try:
        names = os.listdir(d)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def record_integrity(mngr: ocp.CheckpointManager, step: int) -> None:
    """Wait for ``step``'s save to finalize, then record the SHA-256 of each of its files (call it only
    for a step ``save`` really wrote: orbax skips a step at or below its latest)."""
    mngr.wait_until_finished()
    root = os.path.join(os.fspath(mngr.directory), str(step))
    if step not in mngr.all_steps() or jax.process_index() != 0 or not os.path.isdir(root):
        return
    digests = {os.path.relpath(os.path.join(d, n), root): _sha256(os.path.join(d, n))
               for d, _, files in os.walk(root) for n in files}
    path = _integrity_path(mngr, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        json.dump({"step": step, "sha256": digests}, f)
    os.replace(f"{path}.tmp", path)
    keep = {f"{s}.json" for s in mngr.all_steps()}       # drop the records of steps orbax deleted
    for name in os.listdir(os.path.dirname(path)):
        if name.endswith(".json") and name not in keep:
            os.remove(os.path.join(os.path.dirname(path), name))


def verify_integrity(mngr: ocp.CheckpointManager, step: int) -> bool:
    """True if ``step`` matches its record, False if it has none; else ``CorruptCheckpoint``."""
    return verify_step(os.fspath(mngr.directory), step)


def verify_step(directory: str, step: int) -> bool:
    """``verify_integrity`` of ``step`` under the checkpoint directory ``directory``, without a manager."""
    path = _record_path(directory, step)
    if not os.path.isfile(path):
        return False
    where = f"checkpoint step {step} in {directory}"
    try:
        with open(path) as f:
            want = json.load(f)["sha256"]
    except (OSError, ValueError, KeyError) as e:
        raise CorruptCheckpoint(f"{where}: its integrity record {path} is unreadable ({e})") from None
    root = os.path.join(directory, str(step))
    for rel, digest in sorted(want.items()):
        try:
            got = _sha256(os.path.join(root, rel))
        except OSError as e:
            raise CorruptCheckpoint(f"{where} is damaged: {rel} unreadable ({e.strerror})") from None
        if got != digest:
            raise CorruptCheckpoint(f"{where} is damaged: {rel} differs from its SHA-256 at save time")
    return True


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
