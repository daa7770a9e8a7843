"""RAVEN format, generator invariants (balance, uniqueness, determinism, parts), checker, CLI."""
import copy
import json
import math
import subprocess
import sys
from collections import Counter

import pytest

from iclm_jax.data.jsonl import load_jsonl
from iclm_jax.data.raven import (
    CONFIGURATIONS,
    PARTS,
    RavenFormatError,
    load_problems,
    panel_value,
    save_problems,
)
from iclm_jax.data.raven_cli import main
from iclm_jax.data.raven_generate import check_problems, disagreements, generate_problems
from iclm_jax.data.raven_render import render_problem
from iclm_jax.data.raven_rules import problem_rules
from tests.test_raven_render import hand_problem

N = 300


@pytest.fixture(scope="module")
def problems():
    return {c: generate_problems(c, "train", N, seed=0) for c in CONFIGURATIONS}


def essence(panel):
    return tuple((e["type"], e["size"], e["color"], e["position"], e["component"]) for e in panel["entities"])


def test_checker_passes_and_candidates_are_balanced(problems):
    for config, ps in problems.items():
        assert len(ps) == N and check_problems(ps) == []
        for p in ps:
            answer = p["candidates"][p["target"]]
            assert len({essence(c) for c in p["candidates"]}) == 8
            shares = [sum(panel_value(c, comp, attr) == panel_value(answer, comp, attr)
                          for c in p["candidates"]) for comp, attr, _ in problem_rules(p)]
            assert sorted(shares)[:3] == [4, 4, 4] and set(shares) <= {4, 8}, (config, shares)
        targets = Counter(p["target"] for p in ps)
        assert set(targets) == set(range(8)) and max(targets.values()) < 3 * N / 16, targets


def test_configuration_structure(problems):
    for p in problems["distribute_four"]:
        assert ("number" in p["rules"][0]) + ("position" in p["rules"][0]) == 1
        for panel in p["panels"] + p["candidates"]:
            ents = panel["entities"]
            assert 1 <= len(ents) <= 4 and len({e["position"] for e in ents}) == len(ents)
            assert all(0 <= e["position"] <= 3 and e["component"] == 0 for e in ents)
            assert len({(e["type"], e["size"], e["color"]) for e in ents}) == 1
    layouts = Counter(next(k for k in ("number", "position") if k in p["rules"][0])
                      for p in problems["distribute_four"])
    assert min(layouts.values()) > N / 4, layouts
    for p in problems[CONFIGURATIONS[2]]:
        assert len(p["rules"]) == 2
        for panel in p["panels"] + p["candidates"]:
            outer, inner = panel["entities"]
            assert (outer["component"], inner["component"]) == (0, 1) and outer["size"] > inner["size"]
    for p in problems["center_single"]:
        assert all(len(panel["entities"]) == 1 for panel in p["panels"] + p["candidates"])


def test_deterministic_and_parts_disjoint():
    a = generate_problems("distribute_four", "val", 50, seed=7)
    assert a == generate_problems("distribute_four", "val", 50, seed=7)
    assert a != generate_problems("distribute_four", "val", 50, seed=8)
    for config in CONFIGURATIONS:
        seen = {}
        for part in PARTS:
            for p in generate_problems(config, part, 200, seed=3):
                key = tuple(essence(x) for x in p["panels"] + [p["candidates"][p["target"]]])
                assert seen.setdefault(key, part) == part, (config, part, seen[key])
    with pytest.raises(ValueError, match="configuration"):
        generate_problems("left_right", "train", 1, 0)
    with pytest.raises(ValueError, match="part"):
        generate_problems("center_single", "dev", 1, 0)


def test_checker_catches_corruption(problems):
    p = copy.deepcopy(problems["center_single"][0])
    p["target"] = (p["target"] + 1) % 8
    assert any("does not hold on row 3" in line for line in disagreements(p))
    p = copy.deepcopy(problems["distribute_four"][0])
    for e in p["panels"][1]["entities"]:
        e["color"] = (e["color"] + 1) % 10
    assert any("color" in line and "rows 1-2" in line for line in disagreements(p))
    p = copy.deepcopy(hand_problem())
    p["candidates"][0] = copy.deepcopy(p["candidates"][5])      # a second answer
    assert disagreements(p) == ["candidate(s) [0] besides the target 5 complete row 3 under every rule"]


def test_round_trip(tmp_path, problems):
    ps = [p for c in CONFIGURATIONS for p in problems[c][:5]] + [hand_problem()]
    save_problems(ps, tmp_path / "x.json")
    assert load_problems(tmp_path / "x.json") == ps == json.loads((tmp_path / "x.json").read_text())


def mutate(fn):
    def apply(p):
        fn(p)
        return p
    return apply


