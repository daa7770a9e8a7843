"""ACRE (Zhang et al., CVPR 2021) blicket problems: the release format and the label rule.

A release file (``IID/train.json``, ``Comp/test.json``, ...) is one JSON array of problems; a
problem is 10 panels: 6 contexts ``{"light_state": "on"|"off", "objects": [...]}`` then 4 queries
``{"light_state": "no", "objects": [...], "label": 0|1|2, "type": ..., ["ref": i]}``. Objects are
ids 0-47, ``16*shape + 2*color + material``. Problems stay the raw JSON structure (``Problem``) so
unknown fields survive a load/save round trip; everything is validated on load and on save.

The label rule: some objects are blickets and the light is on iff a blicket is present. A query is
"on" if it lights under every blicket assignment consistent with the 6 contexts, "off" under none,
else "undetermined" (this reproduces every released val/test label). ``derive_label`` uses its
closed form; tests/test_acre.py checks it against brute-force enumeration.

Indexes in errors and reports are 0-based, like ``ref``. The generator is in ``acre_generate``, the
command line (``python -m iclm_jax.data.acre generate|check|stats|render``) in ``data/cli.py``.
"""
from __future__ import annotations

import array
import json
import os
import sys
from collections import Counter
from typing import Sequence

from iclm_jax.data import indexed

QUERY_TYPES = ("direct", "indirect", "screen_off", "potential")
LABELS = ("off", "undetermined", "on")
SHAPES = ("cube", "cylinder", "sphere")
COLORS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
MATERIALS = ("rubber", "metal")
NUM_OBJECTS = 48
SPLITS = ("IID", "Comp", "Sys", "CompHeldout")
PARTS = ("train", "val", "test")
NUM_CONTEXTS, NUM_QUERIES = 6, 4
MAX_PANEL_OBJECTS = 6
# Labels each query type may carry (a type names how the label is derived, so it bounds it).
TYPE_LABELS = {"direct": (0, 2), "indirect": (2,), "screen_off": (0,), "potential": (1,)}

Problem = list[dict]


