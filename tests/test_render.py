"""Both ACRE renderings on a verbatim release problem (exact strings), packed vs unpacked, the CLI."""
from __future__ import annotations

import argparse
import json
import re

import pytest

from iclm_jax.data import acre, acre_generate, render
from iclm_jax.data import cli as data_cli
from iclm_jax.data.jsonl import load_jsonl
from iclm_jax.data.render import Example, PackedExample, render_problem, render_query

PROBLEM = json.loads(
    '[{"light_state":"on","objects":[36,24]},{"light_state":"off","objects":[24]},'
    '{"light_state":"on","objects":[36]},{"light_state":"on","objects":[47,39,22,28,38]},'
    '{"light_state":"off","objects":[38,25,22,28]},{"light_state":"off","objects":[28,22]},'
    '{"light_state":"no","objects":[38],"label":0,"type":"screen_off"},'
    '{"light_state":"no","objects":[39],"label":1,"type":"potential"},'
    '{"light_state":"no","objects":[24,22],"label":0,"type":"screen_off","ref":1},'
    '{"light_state":"no","objects":[24,38],"label":0,"type":"screen_off","ref":1}]')

SYMBOLIC_PREFIX = (
    "Each line lists objects and the light state (0 off, 1 undetermined, 2 on). Predict the last state.\n"
    "[36, 24] -> 2\n[24] -> 0\n[36] -> 2\n[47, 39, 22, 28, 38] -> 2\n[38, 25, 22, 28] -> 0\n[28, 22] -> 0\n")
SYMBOLIC_QUERIES = ["[38] ->", "[39] ->", "[24, 22] ->", "[24, 38] ->"]

# 36 blue sphere rubber, 24 brown cylinder rubber, 47 yellow sphere metal, 39 green sphere metal,
# 22 green cylinder rubber, 28 cyan cylinder rubber, 38 green sphere rubber, 25 brown cylinder metal
TEXT_PREFIX = (
    "Each line describes objects and the light. Predict the state of the light (off, undetermined, on).\n"
    "A blue sphere in rubber is visible. A brown cylinder in rubber is visible. The light is on.\n"
    "A brown cylinder in rubber is visible. The light is off.\n"
    "A blue sphere in rubber is visible. The light is on.\n"
    "A yellow sphere in metal is visible. A green sphere in metal is visible. "
    "A green cylinder in rubber is visible. A cyan cylinder in rubber is visible. "
    "A green sphere in rubber is visible. The light is on.\n"
    "A green sphere in rubber is visible. A brown cylinder in metal is visible. "
    "A green cylinder in rubber is visible. A cyan cylinder in rubber is visible. The light is off.\n"
    "A cyan cylinder in rubber is visible. A green cylinder in rubber is visible. The light is off.\n")
TEXT_QUERIES = [
    "A green sphere in rubber is visible. The state of the light is",
    "A green sphere in metal is visible. The state of the light is",
    "A brown cylinder in rubber is visible. A green cylinder in rubber is visible. The state of the light is",
    "A brown cylinder in rubber is visible. A green sphere in rubber is visible. The state of the light is",
]
LABELS = (0, 1, 0, 0)
TYPES = (2, 3, 2, 2)      # screen_off, potential, screen_off, screen_off


def test_symbolic_exact():
    exs = render_problem(PROBLEM, "symbolic", packed=False)
    assert exs == [Example(SYMBOLIC_PREFIX + q, f" {lab}", 0, t, lab)
                   for q, lab, t in zip(SYMBOLIC_QUERIES, LABELS, TYPES)]


def test_text_exact():
    exs = render_problem(PROBLEM, "text", packed=False)
    words = {0: " off", 1: " undetermined"}
    assert exs == [Example(TEXT_PREFIX + q, words[lab], 1, t, lab)
                   for q, lab, t in zip(TEXT_QUERIES, LABELS, TYPES)]


@pytest.mark.parametrize("style,prefix,queries", [("symbolic", SYMBOLIC_PREFIX, SYMBOLIC_QUERIES),
                                                  ("text", TEXT_PREFIX, TEXT_QUERIES)])
def test_packed_matches_unpacked(style, prefix, queries):
    packed = render_problem(PROBLEM, style, packed=True)
    assert isinstance(packed, PackedExample)
    assert packed.prefix == prefix and [q for q, _ in packed.queries] == queries
    assert packed.labels == LABELS and packed.query_types == TYPES
    assert packed.domain == render.DOMAINS.index(style)
    for q, (query, answer) in enumerate(packed.queries):
        ex = render_query(PROBLEM, q, style)
        assert ex.prompt == packed.prefix + query and ex.answer == answer


