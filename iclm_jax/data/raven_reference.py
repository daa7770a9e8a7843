"""Reference predictors on RAVEN problems: what shortcuts alone achieve (as ``reference`` for ACRE).

* ``majority`` — always the most frequent training target letter (about 1/8: targets are uniform).
* ``best_attribute`` — reasons about one attribute only: the first candidate whose value of that
  attribute completes row 3 under the problem's rule for it (ties -> lowest letter; an attribute the
  problem does not govern -> the majority letter). The attribute, a (component, attribute) pair, is
  the one scoring best on the training problems. With balanced candidates (``raven_generate``) half of
  the candidates fit any one attribute, so it stays far below 100% (about 1/4 when the attribute is
  one of the three that tell candidates apart, 1/8 otherwise).
A model near ``best_attribute`` has learned one attribute's rule, not the whole problem.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

from iclm_jax.data.raven_rules import Rule, grid_rows, predict, space

Predictor = Callable[[dict], int]


def _attribute_guess(problem: dict, component: int, attribute: str) -> int | None:
    """Index of the first candidate completing ``attribute``'s rule, or None (not governed / no fit)."""
    rules = problem["rules"]
    if component >= len(rules) or attribute not in rules[component]:
        return None
    rule = Rule.from_dict(rules[component][attribute])
    sp = space(problem["configuration"], component, attribute)
    rows = grid_rows(problem["panels"] + [problem["candidates"][0]], component, attribute)
    want = predict(rule, sp, rows[:2], rows[2][:2])
    for k, cand in enumerate(problem["candidates"]):
        if grid_rows(problem["panels"] + [cand], component, attribute)[2][2] == want:
            return k
    return None


def fit_reference(train_problems: Iterable[dict]) -> dict[str, Predictor]:
    """``{"majority": f, "best_attribute": g}``, each mapping a problem to a candidate index."""
    train = list(train_problems)
    targets = Counter(p["target"] for p in train)
    majority = min(targets, key=lambda t: (-targets[t], t)) if targets else 0
    attributes = sorted({(c, a) for p in train for c, comp in enumerate(p["rules"]) for a in comp})

    def by(component: int, attribute: str) -> Predictor:
        def guess(problem: dict) -> int:
            k = _attribute_guess(problem, component, attribute)
            return majority if k is None else k
        return guess

    hits = {ca: sum(by(*ca)(p) == p["target"] for p in train) for ca in attributes}
    best = max(attributes, key=hits.__getitem__) if attributes else (0, "type")   # ties: first sorted
    best_attribute = by(*best)
    best_attribute.attribute = best     # which (component, attribute) was picked, for reports
    return {"majority": lambda problem: majority, "best_attribute": best_attribute}


def score_reference(predict_fn: Predictor, problems: Iterable[dict]) -> dict[str, float]:
    """Accuracy over ``problems`` (``{"all": ...}``; empty if there are none)."""
    hits = [int(predict_fn(p) == p["target"]) for p in problems]
    return {"all": sum(hits) / len(hits)} if hits else {}
