"""ACRE problems as text: the two "domains" (symbolic, text) the router must tell apart unlabelled.

An example is one query of one problem (``Example``), or one problem with its four queries sharing
the context panels (``PackedExample``, the row layout of ``pipeline``). For the verbatim IID problem
whose first panel is ``{"light_state": "on", "objects": [36, 24]}`` and first query ``[38]``:

symbolic (answer ``" 0"``)::

    <INSTRUCTIONS["symbolic"]>
    [36, 24] -> 2
    ...
    [38] ->

text (answer ``" off"``)::

    <INSTRUCTIONS["text"]>
    A blue sphere in rubber is visible. A brown cylinder in rubber is visible. The light is on.
    ...
    A green sphere in rubber is visible. The state of the light is

Compact form (``form="compact"``, the CPU protocol; the domains stay symbolic and text): no
instruction line; each panel is one line in which every object follows its panel's light word and
``|`` ends the panel; a query lists its objects and nothing else; answers are the words
``off``/``undetermined``/``on`` in both styles. Symbolic writes one token per object (``o36``), text
the attribute words without filler (``blue sphere rubber``)::

    symbolic: on o36 on o24 |                                query: o38                answer: " off"
    text:     on blue sphere rubber on brown cylinder rubber |  query: green sphere rubber

Why a light word before every object: a causal model reads an object's panel light from the token
just before it (an easy previous-token pattern), so matching a query object with its earlier
occurrences is one more step; with one light word per panel it has to find the panel's start.

With ``extra_queries`` a packed problem also asks about every context object alone (first-seen
order, after its four queries; label by the rule, type by ``acre_generate.object_roles``): about
twice the answers per row for a few tokens each. Training-only: evaluation keeps the four queries.

Whitespace rule: a prompt never ends in whitespace and an answer always starts with one space.
Byte-level BPE tokenizers split words *with* their leading space (``" on"``), so encoding prompt and
answer separately gives the ids of their concatenation, and an answer always has the same ids. A
packed prefix ends with ``"\\n"`` and each query is one line, so ``prefix + query`` is the prompt of
the matching unpacked example and the boundary is again a pre-tokenizer boundary.
"""
from __future__ import annotations

from dataclasses import dataclass

from iclm_jax.data import acre
from iclm_jax.data.acre_generate import object_roles

DOMAINS = ("symbolic", "text")   # domain ids 0, 1
FORMS = ("full", "compact")      # full: the paper's renderings; compact: the CPU protocol's (below)