BAD = {
    "target": (mutate(lambda p: p.update(target=8)), "target", "candidate index"),
    "missing": (mutate(lambda p: p.pop("rules")), "rules", "missing field"),
    "config": (mutate(lambda p: p.update(configuration="left_right")), "configuration", "unknown"),
    "panels": (mutate(lambda p: p["panels"].pop()), "panels", "8 panels"),
    "size": (mutate(lambda p: p["panels"][2]["entities"][0].update(size=6)), "panels[2].entities[0].size",
             "out of range"),
    "angle": (mutate(lambda p: p["candidates"][7]["entities"][0].update(angle="90")),
              "candidates[7].entities[0].angle", "integer"),
    "rule": (mutate(lambda p: p["rules"][0].update(type={"name": "Arithmetic", "value": 1})),
             "rules[0].type.name", "'Arithmetic'"),
    "value": (mutate(lambda p: p["rules"][0]["size"].update(value=3)), "rules[0].size.value", "invalid"),
    "two": (mutate(lambda p: p["panels"][0]["entities"].append(ent0(p))), "panels[0].entities",
            "exactly one"),
}


def ent0(p):
    return dict(p["panels"][0]["entities"][0])


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_problems(tmp_path, case):
    fn, field, text = BAD[case]
    path = str(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps([hand_problem(), fn(hand_problem())]))
    with pytest.raises(RavenFormatError) as err:
        load_problems(path)
    message = str(err.value)
    assert message.startswith(f"{path}: problem 1: {field}: ") and text in message, message
    with pytest.raises(RavenFormatError):
        save_problems([fn(hand_problem())], tmp_path / "out.json")


def test_structure_errors_of_other_configurations(tmp_path):
    p = generate_problems("distribute_four", "train", 1, seed=0)[0]
    p["panels"][3]["entities"] = [dict(p["panels"][3]["entities"][0], position=2),
                                  dict(p["panels"][3]["entities"][0], position=1)]
    q = generate_problems(CONFIGURATIONS[2], "train", 1, seed=0)[0]
    q["panels"][0]["entities"][0]["size"] = 1                   # outer sizes are large..giant
    for problem, field in ((p, "panels[3].entities: "), (q, "panels[0].entities[0].size: ")):
        with pytest.raises(RavenFormatError) as err:
            save_problems([problem], tmp_path / "x.json")
        assert f"problem 0: {field}" in str(err.value), str(err.value)


def test_cli(tmp_path, capsys):
    out = tmp_path / "raven" / "d4.json"
    assert main(["generate", "--configuration", "distribute_four", "--part", "test", "--n", "20",
                 "--seed", "4", "--out", str(out)]) == 0
    assert "wrote 20 distribute_four/test problems" in capsys.readouterr().out
    problems = load_problems(out)
    assert problems == generate_problems("distribute_four", "test", 20, seed=4)
    assert main(["check", str(out)]) == 0
    assert f"{out}: OK, 20 problems" in capsys.readouterr().out
    problems[3]["target"] = (problems[3]["target"] + 1) % 8
    corrupt = tmp_path / "corrupt.json"
    save_problems(problems, corrupt)
    assert main(["check", str(out), str(corrupt)]) == 1
    lines = capsys.readouterr().out
    assert f"{out}: OK" in lines and f"{corrupt}: problem 3: " in lines and "in 1 of 20 problems" in lines
    jsonl = tmp_path / "r.jsonl"
    assert main(["render", str(out), "--style", "symbolic", "--form", "compact", "--out", str(jsonl)]) == 0
    loaded = load_jsonl(str(jsonl))
    assert [(e.prompt, e.answer, e.domain) for e in loaded] == \
        [(x.prompt, x.answer, x.domain)
         for x in (render_problem(p, "symbolic", "compact") for p in load_problems(out))]
    capsys.readouterr()

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([hand_problem(), dict(hand_problem(), target=-1)]))
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {bad}: problem 1: target: ")
    assert main(["stats", str(tmp_path / "missing.json")]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_module_entry_point(tmp_path):
    path = tmp_path / "h.json"
    save_problems([hand_problem()] * 2, path)
    r = subprocess.run([sys.executable, "-m", "iclm_jax.data.raven", "stats", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "configuration: center_single (2)" in r.stdout and "F=2" in r.stdout
    assert "0.type" in r.stdout and "2 problems" in r.stdout


def test_candidates_alone_do_not_reveal_the_answer():
    """A context-blind naive Bayes over candidate attribute values (fitted on training problems) stays
    near chance: alternatives are drawn like answers, so value priors carry no signal."""
    train = generate_problems("center_single", "train", 1500, seed=9)
    test = generate_problems("center_single", "test", 600, seed=9)
    attrs = [(0, "type"), (0, "size"), (0, "color")]
    counts = Counter((ca, panel_value(cand, *ca), k == p["target"])
                     for p in train for k, cand in enumerate(p["candidates"]) for ca in attrs)

    def score(cand):
        return sum(math.log((counts[(ca, panel_value(cand, *ca), True)] + 1)
                            / (counts[(ca, panel_value(cand, *ca), False)] + 7)) for ca in attrs)

    hits = sum(max(range(8), key=lambda k: score(p["candidates"][k])) == p["target"] for p in test)
    assert hits / len(test) < 0.2, hits / len(test)
