"""The RAVEN problem generator and its checker (format: ``raven``; rules: ``raven_rules``).

A problem draws, per component and rule-governed attribute, a rule the attribute's range admits
(uniform over rule names, then over parameters), three rows satisfying it, and angles as noise.
distribute_four governs ``number`` or ``position`` (half each); under a number rule the occupied
cells are drawn at random. A context whose rows 1-2 also fit another rule that implies a different
ninth panel (``raven_rules.misleading_rules``) is redrawn, so the context determines the answer.

Candidates, I-RAVEN style (attribute bisection tree): three of the rule-governed attributes are
drawn (center_single has exactly three; distribute_four four; in_center six, so there are always
three levels and no duplicate candidates) and each gets one alternative value. The 8 candidates are
the answer with every subset of the three attributes switched to its alternative: 8 distinct
panels, and for each switched attribute exactly 4 of 8 candidates hold the answer's value. The
original RAVEN's distractors each change one attribute of the answer, so the answer is the
per-attribute majority of the candidates and can be picked without the context; here every value is
held by half of them, so the candidates alone say nothing. An alternative is drawn the way answers
are (the ninth value of fresh rows under a fresh rule), so value priors (an Arithmetic "+" answer
tends to be large) do not single out the answer either. When ``number`` switches, the alternative
count gets its own random cells. Every candidate's angles are fresh noise. Candidates are shuffled;
``target`` is uniform over 0..7.

Parts: a problem belongs to part ``PARTS[h % 3]`` with ``h`` the SHA-256 of its context and answer
without angles; a draw falling in another part is discarded. So no problem (up to angle noise and
distractors) is in two parts, whatever the seeds, and each part is its own seeded stream
(``random.Random`` of ``"raven/<configuration>/<part>/<seed>"``): same arguments, same problems.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
from typing import Sequence

from iclm_jax.data.raven import (
    ANGLES,
    CONFIGURATIONS,
    LAYOUT,
    NUM_CANDIDATES,
    PARTS,
    SHARED,
    Problem,
    num_components,
    validate_problems,
)
from iclm_jax.data.raven_rules import (
    grid_rows,
    misleading_rules,
    problem_rules,
    rows_satisfy,
    sample_rows,
    sample_rule,
    space,
)

NUM_SWITCHED = 3   # attributes of the bisection tree: 2**3 = 8 candidates


def _check_args(configuration: str, part: str) -> None:
    if configuration not in CONFIGURATIONS:
        raise ValueError(f"unknown configuration {configuration!r}; expected one of {CONFIGURATIONS}")
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")


def _cells(mask: int) -> tuple[int, ...]:
    return tuple(p for p in range(4) if mask >> p & 1)


def _panel(rng: random.Random, spec: list[dict]) -> dict:
    """A panel from per-component {type, size, color, positions}; angles drawn as noise."""
    return {"entities": [{"type": comp["type"], "size": comp["size"], "color": comp["color"],
                          "angle": rng.randrange(len(ANGLES)), "position": p, "component": c}
                         for c, comp in enumerate(spec) for p in comp["positions"]]}


def _set_value(rng: random.Random, comp: dict, attr: str, value: int) -> None:
    if attr == "number":
        comp["positions"] = tuple(sorted(rng.sample(range(4), value)))
    elif attr == "position":
        comp["positions"] = _cells(value)
    else:
        comp[attr] = value


def _context(rng: random.Random, configuration: str) -> tuple[list[dict], list[list[dict]]]:
    """Rules per component and the 9 panel specs (the ninth is the answer)."""
    rules, specs = [], [[{"positions": (0,)} for _ in range(num_components(configuration))] for _ in range(9)]
    for c in range(num_components(configuration)):
        layout = (rng.choice(LAYOUT),) if configuration == "distribute_four" else ()
        comp_rules = {}
        for attr in SHARED + layout:
            sp = space(configuration, c, attr)
            rule = sample_rule(rng, sp)
            comp_rules[attr] = rule.as_dict()
            values = [v for row in sample_rows(rng, rule, sp) for v in row]
            for spec, v in zip(specs, values):
                _set_value(rng, spec[c], attr, v)
        rules.append(comp_rules)
    return rules, specs


def _alternative(rng: random.Random, sp, current: int) -> int:
    """Another value drawn as answers are (the ninth value of fresh rows of a fresh rule), so that an
    alternative's value is no more or less typical of answers than the answer's own."""
    while True:
        value = sample_rows(rng, sample_rule(rng, sp), sp)[2][2]
        if value != current:
            return value


def _candidates(rng: random.Random, configuration: str, rules: list[dict],
                answer: list[dict]) -> tuple[list[dict], int]:
    governed = [(c, attr) for c, comp in enumerate(rules) for attr in comp]
    switched = rng.sample(governed, NUM_SWITCHED)
    alternatives = []
    for c, attr in switched:
        current = {"number": len(answer[c]["positions"]),
                   "position": sum(1 << p for p in answer[c]["positions"])}.get(attr, answer[c].get(attr))
        alt = _alternative(rng, space(configuration, c, attr), current)
        comp = dict(answer[c])
        _set_value(rng, comp, attr, alt)
        alternatives.append((c, attr, comp["positions"] if attr in LAYOUT else alt))
    panels = []
    for bits in itertools.product((0, 1), repeat=NUM_SWITCHED):
        spec = [dict(comp) for comp in answer]
        for bit, (c, attr, alt) in zip(bits, alternatives):
            if bit:
                spec[c]["positions" if attr in LAYOUT else attr] = alt
        panels.append(_panel(rng, spec))
    order = list(range(NUM_CANDIDATES))
    rng.shuffle(order)
    return [panels[k] for k in order], order.index(0)


def _part_of(configuration: str, panels9: Sequence[dict]) -> str:
    key = [configuration] + [[[e[f] for f in ("type", "size", "color", "position", "component")]
                              for e in p["entities"]] for p in panels9]
    digest = hashlib.sha256(json.dumps(key).encode()).digest()
    return PARTS[int.from_bytes(digest[:8], "big") % len(PARTS)]


def _problem(rng: random.Random, configuration: str, part: str) -> Problem:
    while True:
        rules, specs = _context(rng, configuration)
        panels9 = [_panel(rng, spec) for spec in specs]
        if _part_of(configuration, panels9) == part and not misleading_rules(configuration, panels9):
            break
    candidates, target = _candidates(rng, configuration, rules, specs[8])
    return {"configuration": configuration, "rules": rules, "panels": panels9[:8],
            "candidates": candidates, "target": target}


def generate_problems(configuration: str, part: str, n: int, seed: int) -> list[Problem]:
    """``n`` problems of ``configuration``/``part``: the same for the same arguments on any machine."""
    _check_args(configuration, part)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"raven/{configuration}/{part}/{seed}")
    problems = [_problem(rng, configuration, part) for _ in range(n)]
    for p in problems:
        assert not disagreements(p), disagreements(p)
    if problems:
        validate_problems(problems, f"<generated {configuration}/{part}>")
    return problems


# ---------------------------------------------------------------- the checker


def disagreements(problem: Problem) -> list[str]:
    """Every way a validated problem breaks its rules, one line each (empty = OK).

    Checked: each stored rule holds on rows 1-2 and on row 3 completed by the target candidate; no
    other candidate completes row 3 consistently with every rule (the answer is unique); and no other
    rule fitting rows 1-2 implies a different ninth panel (``raven_rules.misleading_rules``).
    """
    config, contexts = problem["configuration"], problem["panels"]
    cands, target = problem["candidates"], problem["target"]
    rules = problem_rules(problem)
    out = []

    def completes(cand: dict) -> bool:
        return all(rows_satisfy(rule, attr, grid_rows(contexts + [cand], c, attr)) for c, attr, rule in rules)

    for c, attr, rule in rules:
        rows = grid_rows(contexts + [cands[target]], c, attr)
        what = f"component {c} {attr} {rule.name} {rule.value:+d}"
        if not rows_satisfy(rule, attr, rows[:2]):
            out.append(f"{what} does not hold on rows 1-2 {rows[:2]}")
        elif not rows_satisfy(rule, attr, rows):
            out.append(f"{what} does not hold on row 3 {rows[2]} completed by the target {target}")
    others = [k for k in range(len(cands)) if k != target and completes(cands[k])]
    if others:
        out.append(f"candidate(s) {others} besides the target {target} complete row 3 under every rule")
    if not out:
        out += misleading_rules(config, contexts + [cands[target]])
    return out


def check_problems(problems: Sequence[Problem]) -> list[str]:
    """``disagreements`` of every problem, as ``problem i: ...`` lines."""
    return [f"problem {i}: {line}" for i, p in enumerate(problems) for line in disagreements(p)]
