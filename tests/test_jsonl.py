"""Evals-style JSONL: prompt/answer rules, round trip of ACRE renderings, every bad input names file:line."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest

from iclm_jax.data import acre_generate
from iclm_jax.data.jsonl import JsonlError, load_jsonl, write_jsonl
from iclm_jax.data.render import Example, render_problem
from tests.test_render import PROBLEM


def _write(tmp_path, lines: list[str]) -> str:
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def _plain(examples):
    return [dataclasses.replace(e, source="") for e in examples]


def test_load_messages_and_ideal(tmp_path):
    path = _write(tmp_path, [
        json.dumps({"input": [{"role": "system", "content": "Answer briefly."},
                              {"role": "user", "content": "2+2= "}], "ideal": ["4", "four"]}),
        "",
        json.dumps({"input": "Capital of France?", "ideal": "\nParis", "domain": "text", "type": "direct",
                    "label": 2}),
        json.dumps({"input": [{"role": "user", "content": "x"}], "ideal": "y", "domain": 7, "type": 3}),
    ])
    a, b, c = load_jsonl(path)
    assert a == Example("Answer briefly.\n2+2=", " 4", -1, -1, -1, source=f"{path}:1")
    assert b == Example("Capital of France?", "\nParis", 1, 0, 2, source=f"{path}:3")
    assert (c.domain, c.query_type) == (7, 3)
    custom = load_jsonl(path, domains={"text": 5})
    assert custom[1].domain == 5


def test_a_numeric_ideal_is_its_json_text(tmp_path):
    """Public evals files often give numbers: 4, 2.5, [10, "ten"] answer " 4", " 2.5", " 10"."""
    path = _write(tmp_path, [json.dumps({"input": "2+2=", "ideal": 4}), json.dumps({"input": "5/2=", "ideal": 2.5}),
                             json.dumps({"input": "5+5=", "ideal": [10, "ten"]})])
    assert [e.answer for e in load_jsonl(path)] == [" 4", " 2.5", " 10"]


@pytest.mark.parametrize("packed", [False, True])
def test_round_trip(tmp_path, packed):
    examples = []
    for problem in [PROBLEM] + acre_generate.generate_problems("IID", "val", 3, seed=0):
        for style in ("symbolic", "text"):
            r = render_problem(problem, style, packed)
            examples.extend([r] if packed else r)
    path = str(tmp_path / "sub" / "out.jsonl")
    write_jsonl(examples, path)
    loaded = load_jsonl(path)
    assert _plain(loaded) == examples
    assert [e.source for e in loaded] == [f"{path}:{i + 1}" for i in range(len(examples))]


BAD = [
    ('{"input": [{"role": "user", "content": "a"}], "ideal": "b"', "malformed JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"ideal": "b"}', "missing field 'input'"),
    ('{"input": "a"}', "missing field 'ideal'"),
    ('{"input": 5, "ideal": "b"}', "'input' must be"),
    ('{"input": [], "ideal": "b"}', "'input' must be"),
    ('{"input": [{"role": "user"}], "ideal": "b"}', r"'input'\[0\] must be"),
    ('{"input": [{"role": 1, "content": "a"}], "ideal": "b"}', r"'input'\[0\] must be"),
    ('{"input": "a", "ideal": {"x": 3}}', "'ideal' must be a string, a number or a list of them, got dict"),
    ('{"input": "a", "ideal": true}', "'ideal' must be a string, a number"),
    ('{"input": "a", "ideal": [null]}', "'ideal' list must hold"),
    ('{"input": "a", "ideal": []}', "'ideal' list"),
    ('{"input": "a", "ideal": "b", "domain": 1.5}', "'domain' must be"),
    ('{"input": "a", "ideal": "b", "domain": "image"}', "unknown domain 'image'"),
    ('{"input": "a", "ideal": "b", "type": "causal"}', "unknown type 'causal'"),
    ('{"input": "a", "ideal": "b", "type": [1]}', "'type' must be"),
    ('{"input": "a", "ideal": "b", "label": "on"}', "'label' must be"),
    ('{"input": "a", "ideal": "b", "label": 9}', r"'label' must be an id in \[-1, 3\).*got 9"),
    ('{"input": "a", "ideal": "b", "type": 99}', r"'type' must be .*got 99"),
    ('{"input": "a", "ideal": "b", "domain": -4}', r"'domain' must be .*got -4"),
    ('{"input": "a", "queries": []}', "'queries' must be"),
    ('{"input": "a", "queries": [{"input": "q"}]}', r"queries\[0\] must be"),
]


@pytest.mark.parametrize("line,message", BAD)
def test_bad_record_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"input": "a", "ideal": "b"})
    path = _write(tmp_path, [good, "", good, line, good])
    with pytest.raises(JsonlError, match=f"^{re.escape(path)}:4: .*{message}"):
        load_jsonl(path)


def test_empty_and_missing_file(tmp_path):
    path = _write(tmp_path, ["", "  "])
    with pytest.raises(JsonlError, match=f"^{re.escape(path)}:1: empty file"):
        load_jsonl(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl(str(tmp_path / "nope.jsonl"))


def test_a_non_utf8_byte_and_deep_nesting_name_file_and_line(tmp_path):
    good = json.dumps({"input": "a", "ideal": "b"}).encode()
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(good + b"\n" + b'{"input": "caf\xe9", "ideal": "b"}\n')
    with pytest.raises(JsonlError, match=rf"^{re.escape(str(path))}:2: not UTF-8 \(byte 0xe9 at column 15\)"):
        load_jsonl(str(path))
    deep = tmp_path / "deep.jsonl"
    deep.write_text(json.dumps({"input": "a", "ideal": "b"}) + "\n" + "[" * 200_000 + "\n")
    with pytest.raises(JsonlError, match=rf"^{re.escape(str(deep))}:2: JSON nested too deeply"):
        load_jsonl(str(deep))
