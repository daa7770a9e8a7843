"""Evals-style JSONL files: other reasoning datasets in, and ACRE renderings out for inspection.

One JSON object per line (blank lines are skipped)::

    {"input": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
     "ideal": "answer" | 4 | ["answer", "alternative", ...],   # a number is its JSON text
     "domain": 1 | "text",            # optional: rendering/domain id or name
     "type": "direct" | 0,            # optional: ACRE query type name or id
     "label": 2}                      # optional: ACRE label id

Prompt: the messages' contents joined by ``"\\n"`` in order (roles are checked but not rendered: the
models here are trained from plain text, with no chat template), then trailing whitespace removed.
Answer: ``ideal`` (its first entry if a list), with one space prepended unless it already starts
with whitespace -- the rule of :mod:`iclm_jax.data.render`, so BPE tokenizes answers consistently.
``"input"`` may also be a plain string (one user message).

A packed record (``render --packed``) replaces ``"ideal"`` with
``"queries": [{"input": "query text", "ideal": " answer", "type": ..., "label": ...}, ...]`` and its
``"input"`` is the shared prefix (kept verbatim). ``write_jsonl`` writes both kinds; they load back
equal (apart from ``source``, set to ``path:line`` on load) when prompts follow the whitespace rule.
"""
from __future__ import annotations

import array
import functools
import json
import os
from typing import Iterable

from iclm_jax.data import indexed
from iclm_jax.data.acre import LABELS, QUERY_TYPES
from iclm_jax.data.render import DOMAINS, Example, PackedExample


