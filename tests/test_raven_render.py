"""RAVEN renderings on a hand-written problem (exact strings), the vocabulary, reference predictors."""
import copy

import pytest

from iclm_jax.data.raven import CONFIGURATIONS
from iclm_jax.data.raven_generate import disagreements, generate_problems
from iclm_jax.data.raven_reference import fit_reference, score_reference
from iclm_jax.data.raven_render import INSTRUCTIONS, render_panel, render_problem, vocabulary_words
from iclm_jax.data.render import DOMAINS, FORMS, Example
from iclm_jax.data.tokenizer import _word_pre_tokenizer, build_word_tokenizer


def ent(t, s, c, a, p=0, comp=0):
    return {"type": t, "size": s, "color": c, "angle": a, "position": p, "component": comp}


def hand_problem():
    """raven.py's worked example: type +1, size constant per row, colour red/blue/white distributed.
    The candidates switch type circle/square, size huge/giant, color blue/red; F is the answer."""
    context = [(0, 3, 3, 5), (1, 3, 6, 3), (2, 3, 0, 0), (1, 1, 6, 7), (2, 1, 0, 2), (3, 1, 3, 1),
               (2, 4, 0, 4), (3, 4, 3, 6)]
    cands = [(1, 5, 3), (4, 5, 6), (1, 4, 6), (4, 4, 3), (1, 5, 6), (4, 4, 6), (1, 4, 3), (4, 5, 3)]
    return {"configuration": "center_single",
            "rules": [{"type": {"name": "Progression", "value": 1}, "size": {"name": "Constant", "value": 0},
                       "color": {"name": "Distribute_Three", "value": 0}}],
            "panels": [{"entities": [ent(*x)]} for x in context],
            "candidates": [{"entities": [ent(*x, a)]} for a, x in enumerate(cands)],
            "target": 5}


TEXT_LINES = """\
Panel 1: a large red triangle rotated at 90 degrees.
Panel 2: a large blue square rotated at 0 degrees.
Panel 3: a large white pentagon rotated at -135 degrees.
Panel 4: a small blue square rotated at 180 degrees.
Panel 5: a small white pentagon rotated at -45 degrees.
Panel 6: a small red hexagon rotated at -90 degrees.
Panel 7: a huge white pentagon rotated at 45 degrees.
Panel 8: a huge red hexagon rotated at 135 degrees.
A: a giant red square rotated at -135 degrees.
B: a giant blue circle rotated at -90 degrees.
C: a huge blue square rotated at -45 degrees.
D: a huge red circle rotated at 0 degrees.
E: a giant blue square rotated at 45 degrees.
F: a huge blue circle rotated at 90 degrees.
G: a huge red square rotated at 135 degrees.
H: a giant red circle rotated at 180 degrees.
The answer is"""
SYMBOLIC_LINES = """\
Panel 1: (0, 3, 3, 5)
Panel 2: (1, 3, 6, 3)
Panel 3: (2, 3, 0, 0)
Panel 4: (1, 1, 6, 7)
Panel 5: (2, 1, 0, 2)
Panel 6: (3, 1, 3, 1)
Panel 7: (2, 4, 0, 4)
Panel 8: (3, 4, 3, 6)
A: (1, 5, 3, 0)
B: (4, 5, 6, 1)
C: (1, 4, 6, 2)
D: (4, 4, 3, 3)
E: (1, 5, 6, 4)
F: (4, 4, 6, 5)
G: (1, 4, 3, 6)
H: (4, 5, 3, 7)
Answer:"""
COMPACT_TEXT = """\
large red triangle 90 | large blue square 0 | large white pentagon -135 |
small blue square 180 | small white pentagon -45 | small red hexagon -90 |
huge white pentagon 45 | huge red hexagon 135 |
A giant red square -135 | B giant blue circle -90 | C huge blue square -45 | D huge red circle 0 | \
E giant blue square 45 | F huge blue circle 90 | G huge red square 135 | H giant red circle 180 |
answer:"""
COMPACT_SYMBOLIC = """\
t0 s3 c3 a5 | t1 s3 c6 a3 | t2 s3 c0 a0 |
t1 s1 c6 a7 | t2 s1 c0 a2 | t3 s1 c3 a1 |
t2 s4 c0 a4 | t3 s4 c3 a6 |
A t1 s5 c3 a0 | B t4 s5 c6 a1 | C t1 s4 c6 a2 | D t4 s4 c3 a3 | E t1 s5 c6 a4 | F t4 s4 c6 a5 | \
G t1 s4 c3 a6 | H t4 s5 c3 a7 |
answer:"""


