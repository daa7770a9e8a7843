"""Where every parameter lives on a mesh, and what it costs per device — before allocating anything.

    python -m iclm_jax.sharding_report --config=experiments/configs/acre.py \
        --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2 --devices=8

The state is built with ``nnx.eval_shape`` and placed on an ``AbstractMesh``, so a config for a large
pod can be checked on a laptop (``--devices`` is the device count the mesh spans).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from iclm_jax import partitioning, sharding
from iclm_jax.data.tokenizer import load_tokenizer
from iclm_jax.report import format_table
from iclm_jax.train import build

GROUPS = ("params", "optimizer", "other")


@dataclasses.dataclass(frozen=True)
class Row:
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    names: tuple | None       # logical axis names (None: unnamed, replicated)
    spec: P
    device_bytes: int         # bytes of the shard one device holds
    group: str                # params | optimizer (moments, counts) | other (router stats, RNG, EMA)


def _path_str(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def _group(path: str, variable) -> str:
    top = path.split("/", 1)[0]
    if top in ("opt", "critic_opt"):
        return "optimizer"
    return "params" if isinstance(variable, nnx.Param) else "other"


def rows(state: nnx.State, mesh: Mesh | AbstractMesh, rules=partitioning.DEFAULT_RULES) -> list[Row]:
    """One Row per array of an NNX state (concrete or abstract); specs from ``partitioning.logical_to_spec``."""
    out = []
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, v in leaves:
        if not isinstance(v, nnx.Variable):
            continue
        value = v.get_value()
        if not hasattr(value, "shape"):
            continue
        shape = tuple(int(d) for d in value.shape)
        dtype = np.dtype(value.dtype) if not jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key) \
            else np.dtype(np.uint32)
        names = partitioning.names_of(v)
        if names is not None and len(names) != len(shape):
            names = None      # as state_shardings: a rank mismatch is replicated
        spec = partitioning.spec_of(v, mesh, rules)
        size = math.prod(NamedSharding(mesh, spec).shard_shape(shape))
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            size *= 2         # a threefry key is two uint32 words
        p = _path_str(path)
        out.append(Row(p, shape, dtype, names, spec, size * dtype.itemsize, _group(p, v)))
    return out


def totals(table: Sequence[Row]) -> dict[str, int]:
    """Per-device bytes by group (params, optimizer, other)."""
    t = {g: 0 for g in GROUPS}
    for r in table:
        t[r.group] += r.device_bytes
    return t


def summary_line(state: nnx.State, mesh: Mesh | AbstractMesh, rules=partitioning.DEFAULT_RULES) -> str:
    """One line for a run's start: mesh, parameter count, and per-device bytes by group."""
    table = rows(state, mesh, rules)
    n_params = sum(math.prod(r.shape) for r in table if r.group == "params")
    t = totals(table)
    mesh_desc = ", ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
    return (f"mesh {mesh_desc}: {n_params:,} parameters; per device: params {_fmt_bytes(t['params'])}, "
            f"optimizer {_fmt_bytes(t['optimizer'])}, other {_fmt_bytes(t['other'])} "
            "(python -m iclm_jax.sharding_report for every array)")


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def report(state: nnx.State, mesh: Mesh | AbstractMesh, rules=partitioning.DEFAULT_RULES) -> str:
    """A table of each array's path, shape, logical axes, PartitionSpec and per-device bytes, with totals."""
    table = rows(state, mesh, rules)
    head = ("path", "shape", "logical axes", "spec", "bytes/device")
    body = [(r.path, "x".join(map(str, r.shape)) or "()", str(r.names or "-"),
             str(tuple(r.spec)), str(r.device_bytes)) for r in table]
    mesh_desc = ", ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
    out = [format_table(head, body, f"mesh: {mesh_desc}")]
    t = totals(table)
    out.append("")
    for g in GROUPS:
        out.append(f"total {g} per device: {t[g]} bytes ({_fmt_bytes(t[g])})")
    out.append(f"total per device: {sum(t.values())} bytes ({_fmt_bytes(sum(t.values()))})")
    return "\n".join(out)


def config_report(config, vocab: int, num_devices: int) -> str:
    """The report for a run config (its ``mesh`` and ``rules``), built abstractly: no weights allocated."""
    ts = nnx.eval_shape(lambda: build.train_state(config, vocab))
    mesh = sharding.abstract_mesh(dict(config.mesh), num_devices)
    return report(nnx.state(ts), mesh, sharding.rules_from_config(config.get("rules")))


def main(argv) -> None:
    del argv
    from absl import flags
    f = flags.FLAGS
    config = f.config
    vocab = f.vocab or config.model.vocab_size or load_tokenizer(config.data.tokenizer).vocab_size
    print(config_report(config, vocab, f.devices or jax.device_count()))


if __name__ == "__main__":
    import os

    from absl import app, flags
    from ml_collections import config_flags
    _repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config_flags.DEFINE_config_file("config", os.path.join(_repo, "experiments", "configs", "acre.py"),
                                    "get_config(arg) file, optionally ':arg'.")
    flags.DEFINE_integer("vocab", 0, "Vocabulary size (0: model.vocab_size, else the config's tokenizer).")
    flags.DEFINE_integer("devices", 0, "Devices the mesh spans (0: this host's device count); e.g. 64 to "
                         "plan a v5p-64 run from a laptop.")
    app.run(main)
