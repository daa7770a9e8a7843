"""Whether a workdir's stored config may be resumed by the current one.

Every field must match except those in ``RESUMABLE``: how long and how often a run trains, logs, saves
and evaluates, what it evaluates, and where it runs (mesh, sharding rules, compute-only memory options).
Anything else changes the model, its training data or its optimisation, so resuming under it would
continue a different run than ``config.json`` describes. A field the stored config lacks (the run
predates it) counts as the default the typed config gives it, which is how that run is rebuilt.
``finished_summary`` tells a finished run (nothing to resume) from one with steps left.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax

from iclm_jax import checkpoint
from iclm_jax.config_check import ConfigError
from iclm_jax.data.sources import DataConfig
from iclm_jax.losses import LossConfig
from iclm_jax.model.mi import MIConfig
from iclm_jax.model.router import RouterConfig
from iclm_jax.model.transformer import TransformerConfig
from iclm_jax.train.build import CheckpointConfig, ContinualConfig, EvalConfig, LoopConfig
from iclm_jax.train.optim import OptimConfig

# Fields (or whole groups, "group.*") that may differ between a checkpoint's config and a resuming one.
RESUMABLE = (
    "train.steps", "train.log_every", "train.time_limit_s", "train.nonfinite", "train.skip_limit",
    "eval.*", "checkpoint.*", "mesh.*", "rules.*", "init_from",
    "data.workers", "data.eval_splits", "data.eval_problems", "data.eval_files", "data.val_problems", "data.max_unk",
    "data.length_bucket",
    "model.remat", "model.scan_layers", "model.attention", "loss.logit_chunk",
)
_GROUPS = {"model": (TransformerConfig,), "router": (RouterConfig,), "mi": (MIConfig,), "loss": (LossConfig,),
           "train": (OptimConfig, LoopConfig), "eval": (EvalConfig,), "checkpoint": (CheckpointConfig,),
           "data": (DataConfig,), "continual": (ContinualConfig,)}
_MISSING = object()


def _absent_defaults() -> dict:
    out = {}
    for group, classes in _GROUPS.items():
        for cls in classes:
            for f in dataclasses.fields(cls):
                if f.default is not dataclasses.MISSING:
                    out[f"{group}.{f.name}"] = f.default
    return out


ABSENT_MEANS = _absent_defaults()


def resumable(field: str) -> bool:
    return field in RESUMABLE or f"{field.split('.')[0]}.*" in RESUMABLE


def mismatch(stored: dict, current: dict) -> list[str]:
    """``"field: checkpoint has A, config has B"`` for every non-resumable field that differs."""
    return differences(stored, current, lambda field: not resumable(field), ("checkpoint has", "config has"))


def differences(stored: dict, current: dict, compared, says: tuple[str, str]) -> list[str]:
    """``"field: <says[0]> A, <says[1]> B"`` for every field (dotted) for which ``compared(field)`` holds and
    the two configs differ; a field a stored config predates counts as its typed default."""
    a, b = _flatten(stored), _flatten(current)
    diffs = []
    for field in sorted(set(a) | set(b)):
        if not compared(field):
            continue
        x, y = (d.get(field, ABSENT_MEANS.get(field, _MISSING)) for d in (a, b))
        if x != y:
            show = lambda v: "no such field" if v is _MISSING else repr(v)   # noqa: E731
            diffs.append(f"{field}: {says[0]} {show(x)}, {says[1]} {show(y)}")
    return diffs


def check(config, workdir: str) -> None:
    """Refuse to resume ``workdir``'s checkpoints under an incompatible ``config`` (each field named)."""
    steps = checkpoint.finalized_steps(os.path.join(workdir, "checkpoints"))
    stored = read_stored_config(workdir, bool(steps))
    if not steps:
        return
    diffs = mismatch(stored, json.loads(config.to_json_best_effort()))
    if diffs:
        raise ConfigError(f"workdir {workdir} holds a checkpoint (step {max(steps)}) of an incompatible config:\n  "
                          + "\n  ".join(diffs) + "\nuse a new --workdir, or --config.init_from to start from "
                          "its parameters")


def finished_summary(config, workdir: str) -> dict | None:
    """The stored summary of a run that has trained ``train.steps`` steps and written its summary for the
    latest checkpoint, which matches its integrity record (None otherwise: a damaged or unrecorded last
    step goes through the resume path, which falls back or refuses): it is not loaded, evaluated or
    written again."""
    path = os.path.join(workdir, "summary.json")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = checkpoint.finalized_steps(ckpt_dir)
    if not (steps and steps[-1] >= config.train.steps and os.path.isfile(path)):
        return None
    try:
        if not checkpoint.verify_step(ckpt_dir, steps[-1]):
            return None
    except checkpoint.CorruptCheckpoint:
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None          # an unreadable summary: evaluate again and rewrite it
    if summary.get("steps") != steps[-1]:
        return None
    if jax.process_index() == 0:
        print(f"{workdir}: already finished at step {steps[-1]} (train.steps={config.train.steps}); nothing "
              f"done. Results: {path}, report.md and the plots there. A larger --config.train.steps continues "
              f"it; another --workdir starts a new run.", file=sys.stderr, flush=True)
    return summary


def read_stored_config(workdir: str, has_checkpoint: bool) -> dict | None:
    """The workdir's ``config.json`` (None in a new workdir); refuse a missing or unreadable one beside
    checkpoints, naming the file."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        if has_checkpoint:
            raise ConfigError(f"{path}: missing, but the workdir holds checkpoints; the config they were "
                              "trained with is unknown (restore the file, or use a new --workdir)")
        return None
    try:
        with open(path) as f:
            stored = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable config ({e}); restore it, or use a new --workdir") from None
    if not isinstance(stored, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(stored).__name__}")
    return stored


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