def object_attributes(obj_id: int) -> tuple[str, str, str]:
    """(shape, color, material) of an object id."""
    if not 0 <= obj_id < NUM_OBJECTS:
        raise ValueError(f"object id {obj_id} outside 0..{NUM_OBJECTS - 1}")
    return SHAPES[obj_id // 16], COLORS[obj_id % 16 // 2], MATERIALS[obj_id % 2]


def _object_id(shape: int, color: int, material: int) -> int:
    return 16 * shape + 2 * color + material


# CompHeldout: the test objects are the 16 combinations with (shape + color + material) % 3 == 0.
# Each (color, material) pair loses exactly one shape and each (shape, color) pair at most one
# material, so every attribute value and every attribute *pair* is seen in training and only the
# triple is new at test time.
_HELDOUT = tuple(_object_id(s, c, m) for s in range(3) for c in range(8) for m in range(2)
                 if (s + c + m) % 3 == 0)


def split_objects(split: str, part: str) -> tuple[int, ...]:
    """Object ids a split/part draws from.

    IID, Sys: all 48. Comp: 0-23 (cubes and gray/red/blue/green cylinders) in every part, as
    released. CompHeldout: test = the 16 ids with (shape + color + material) % 3 == 0
    (shape, color, material = index in SHAPES, COLORS, MATERIALS)::

        cubes      0 gray rubber, 5 blue metal, 6 green rubber, 11 purple metal, 12 cyan rubber
        cylinders  19 red metal, 20 blue rubber, 25 brown metal, 26 purple rubber, 31 yellow metal
        spheres    33 gray metal, 34 red rubber, 39 green metal, 40 brown rubber, 45 cyan metal,
                   46 yellow rubber

    and train = val = the other 32: every shape, color and material occurs in both, and every
    pair of attribute values is seen in training, so only the combinations are new.
    """
    _check_split(split, part)
    if split == "Comp":
        return tuple(range(24))
    if split == "CompHeldout":
        if part == "test":
            return _HELDOUT
        return tuple(i for i in range(NUM_OBJECTS) if i not in _HELDOUT)
    return tuple(range(NUM_OBJECTS))


def _check_split(split: str, part: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")


# ---------------------------------------------------------------- format


class AcreFormatError(ValueError):
    """A release file (or in-memory problem list) that breaks the format, located precisely."""

    def __init__(self, path: str, problem_index: int | None, message: str,
                 panel_index: int | None = None):
        self.path, self.problem_index, self.panel_index = str(path), problem_index, panel_index
        self.message = message
        where = "" if problem_index is None else f" problem {problem_index}"
        if panel_index is not None:
            where += f", panel {panel_index}"
        super().__init__(f"{self.path}:{where}: {message}" if where else f"{self.path}: {message}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _panel_problem(panel: object, j: int) -> str | None:
    """What is wrong with panel ``j`` of a problem, or None."""
    if not isinstance(panel, dict):
        return f"panel must be a JSON object, got {type(panel).__name__}"
    is_query = j >= NUM_CONTEXTS
    for field in ("light_state", "objects") + (("label", "type") if is_query else ()):
        if field not in panel:
            return f"missing field {field!r}"
    light = panel["light_state"]
    allowed = ("no",) if is_query else ("on", "off")
    if light not in allowed:
        kind = "query" if is_query else "context"
        return f"light_state {light!r} invalid for a {kind} panel (expected {' or '.join(allowed)})"
    objs = panel["objects"]
    if not isinstance(objs, list) or not 1 <= len(objs) <= MAX_PANEL_OBJECTS:
        return f"objects must be a list of 1..{MAX_PANEL_OBJECTS} ids, got {objs!r}"
    for o in objs:
        if not _is_int(o) or not 0 <= o < NUM_OBJECTS:
            return f"object id {o!r} is not an integer in 0..{NUM_OBJECTS - 1}"
    if len(set(objs)) != len(objs):
        return f"object repeated within the panel: {objs}"
    if is_query:
        if not _is_int(panel["label"]) or not 0 <= panel["label"] < len(LABELS):
            return f"unknown label {panel['label']!r} (expected 0 off, 1 undetermined, 2 on)"
        if panel["type"] not in QUERY_TYPES:
            return f"unknown type {panel['type']!r} (expected one of {', '.join(QUERY_TYPES)})"
        if "ref" in panel and not (_is_int(panel["ref"]) and 0 <= panel["ref"] < NUM_CONTEXTS):
            return f"ref {panel['ref']!r} is not a context panel index 0..{NUM_CONTEXTS - 1}"
    return None


def validate_problems(problems: object, path: str = "<problems>") -> None:
    """Raise ``AcreFormatError`` at the first format violation (labels are ``check_problems``')."""
    if not isinstance(problems, list):
        raise AcreFormatError(path, None, "top level must be a JSON array of problems, "
                              f"got {type(problems).__name__}")
    if not problems:
        raise AcreFormatError(path, None, "contains no problems (empty array)")
    for i, problem in enumerate(problems):
        validate_problem(problem, i, path)


def validate_problem(problem: object, i: int, path: str = "<problems>") -> None:
    """``validate_problems`` for problem ``i`` alone."""
    n_panels = NUM_CONTEXTS + NUM_QUERIES
    if not isinstance(problem, list):
        raise AcreFormatError(path, i, f"a problem must be an array of {n_panels} panels, "
                              f"got {type(problem).__name__}")
    if len(problem) != n_panels:
        raise AcreFormatError(path, i, f"has {len(problem)} panels, expected {n_panels} "
                              f"({NUM_CONTEXTS} contexts + {NUM_QUERIES} queries)")
    for j, panel in enumerate(problem):
        msg = _panel_problem(panel, j)
        if msg is not None:
            raise AcreFormatError(path, i, msg, panel_index=j)


def load_problems(path: str | os.PathLike) -> list[Problem]:
    """Read and validate a release-format file; unknown fields are kept."""
    path = os.fspath(path)
    problems = indexed.read_json_file(path, AcreFormatError)
    validate_problems(problems, path)
    return problems


def index_problems(path: str | os.PathLike) -> indexed.IndexedRecords:
    """``load_problems`` for a file of any size: one incremental pass validates every problem and keeps
    its byte range; item ``i`` is read and parsed again on access (memory does not grow with the file)."""
    path = os.fspath(path)
    starts, ends = array.array("q"), array.array("q")
    try:
        for start, end, _, problem in indexed.json_array_elements(path):
            validate_problem(problem, len(starts), path)
            starts.append(start)
            ends.append(end)
    except (OSError, UnicodeDecodeError) as e:
        raise AcreFormatError(path, None, f"cannot read: {e}") from None
    except indexed.ArrayFormatError as e:
        what = e.message if e.message in ("file is empty",) else (
            f"{e.message} at line {e.line}, column {e.column}")
        raise AcreFormatError(path, None, what) from None
    if not starts:
        raise AcreFormatError(path, None, "contains no problems (empty array)")
    return indexed.IndexedRecords(path, starts, ends, range(len(starts)), _parse_problem)


def _parse_problem(raw: bytes, index: int) -> Problem:
    return json.loads(raw)


def save_problems(problems: Sequence[Problem], path: str | os.PathLike) -> None:
    """Write the release format: one JSON array, 4-space indent as the original generator did."""
    path = os.fspath(path)
    problems = list(problems)
    validate_problems(problems, path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(problems, f, indent=4)


# ---------------------------------------------------------------- the label rule


def derive_label(contexts: list[dict], query_objects: Sequence[int]) -> int:
    """The label the 6 contexts imply for a query (0 off, 1 undetermined, 2 on).

    Closed form of the enumeration: every object of an "off" panel is a non-blicket, and assigning
    "blicket" to every other object is consistent. So the query is off iff all its objects are known
    non-blickets, and on iff making all its objects non-blickets breaks some "on" panel, i.e. iff it
    contains every possibly-blicket object of some "on" panel.
    """
    non_blickets = {o for c in contexts if c["light_state"] == "off" for o in c["objects"]}
    query = set(query_objects)
    on_label = False
    for k, c in enumerate(contexts):
        if c["light_state"] != "on":
            continue
        candidates = set(c["objects"]) - non_blickets
        if not candidates:
            raise ValueError(f"contradictory contexts: 'on' panel {k} {c['objects']} holds only "
                             "objects seen in 'off' panels")
        on_label |= candidates <= query
    if on_label:
        return 2
    return 0 if query <= non_blickets else 1


def check_problems(problems: Sequence[Problem]) -> list[str]:
    """Every disagreement with the rule in validated problems, one line each (empty = all agree).

    Checked: each label against ``derive_label``, each type against the labels it allows, and
    each ``ref`` pointing at an "off" context whose objects the query contains.
    """
    return [line for i, problem in enumerate(problems) for line in _disagreements(i, problem)]


def _disagreements(i: int, problem: Problem) -> list[str]:
    out = []
    contexts = problem[:NUM_CONTEXTS]
    for j in range(NUM_CONTEXTS, len(problem)):
        q = problem[j]
        where = f"problem {i}, panel {j} {q['objects']}"
        lab, qtype = q["label"], q["type"]
        try:
            want = derive_label(contexts, q["objects"])
        except ValueError as e:
            return out + [f"problem {i}: {e}"]
        if lab != want:
            out.append(f"{where}: label {lab} ({LABELS[lab]}) but the contexts imply "
                       f"{want} ({LABELS[want]})")
        elif lab not in TYPE_LABELS[qtype]:
            out.append(f"{where}: type {qtype!r} cannot have label {lab} ({LABELS[lab]})")
        if "ref" in q:
            ref = contexts[q["ref"]]
            if ref["light_state"] != "off" or not set(ref["objects"]) <= set(q["objects"]):
                out.append(f"{where}: ref {q['ref']} must be an 'off' context whose objects "
                           f"the query holds, got {ref}")
    return out


def type_label_counts(problems: Sequence[Problem]) -> Counter:
    """Counter of (type, label) over all queries."""
    return Counter((q["type"], q["label"]) for p in problems for q in p[NUM_CONTEXTS:])


def format_stats(problems: Sequence[Problem]) -> str:
    """A query type x label table with each type's share of all queries."""
    counts = type_label_counts(problems)
    total = sum(counts.values())
    lines = [f"{'type':<11}" + "".join(f"{lab:>14}" for lab in LABELS)
             + f"{'total':>8}{'share':>8}"]
    for t in QUERY_TYPES:
        row = [counts[(t, k)] for k in range(len(LABELS))]
        lines.append(f"{t:<11}" + "".join(f"{c:>14}" for c in row)
                     + f"{sum(row):>8}{sum(row) / max(total, 1):>8.1%}")
    lines.append(f"{len(problems)} problems, {total} queries")
    return "\n".join(lines)


if __name__ == "__main__":   # python -m iclm_jax.data.acre: the data command line (data/cli.py)
    from iclm_jax.data.cli import main
    sys.exit(main())
