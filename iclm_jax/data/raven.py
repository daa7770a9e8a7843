"""RAVEN-style progressive matrices (Zhang et al., CVPR 2019; candidates as I-RAVEN, Hu et al. 2021):
the problem format, attribute value ranges, validation and JSON files.

A problem is a 3x3 grid of panels read row by row, the ninth missing, and 8 candidates for it. Each
row follows, per attribute, one rule (``raven_rules``). A problem is a JSON-serialisable dict::

    {"configuration": "center_single",
     "rules": [{"type": {"name": "Progression", "value": 1}, "size": {"name": "Constant", "value": 0},
                "color": {"name": "Distribute_Three", "value": 0}}],     # one dict per component
     "panels": [{"entities": [{"type": 0, "size": 3, "color": 3, "angle": 5,
                               "position": 0, "component": 0}]}, ...],  # 8 context panels, row-major
     "candidates": [{"entities": [...]}, ...],                           # 8 panels
     "target": 5}                                                        # index of the answer, 0..7

Every attribute is an integer code: ``type`` indexes TYPES, ``size`` SIZES, ``color`` COLORS and
``angle`` ANGLES (noise: sampled per entity, never rule-governed). ``position`` is 0..3 in
distribute_four's 2x2 grid (POSITIONS, row-major) and 0 elsewhere; ``component`` is 0 except for the
inner entity of in_center_single_out_center_single (0 = outer, 1 = inner).

Worked example (center_single, the problem above; one entity per panel, shown as type/size/color)::

    row 1: triangle large red   | square large blue    | pentagon large white
    row 2: square small blue    | pentagon small white | hexagon small red
    row 3: pentagon huge white  | hexagon huge red     | ?  -> circle huge blue

type progresses by +1 along each row, size is constant within a row, colour distributes three values
(red, blue, white) over the rows; the candidate "circle huge blue" is the only one completing row 3.

Configurations (the rule-governed attributes of component c are the keys of ``rules[c]``):

* ``center_single``: one entity per panel; rules on type, size, color.
* ``distribute_four``: 1-4 entities at distinct positions of a 2x2 grid, listed by position. One rule
  governs either ``number`` (the entity count; positions are then noise) or ``position`` (the set of
  occupied positions, as a 4-bit mask ``sum(1 << p)``); exactly one of the two keys is present. Unlike
  the original RAVEN, where each entity may vary, all entities of a panel share type, size and color,
  so those three rules act on the panel's shared value.
* ``in_center_single_out_center_single``: an outer (component 0) and an inner entity (component 1),
  listed outer first, each component with its own rules. Outer sizes are large/huge/giant (codes
  3-5), inner ones tiny/small/medium (0-2): the outer entity is always the larger, as in the original
  where the inner one lives in a smaller box; rules act within each component's range. Both
  components take every colour (the original's outer entity is always white).

Indexes in errors are 0-based. Generator: ``raven_generate``; renderings: ``raven_render``; command
line (``python -m iclm_jax.data.raven generate|check|stats|render``): ``raven_cli``.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from iclm_jax.data import indexed

TYPES = ("triangle", "square", "pentagon", "hexagon", "circle")
SIZES = ("tiny", "small", "medium", "large", "huge", "giant")
COLORS = ("white", "yellow", "orange", "red", "pink", "purple", "blue", "green", "brown", "black")
ANGLES = (-135, -90, -45, 0, 45, 90, 135, 180)
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COMPONENTS = ("outer", "inner")
CONFIGURATIONS = ("center_single", "distribute_four", "in_center_single_out_center_single")
PARTS = ("train", "val", "test")
NUM_CONTEXT, NUM_CANDIDATES = 8, 8
ENTITY_FIELDS = ("type", "size", "color", "angle", "position", "component")
SHARED = ("type", "size", "color")          # rule-governed attributes of every component
LAYOUT = ("number", "position")             # distribute_four: exactly one is rule-governed

RULE_NAMES = ("Constant", "Progression", "Arithmetic", "Distribute_Three")
RULE_VALUES = {"Constant": (0,), "Progression": (-2, -1, 1, 2), "Arithmetic": (-1, 1),
               "Distribute_Three": (0,)}
# Rules each attribute admits: no arithmetic on shapes, no progression of position sets.
ATTRIBUTE_RULES = {"type": ("Constant", "Progression", "Distribute_Three"),
                   "size": RULE_NAMES, "color": RULE_NAMES, "number": RULE_NAMES,
                   "position": ("Constant", "Arithmetic", "Distribute_Three")}
_CODES = {"type": TYPES, "size": SIZES, "color": COLORS, "angle": ANGLES}

Problem = dict


def num_components(configuration: str) -> int:
    return 2 if configuration == CONFIGURATIONS[2] else 1


def attribute_values(configuration: str, component: int, attribute: str) -> tuple[int, ...]:
    """The codes ``attribute`` may take in ``component`` (number: counts; position: 4-bit masks)."""
    if attribute == "number":
        return (1, 2, 3, 4) if configuration == "distribute_four" else (1,)
    if attribute == "position":
        return tuple(range(1, 16)) if configuration == "distribute_four" else (1,)
    if attribute == "size" and configuration == CONFIGURATIONS[2]:
        return (3, 4, 5) if component == 0 else (0, 1, 2)
    return tuple(range(len(_CODES[attribute])))


def component_entities(panel: dict, component: int) -> list[dict]:
    return [e for e in panel["entities"] if e["component"] == component]


def panel_value(panel: dict, component: int, attribute: str) -> int:
    """A component's value of a rule attribute in a validated panel (shared by its entities)."""
    ents = component_entities(panel, component)
    if attribute == "number":
        return len(ents)
    if attribute == "position":
        return sum(1 << e["position"] for e in ents)
    return ents[0][attribute]