def test_hand_problem_is_consistent():
    assert disagreements(hand_problem()) == []


@pytest.mark.parametrize("style,form,prompt", [
    ("text", "full", INSTRUCTIONS["text"] + "\n" + TEXT_LINES),
    ("symbolic", "full", INSTRUCTIONS["symbolic"] + "\n" + SYMBOLIC_LINES),
    ("text", "compact", COMPACT_TEXT),
    ("symbolic", "compact", COMPACT_SYMBOLIC),
])
def test_exact_renderings(style, form, prompt):
    assert render_problem(hand_problem(), style, form) == Example(prompt, " F", DOMAINS.index(style), -1, 5)


def test_panels_of_other_configurations():
    four = {"entities": [ent(1, 2, 3, 4, p=0), ent(1, 2, 3, 5, p=3)]}
    assert render_panel(four, "distribute_four", "text") == \
        "a medium red square rotated at 45 degrees at top left, " \
        "a medium red square rotated at 90 degrees at bottom right"
    assert render_panel(four, "distribute_four", "text", "compact") == \
        "top left medium red square 45 bottom right medium red square 90"
    assert render_panel(four, "distribute_four", "symbolic") == "(0, 1, 2, 3, 4), (3, 1, 2, 3, 5)"
    assert render_panel(four, "distribute_four", "symbolic", "compact") == "p0 t1 s2 c3 a4 p3 t1 s2 c3 a5"
    inout, config = {"entities": [ent(4, 5, 0, 3), ent(0, 0, 9, 7, comp=1)]}, CONFIGURATIONS[2]
    assert render_panel(inout, config, "text") == \
        "an outer giant white circle rotated at 0 degrees, " \
        "an inner tiny black triangle rotated at 180 degrees"
    assert render_panel(inout, config, "text", "compact") == \
        "outer giant white circle 0 inner tiny black triangle 180"
    assert render_panel(inout, config, "symbolic") == "(4, 5, 0, 3), (0, 0, 9, 7)"
    assert render_panel(inout, config, "symbolic", "compact") == "t4 s5 c0 a3 t0 s0 c9 a7"


def test_bad_style_and_form():
    with pytest.raises(ValueError, match="style"):
        render_problem(hand_problem(), "image")
    with pytest.raises(ValueError, match="form"):
        render_problem(hand_problem(), "text", "tiny")


@pytest.fixture(scope="module")
def generated():
    return {c: generate_problems(c, "val", 200, seed=1) for c in CONFIGURATIONS}


def test_whitespace_rule_and_vocabulary(generated):
    vocab = vocabulary_words()
    assert vocab == sorted(set(vocab))
    pre = _word_pre_tokenizer()
    tk = build_word_tokenizer(vocab)
    unk = tk.token_to_id("<unk>")
    for config, problems in generated.items():
        for p in problems:
            for style in DOMAINS:
                for form in FORMS:
                    ex = render_problem(p, style, form)
                    assert not ex.prompt[-1].isspace() and ex.answer == " " + "ABCDEFGH"[p["target"]]
                    words = [w for w, _ in pre.pre_tokenize_str(ex.prompt + ex.answer)]
                    assert set(words) <= set(vocab), (config, style, form, set(words) - set(vocab))
                    assert unk not in tk.encode(ex.prompt + ex.answer)
                    if form == "compact":
                        assert ex.prompt.count("\n") == 4 and ex.prompt.count("|") == 16


def test_reference_predictors(generated):
    train = generate_problems("center_single", "train", 600, seed=2)
    refs = fit_reference(train)
    assert set(refs) == {"majority", "best_attribute"}
    for config, problems in generated.items():
        scores = {k: score_reference(f, problems)["all"] for k, f in refs.items()}
        assert 0.04 <= scores["majority"] <= 0.22, (config, scores)
        assert scores["best_attribute"] <= 0.35, (config, scores)   # balanced: ~1/4, not ~1
    # on the hand problem each single attribute keeps 4 candidates; the first one is picked
    by_hand = fit_reference([hand_problem()] * 3)
    assert by_hand["majority"](hand_problem()) == 5
    assert by_hand["best_attribute"](hand_problem()) in (1, 2)     # type circle -> B, size huge -> C
    shifted = copy.deepcopy(hand_problem())
    shifted["candidates"] = shifted["candidates"][1:] + shifted["candidates"][:1]
    shifted["target"] = 4
    assert score_reference(by_hand["majority"], [hand_problem(), shifted]) == {"all": 0.5}