class JsonlError(ValueError):
    """A bad record; the message starts with ``path:line``."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _prompt(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise JsonlError(f"{where}: 'input' must be a non-empty list of messages or a string, "
                         f"got {type(value).__name__}")
    parts = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) \
                or not isinstance(m.get("role"), str):
            raise JsonlError(f"{where}: 'input'[{i}] must be {{\"role\": str, \"content\": str}}, "
                             f"got {m!r}")
        parts.append(m["content"])
    return "\n".join(parts)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _answer(value, where: str, field: str = "ideal") -> str:
    """The answer text; a number (common in public evals files) is its JSON text (``4``, ``2.5``)."""
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) or _is_number(v) for v in value):
            raise JsonlError(f"{where}: '{field}' list must hold at least one string or number, "
                             f"got {value!r}")
        value = value[0]
    if _is_number(value):
        value = json.dumps(value)
    if not isinstance(value, str):
        raise JsonlError(f"{where}: '{field}' must be a string, a number or a list of them, "
                         f"got {type(value).__name__}")
    return value if value[:1].isspace() else " " + value


def _domain(rec: dict, where: str, domains: dict) -> int:
    d = rec.get("domain", -1)
    if isinstance(d, str):
        if d not in domains:
            raise JsonlError(f"{where}: unknown domain {d!r}; known: {sorted(domains)}")
        return int(domains[d])
    if not _is_int(d) or d < -1:
        raise JsonlError(f"{where}: 'domain' must be a name of {sorted(domains)} or an id >= -1 (-1 = unknown), "
                         f"got {d!r}")
    return d


def _query_type(rec: dict, where: str) -> int:
    t = rec.get("type", -1)
    if isinstance(t, str):
        types = QUERY_TYPES
        if t not in types:
            raise JsonlError(f"{where}: unknown type {t!r}; expected one of {types} or an int")
        return types.index(t)
    if not _is_int(t) or not -1 <= t < len(QUERY_TYPES):
        raise JsonlError(f"{where}: 'type' must be a name of {QUERY_TYPES} or an id in [-1, {len(QUERY_TYPES)}) "
                         f"(-1 = unknown), got {t!r}")
    return t


def _label(rec: dict, where: str) -> int:
    lab = rec.get("label", -1)
    if not _is_int(lab) or not -1 <= lab < len(LABELS):
        raise JsonlError(f"{where}: 'label' must be an id in [-1, {len(LABELS)}) of {LABELS} (-1 = unknown), "
                         f"got {lab!r}")
    return lab


def _record(rec, where: str, domains: dict) -> Example | PackedExample:
    if not isinstance(rec, dict):
        raise JsonlError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "input" not in rec:
        raise JsonlError(f"{where}: missing field 'input'")
    domain = _domain(rec, where, domains)
    if "queries" in rec:
        qs = rec["queries"]
        if not isinstance(qs, list) or not qs:
            raise JsonlError(f"{where}: 'queries' must be a non-empty list")
        items, types, labels = [], [], []
        for j, q in enumerate(qs):
            w = f"{where}: queries[{j}]"
            if not isinstance(q, dict) or not isinstance(q.get("input"), str) or "ideal" not in q:
                raise JsonlError(f"{w} must be {{\"input\": str, \"ideal\": ...}}, got {q!r}")
            items.append((q["input"], _answer(q["ideal"], w)))
            types.append(_query_type(q, w))
            labels.append(_label(q, w))
        return PackedExample(_prompt(rec["input"], where), tuple(items), domain, tuple(types),
                             tuple(labels), source=where)
    if "ideal" not in rec:
        raise JsonlError(f"{where}: missing field 'ideal'")
    return Example(_prompt(rec["input"], where).rstrip(), _answer(rec["ideal"], where), domain,
                   _query_type(rec, where), _label(rec, where), source=where)


def load_jsonl(path: str, *, domains: dict | None = None) -> list[Example | PackedExample]:
    """Every record of ``path``; ``domains`` maps domain names to ids (default: ``DOMAINS``)."""
    return list(_records(path, domains))


def index_jsonl(path: str, *, domains: dict | None = None) -> indexed.IndexedRecords:
    """``load_jsonl`` for a file of any size: one pass validates every line and keeps its byte range; record
    ``i`` is read and parsed again on access (memory does not grow with the file)."""
    starts, ends, lines = array.array("q"), array.array("q"), array.array("q")
    for start, end, n, _ in _records(path, domains, positions=True):
        starts.append(start)
        ends.append(end)
        lines.append(n)
    domains = _domains(domains)
    return indexed.IndexedRecords(path, starts, ends, lines, functools.partial(_parse_line, path=path,
                                                                             domains=domains))


def _domains(domains: dict | None) -> dict:
    return {name: i for i, name in enumerate(DOMAINS)} if domains is None else domains


def _records(path: str, domains: dict | None, positions: bool = False):
    domains = _domains(domains)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such JSONL file")
    empty = True
    for start, end, n, raw in indexed.jsonl_lines(path):   # line by line: memory does not grow with the file
        rec = _parse_line(raw, n, path=path, domains=domains)
        empty = False
        yield (start, end, n, rec) if positions else rec
    if empty:
        raise JsonlError(f"{path}:1: empty file (no records)")


def _parse_line(raw: bytes, n: int, *, path: str, domains: dict) -> Example | PackedExample:
    where = f"{path}:{n}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JsonlError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise JsonlError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise JsonlError(f"{where}: JSON nested too deeply") from None
    return _record(rec, where, domains)


def _meta(rec: dict, qtype: int, label: int) -> dict:
    types = QUERY_TYPES
    if 0 <= qtype < len(types):
        rec["type"] = types[qtype]
    elif qtype != -1:
        rec["type"] = qtype
    if label != -1:
        rec["label"] = label
    return rec


def to_record(ex: Example | PackedExample) -> dict:
    """The JSON object of one example (inverse of loading it)."""
    rec: dict = {}
    if 0 <= ex.domain < len(DOMAINS):
        rec["domain"] = DOMAINS[ex.domain]
    elif ex.domain != -1:
        rec["domain"] = ex.domain
    if isinstance(ex, PackedExample):
        rec["input"] = [{"role": "user", "content": ex.prefix}]
        rec["queries"] = [_meta({"input": q, "ideal": a}, t, lab)
                          for (q, a), t, lab in zip(ex.queries, ex.query_types, ex.labels)]
        return rec
    rec["input"] = [{"role": "user", "content": ex.prompt}]
    rec["ideal"] = ex.answer
    return _meta(rec, ex.query_type, ex.label)


def write_jsonl(examples: Iterable[Example | PackedExample], path: str) -> None:
    """Write ``examples`` one JSON object per line (UTF-8, parent directories created)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(to_record(ex), ensure_ascii=False) + "\n")