class RavenFormatError(ValueError):
    """A file (or in-memory problem list) that breaks the format: ``path: problem i: field: what``."""

    def __init__(self, path: str, problem_index: int | None, message: str, field: str | None = None):
        self.path, self.problem_index, self.field, self.message = str(path), problem_index, field, message
        where = "".join([f" problem {problem_index}:" if problem_index is not None else "",
                         f" {field}:" if field else ""])
        super().__init__(f"{self.path}:{where} {message}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _rule_problem(config: str, rules: object) -> tuple[str, str] | None:
    n = num_components(config)
    if not isinstance(rules, list) or len(rules) != n:
        return "rules", f"must be a list of {n} component rule dicts for {config}"
    for c, comp in enumerate(rules):
        if not isinstance(comp, dict):
            return f"rules[{c}]", "must be a JSON object of attribute -> rule"
        layout = [k for k in LAYOUT if k in comp]
        want = SHARED + tuple(layout) if config == "distribute_four" else SHARED
        if set(comp) != set(want) or (config == "distribute_four" and len(layout) != 1):
            extra = " plus exactly one of number, position" if config == "distribute_four" else ""
            return f"rules[{c}]", f"attributes {sorted(comp)} must be {list(SHARED)}{extra}"
        for attr, rule in comp.items():
            field = f"rules[{c}].{attr}"
            if not isinstance(rule, dict) or set(rule) != {"name", "value"}:
                return field, f"must be {{\"name\": ..., \"value\": ...}}, got {rule!r}"
            if rule["name"] not in ATTRIBUTE_RULES[attr]:
                return f"{field}.name", f"{rule['name']!r} is not one of {ATTRIBUTE_RULES[attr]}"
            if not _is_int(rule["value"]) or rule["value"] not in RULE_VALUES[rule["name"]]:
                return f"{field}.value", f"{rule['value']!r} invalid for {rule['name']} " \
                                         f"(expected one of {RULE_VALUES[rule['name']]})"
    return None


def _entity_problem(config: str, ent: object) -> tuple[str, str] | None:
    if not isinstance(ent, dict):
        return "", f"an entity must be a JSON object, got {type(ent).__name__}"
    if set(ent) != set(ENTITY_FIELDS):
        return "", f"fields {sorted(ent)} must be {list(ENTITY_FIELDS)}"
    for f in ENTITY_FIELDS:
        if not _is_int(ent[f]):
            return f".{f}", f"must be an integer, got {ent[f]!r}"
    c = ent["component"]
    if not 0 <= c < num_components(config):
        return ".component", f"{c} out of range 0..{num_components(config) - 1} for {config}"
    for f in ("type", "size", "color"):
        if ent[f] not in attribute_values(config, c, f):
            return f".{f}", f"{ent[f]} out of range {list(attribute_values(config, c, f))}"
    if not 0 <= ent["angle"] < len(ANGLES):
        return ".angle", f"{ent['angle']} out of range 0..{len(ANGLES) - 1}"
    top = 3 if config == "distribute_four" else 0
    if not 0 <= ent["position"] <= top:
        return ".position", f"{ent['position']} out of range 0..{top}"
    return None


def _panel_problem(config: str, panel: object) -> tuple[str, str] | None:
    if not isinstance(panel, dict) or set(panel) != {"entities"}:
        return "", "a panel must be a JSON object {\"entities\": [...]}"
    ents = panel["entities"]
    if not isinstance(ents, list) or not ents:
        return ".entities", "must be a non-empty list"
    for k, ent in enumerate(ents):
        bad = _entity_problem(config, ent)
        if bad:
            return f".entities[{k}]{bad[0]}", bad[1]
    if config == "distribute_four":
        pos = [e["position"] for e in ents]
        if len(ents) > 4 or pos != sorted(set(pos)):
            return ".entities", f"1-4 entities at distinct increasing positions, got positions {pos}"
        if len({tuple(e[f] for f in SHARED) for e in ents}) != 1:
            return ".entities", "entities of a panel must share type, size and color"
    elif [e["component"] for e in ents] != list(range(num_components(config))):
        return ".entities", f"{config} panels hold exactly one entity per component, in component order"
    return None


def validate_problem(problem: object, i: int, path: str = "<problems>") -> None:
    """Raise ``RavenFormatError(path, i, field)`` at the first format violation of problem ``i``."""
    def fail(field: str, message: str):
        raise RavenFormatError(path, i, message, field)

    if not isinstance(problem, dict):
        fail("", f"a problem must be a JSON object, got {type(problem).__name__}")
    for key in ("configuration", "rules", "panels", "candidates", "target"):
        if key not in problem:
            fail(key, "missing field")
    config = problem["configuration"]
    if config not in CONFIGURATIONS:
        fail("configuration", f"unknown {config!r}; expected one of {CONFIGURATIONS}")
    bad = _rule_problem(config, problem["rules"])
    if bad:
        fail(*bad)
    for key, n in (("panels", NUM_CONTEXT), ("candidates", NUM_CANDIDATES)):
        if not isinstance(problem[key], list) or len(problem[key]) != n:
            fail(key, f"must be a list of {n} panels")
        for j, panel in enumerate(problem[key]):
            bad = _panel_problem(config, panel)
            if bad:
                fail(f"{key}[{j}]{bad[0]}", bad[1])
    t = problem["target"]
    if not _is_int(t) or not 0 <= t < NUM_CANDIDATES:
        fail("target", f"{t!r} is not a candidate index 0..{NUM_CANDIDATES - 1}")


def validate_problems(problems: object, path: str = "<problems>") -> None:
    if not isinstance(problems, list):
        raise RavenFormatError(path, None, f"top level must be a JSON array of problems, "
                               f"got {type(problems).__name__}")
    if not problems:
        raise RavenFormatError(path, None, "contains no problems (empty array)")
    for i, problem in enumerate(problems):
        validate_problem(problem, i, path)


def load_problems(path: str | os.PathLike) -> list[Problem]:
    """Read and validate a JSON array of problems."""
    path = os.fspath(path)
    problems = indexed.read_json_file(path, RavenFormatError)
    validate_problems(problems, path)
    return problems


def save_problems(problems: Sequence[Problem], path: str | os.PathLike) -> None:
    """Validate and write one JSON array (one problem per line)."""
    path = os.fspath(path)
    problems = list(problems)
    validate_problems(problems, path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(p, separators=(",", ":")) for p in problems) + "\n]\n")


if __name__ == "__main__":   # python -m iclm_jax.data.raven: the RAVEN command line (raven_cli.py)
    from iclm_jax.data.raven_cli import main
    sys.exit(main())