def test_object_sentences_follow_id_formula():
    shapes = ("cube", "cylinder", "sphere")
    colors = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
    for obj in range(48):
        p = [dict(panel) for panel in PROBLEM]
        p[6] = dict(p[6], objects=[obj])
        line = render_query(p, 0, "text").prompt.splitlines()[-1]
        s, c, m = obj // 16, (obj % 16) // 2, obj % 2
        assert line == f"A {colors[c]} {shapes[s]} in {('rubber', 'metal')[m]} is visible. " \
                       "The state of the light is"


def test_generated_problems_answers_map_to_labels():
    words = ("off", "undetermined", "on")
    for split in ("IID", "Comp"):
        for problem in acre_generate.generate_problems(split, "train", 20, seed=3):
            for style in render.DOMAINS:
                for q, ex in enumerate(render_problem(problem, style, packed=False)):
                    label = problem[6 + q]["label"]
                    assert ex.label == label
                    assert ex.query_type == acre.QUERY_TYPES.index(problem[6 + q]["type"])
                    assert ex.answer == " " + (str(label) if style == "symbolic" else words[label])
                    assert not ex.prompt[-1].isspace()
                    assert len(ex.prompt.splitlines()) == 8
                if style == "symbolic":
                    assert re.fullmatch(r"(\[\d+(, \d+)*\] -> [02]\n){6}\[\d+(, \d+)*\] ->",
                                        ex.prompt.split("\n", 1)[1])


def test_bad_inputs():
    with pytest.raises(ValueError, match="10 panels"):
        render_problem(PROBLEM[:9], "text", packed=True)
    with pytest.raises(ValueError, match="style"):
        render_problem(PROBLEM, "image", packed=True)
    with pytest.raises(ValueError, match="query index"):
        render_query(PROBLEM, 4, "text")


@pytest.mark.parametrize("packed", [False, True])
def test_render_cli(tmp_path, packed):
    src = tmp_path / "val.json"
    src.write_text(json.dumps([PROBLEM, PROBLEM]))
    out = tmp_path / "out" / "val.jsonl"
    parser = argparse.ArgumentParser()
    data_cli.add_render_command(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["render", str(src), "--style", "text", "--out", str(out)]
                             + (["--packed"] if packed else []))
    assert args.func(args) == 0
    loaded = load_jsonl(str(out))
    one = render_problem(PROBLEM, "text", packed)
    expected = [one, one] if packed else one + one
    assert [type(e)(**{**e.__dict__, "source": ""}) for e in loaded] == expected


# The compact form (CPU protocol) of the same verbatim problem: a light word before every object.
COMPACT_SYMBOLIC_PREFIX = ("on o36 on o24 |\noff o24 |\non o36 |\non o47 on o39 on o22 on o28 on o38 |\n"
                           "off o38 off o25 off o22 off o28 |\noff o28 off o22 |\n")
COMPACT_TEXT_FIRST_LINE = "on blue sphere rubber on brown cylinder rubber |"


def test_compact_exact():
    sym = render_problem(PROBLEM, "symbolic", packed=True, form="compact")
    assert sym.prefix == COMPACT_SYMBOLIC_PREFIX
    assert sym.queries == (("o38", " off"), ("o39", " undetermined"), ("o24 o22", " off"),
                           ("o24 o38", " off"))
    txt = render_problem(PROBLEM, "text", packed=True, form="compact")
    assert txt.prefix.splitlines()[0] == COMPACT_TEXT_FIRST_LINE
    assert txt.queries[0] == ("green sphere rubber", " off")
    assert [q.answer for q in render_problem(PROBLEM, "text", packed=False, form="compact")] == \
        [" off", " undetermined", " off", " off"]
    with pytest.raises(ValueError, match="form"):
        render_problem(PROBLEM, "text", packed=True, form="tiny")


def test_extra_queries_follow_the_rule():
    """Every context object asked alone, first-seen order, labels by the rule, types as the generator's."""
    ex = render_problem(PROBLEM, "symbolic", packed=True, form="compact", extra_queries=True)
    seen = list(dict.fromkeys(o for panel in PROBLEM[:6] for o in panel["objects"]))
    assert [q for q, _ in ex.queries[4:]] == [f"o{o}" for o in seen]
    assert ex.labels[4:] == tuple(acre.derive_label(PROBLEM[:6], [o]) for o in seen)
    # 36 alone in an "on" panel: direct/on; 24 off and in an "on" panel: screen_off; 47, 39 potential
    types = dict(zip(seen, ex.query_types[4:]))
    assert types[36] == 0 and ex.labels[4 + seen.index(36)] == 2
    assert types[24] == 2 and types[47] == types[39] == 3
    assert len(seen) <= render.MAX_EXTRA_QUERIES
    for problem in acre_generate.generate_problems("IID", "train", 200, seed=4):
        n = len(render_problem(problem, "text", packed=True, form="compact", extra_queries=True).queries)
        assert 4 < n <= 4 + render.MAX_EXTRA_QUERIES
    with pytest.raises(ValueError, match="packed"):
        render_problem(PROBLEM, "text", packed=False, extra_queries=True)
