"""The points of a sweep: ``get_sweep(arg)`` of a config file (big_vision style), beside its ``get_config``.

``get_sweep(arg)`` returns a list of dicts, one per point: ``"variant"`` (optional) adds config variants
to the file's own ``arg`` (``"baseline"`` with ``acre.py:cpu`` trains ``get_config("cpu,baseline")``),
every other key is a dotted config field and its value (``{"seed": 1, "model.num_modules": 4}``). A point
is named by its dict (``variant=baseline,seed=1``) and trains in ``<sweep workdir>/<name>``; points that
differ only in ``seed`` form one group in ``collect``'s tables.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

SEED = "seed"
VARIANT = "variant"


class SweepError(ValueError):
    """A sweep that cannot run (the message names the config file, the point and the field)."""


@dataclasses.dataclass(frozen=True)
class Point:
    index: int
    values: dict          # the get_sweep dict, in its order
    config: str           # the config flag for this point: file[:arg]
    extra: tuple = ()     # ("field=value", ...) from --set: the same overrides for every point, after its own

    @property
    def name(self) -> str:
        return ",".join(f"{k}={_text(v)}" for k, v in self.values.items())

    @property
    def dirname(self) -> str:
        return re.sub(r"[^A-Za-z0-9._=,+-]", "_", self.name) or "default"

    @property
    def group(self) -> str:
        return ",".join(f"{k}={_text(v)}" for k, v in self.values.items() if k != SEED) or "default"

    @property
    def seed(self):
        return self.values.get(SEED)

    def train_args(self, workdir: str) -> list[str]:
        """The ``iclm-train`` arguments of this point (its workdir under the sweep's)."""
        fields = [f"--config.{k}={_text(v)}" for k, v in self.values.items() if k != VARIANT]
        return [f"--config={self.config}", f"--workdir={os.path.abspath(os.path.join(workdir, self.dirname))}",
                *fields, *(f"--config.{kv}" for kv in self.extra)]


def _text(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _module(path: str):
    if not os.path.isfile(path):
        raise SweepError(f"{path}: no such config file")
    spec = importlib.util.spec_from_file_location(f"_sweep_config_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load(config: str, extra: tuple = ()) -> list[Point]:
    """The points of ``config`` (``file.py[:arg]``), each checked against ``get_config`` of its variant;
    ``extra`` (``"field=value"`` strings) is added to every point's arguments (fields checked to exist)."""
    path, _, arg = config.partition(":")
    mod = _module(path)
    if not hasattr(mod, "get_sweep"):
        raise SweepError(f"{path}: defines no get_sweep(arg) (a list of override dicts, one per point)")
    raw = mod.get_sweep(arg)
    if not isinstance(raw, (list, tuple)) or not raw or not all(isinstance(d, dict) for d in raw):
        raise SweepError(f"{path}: get_sweep({arg!r}) must return a non-empty list of dicts, got {raw!r:.200}")
    points, names = [], {}
    for i, values in enumerate(raw):
        variant = values.get(VARIANT, "")
        full_arg = ",".join(filter(None, [arg, str(variant)]))
        try:
            cfg = mod.get_config(full_arg) if full_arg else mod.get_config()
        except Exception as e:   # noqa: BLE001  (config files are user code)
            raise SweepError(f"{path}: point {i} {values}: get_config({full_arg!r}) failed: {e}") from None
        for key, value in values.items():
            if key != VARIANT:
                _check_field(cfg, key, value, f"{path}: point {i}")
        for kv in extra:
            key, eq, _ = kv.partition("=")
            if not eq:
                raise SweepError(f"--set={kv!r}: expected FIELD=VALUE, e.g. --set=train.steps=100")
            _check_field(cfg, key, None, f"--set={kv}")
        file = os.path.abspath(path)   # the points run from the checkout (local) or a batch node
        p = Point(i, dict(values), f"{file}:{full_arg}" if full_arg else file, tuple(extra))
        if p.dirname in names:
            raise SweepError(f"{path}: points {names[p.dirname]} and {i} are the same ({p.name})")
        names[p.dirname] = i
        points.append(p)
    return points


def _check_field(cfg, key: str, value, where: str) -> None:
    node = cfg
    parts = key.split(".")
    for j, part in enumerate(parts):
        if not hasattr(node, "keys") or part not in node:
            raise SweepError(f"{where}: no such config field {key!r}")
        if j < len(parts) - 1:
            node = node[part]
    old = node[parts[-1]]
    if hasattr(old, "keys"):
        raise SweepError(f"{where}: {key!r} is a config group, not a field")
    if value is None:       # --set: a string the training command line parses
        return
    if old is not None and not isinstance(value, type(old)) and not (
            isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool)):
        raise SweepError(f"{where}: {key}={value!r} is a {type(value).__name__}, the field is a {type(old).__name__}")


def select(points: list[Point], only: str) -> list[Point]:
    if not only:
        return points
    try:
        pattern = re.compile(only)
    except re.error as e:
        raise SweepError(f"--only={only!r}: not a regular expression ({e})") from None
    chosen = [p for p in points if pattern.search(p.name)]
    if not chosen:
        raise SweepError(f"--only={only!r} matches none of the {len(points)} points: "
                         + "; ".join(p.name for p in points[:8]))
    return chosen