INSTRUCTIONS = {
    "symbolic": "Each line lists objects and the light state (0 off, 1 undetermined, 2 on). "
                "Predict the last state.",
    "text": "Each line describes objects and the light. "
            "Predict the state of the light (off, undetermined, on).",
}
_LIGHT_ID = {"off": 0, "on": 2}    # context light as a LABELS id: off=0, on=2


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair; ``source`` names it in errors (``file:line``, problem index)."""
    prompt: str
    answer: str
    domain: int
    query_type: int = -1
    label: int = -1
    source: str = ""


@dataclass(frozen=True)
class PackedExample:
    """A shared prefix and (query, answer) pairs; ``prefix + query`` is the unpacked prompt."""
    prefix: str
    queries: tuple[tuple[str, str], ...]
    domain: int
    query_types: tuple[int, ...]
    labels: tuple[int, ...]
    source: str = ""


def _check_style(style: str) -> None:
    if style not in DOMAINS:
        raise ValueError(f"unknown rendering style {style!r}; expected one of {DOMAINS}")


def _check_problem(problem) -> None:
    if not isinstance(problem, (list, tuple)) or len(problem) != 10:
        n = len(problem) if isinstance(problem, (list, tuple)) else type(problem).__name__
        raise ValueError(f"an ACRE problem has 10 panels (6 contexts, 4 queries), got {n}")
    for i, panel in enumerate(problem[:6]):
        if panel.get("light_state") not in _LIGHT_ID:
            raise ValueError(f"context panel {i}: light_state {panel.get('light_state')!r} "
                             f"is not 'on'/'off'")


def _object_sentence(obj: int) -> str:
    shape, color, material = acre.object_attributes(obj)
    return f"A {color} {shape} in {material} is visible."


def _compact_objects(objs, style: str) -> str:
    if style == "symbolic":
        return " ".join(f"o{o}" for o in objs)
    return " ".join(" ".join((c, s, m)) for s, c, m in map(acre.object_attributes, objs))


def _context_line(panel: dict, style: str, form: str = "full") -> str:
    objs = panel["objects"]
    if form == "compact":
        light = panel["light_state"]
        return " ".join(f"{light} {_compact_objects([o], style)}" for o in objs) + " |"
    if style == "symbolic":
        return f"[{', '.join(str(o) for o in objs)}] -> {_LIGHT_ID[panel['light_state']]}"
    return " ".join([_object_sentence(o) for o in objs] + [f"The light is {panel['light_state']}."])


def _query_line(panel: dict, style: str, form: str = "full") -> str:
    objs = panel["objects"]
    if form == "compact":
        return _compact_objects(objs, style)
    if style == "symbolic":
        return f"[{', '.join(str(o) for o in objs)}] ->"
    return " ".join([_object_sentence(o) for o in objs] + ["The state of the light is"])


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"unknown rendering form {form!r}; expected one of {FORMS}")


def answer_text(label: int, style: str, form: str = "full") -> str:
    """The answer string of a label id (with its leading space, see the module docstring)."""
    _check_style(style)
    _check_form(form)
    labels = acre.LABELS
    if not isinstance(label, int) or not 0 <= label < len(labels):
        raise ValueError(f"unknown ACRE label {label!r}; expected 0..{len(labels) - 1}")
    return " " + (str(label) if style == "symbolic" and form == "full" else labels[label])


def render_prefix(problem, style: str, form: str = "full") -> str:
    """Instruction line (full form only) and the six context panels, one per line, ending in a newline."""
    _check_style(style)
    _check_form(form)
    _check_problem(problem)
    head = [INSTRUCTIONS[style]] if form == "full" else []
    lines = head + [_context_line(p, style, form) for p in problem[:6]]
    return "\n".join(lines) + "\n"


def _query_meta(panel: dict) -> tuple[int, int]:
    qtype = panel.get("type")
    if "label" not in panel:
        raise ValueError(f"query panel has no 'label': {panel}")
    return (acre.QUERY_TYPES.index(qtype) if qtype in acre.QUERY_TYPES else -1), int(panel["label"])


def render_query(problem, q: int, style: str, form: str = "full") -> Example:
    """Query ``q`` (0..3) of ``problem`` as one prompt/answer pair."""
    if not 0 <= q < 4:
        raise ValueError(f"query index {q} out of range 0..3")
    prefix = render_prefix(problem, style, form)
    panel = problem[6 + q]
    qtype, label = _query_meta(panel)
    return Example(prefix + _query_line(panel, style, form), answer_text(label, style, form),
                   DOMAINS.index(style), qtype, label)


def object_queries(problem) -> list[dict]:
    """One single-object query panel per distinct context object (first-seen order), typed and
    labelled like the generator's cause queries (``acre_generate.object_roles``)."""
    roles, _ = object_roles(problem[:6])
    return [{"light_state": "no", "objects": [o], "label": lab, "type": t} for o, (t, lab) in roles.items()]


#: Query slots of a packed row with ``extra_queries``: 4 + at most 8 distinct context objects
#: (the generator draws at most 4 potential blickets and 5 non-blickets, and 8 in all).
MAX_EXTRA_QUERIES = 8


def render_problem(problem, style: str, packed: bool, form: str = "full",
                   extra_queries: bool = False) -> list[Example] | PackedExample:
    """All four queries of ``problem``: four Examples, or one PackedExample sharing the contexts
    (with ``extra_queries``, followed by one query per context object; packed only)."""
    if not packed:
        if extra_queries:
            raise ValueError("extra_queries needs packed rows (data.packed=True)")
        return [render_query(problem, q, style, form) for q in range(4)]
    prefix = render_prefix(problem, style, form)
    panels = list(problem[6:]) + (object_queries(problem) if extra_queries else [])
    metas = [_query_meta(p) for p in panels]
    queries = tuple((_query_line(p, style, form), answer_text(lab, style, form))
                    for p, (_, lab) in zip(panels, metas))
    return PackedExample(prefix, queries, DOMAINS.index(style), tuple(t for t, _ in metas),
                         tuple(lab for _, lab in metas))
