"""The RAVEN row rules: what each rule means, which rows satisfy it, and sampling rows that do.

A rule governs one attribute of one component over the three rows of the grid; each row is a triple
of codes (left, middle, right). Rules (``Rule(name, value)``; ``value`` is the rule's parameter):

* ``Constant`` (value 0): a == b == c within each row (rows may differ from each other).
* ``Progression`` (value +-1, +-2): b - a == c - b == value.
* ``Arithmetic`` (value +1 add, -1 subtract): on codes c == a + b or c == a - b, with b >= 1 (adding
  code 0 would only copy the first panel). On ``position`` (4-bit masks of occupied cells) set union
  c == a | b or difference c == a & ~b, kept non-trivial: a union adds a cell a lacks, a difference
  removes a cell of a and leaves at least one. Never on ``type``.
* ``Distribute_Three`` (value 0): three distinct values, each row a permutation of them and each
  column too (a Latin square, as RAVEN's shifted rows).

Constant, Progression and Arithmetic hold row by row; Distribute_Three ties the rows together. Every
rule fixes the third value of a row given its first two (and, for Distribute_Three, the rows above),
which is what ``predict`` computes and what makes a candidate that differs from the answer on a
rule-governed attribute wrong.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Sequence

from iclm_jax.data.raven import (
    ATTRIBUTE_RULES,
    CONFIGURATIONS,
    LAYOUT,
    RULE_VALUES,
    SHARED,
    attribute_values,
    num_components,
    panel_value,
)

Row = tuple[int, int, int]


@dataclass(frozen=True)
class Rule:
    name: str
    value: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> Rule:
        return cls(d["name"], d["value"])

    def as_dict(self) -> dict:
        return {"name": self.name, "value": self.value}


@dataclass(frozen=True)
class Space:
    """The codes one attribute of one component may take in a configuration."""
    attribute: str
    values: tuple[int, ...]


def space(configuration: str, component: int, attribute: str) -> Space:
    return Space(attribute, attribute_values(configuration, component, attribute))


def row_holds(rule: Rule, attribute: str, row: Sequence[int]) -> bool:
    """Whether one row satisfies ``rule`` (for Distribute_Three: only that its values are distinct)."""
    a, b, c = row
    if rule.name == "Constant":
        return a == b == c
    if rule.name == "Progression":
        return b - a == rule.value and c - b == rule.value
    if rule.name == "Arithmetic":
        if attribute == "position":
            if rule.value > 0:
                return c == a | b and bool(b & ~a)
            return c == a & ~b and bool(a & b) and c != 0
        return b >= 1 and c == (a + b if rule.value > 0 else a - b)
    if rule.name == "Distribute_Three":
        return len({a, b, c}) == 3
    raise ValueError(f"unknown rule {rule.name!r}")


def rows_satisfy(rule: Rule, attribute: str, rows: Sequence[Sequence[int]]) -> bool:
    """Whether the given rows (1-3 of them, top down) all satisfy ``rule``."""
    if not all(row_holds(rule, attribute, row) for row in rows):
        return False
    if rule.name == "Distribute_Three":
        if len({frozenset(row) for row in rows}) != 1:
            return False
        return all(len({row[k] for row in rows}) == len(rows) for k in range(3))
    return True


def predict(rule: Rule, sp: Space, rows12: Sequence[Sequence[int]], first_two: Sequence[int]) -> int | None:
    """The third value of row 3 that ``rule`` implies (None if no value of the space completes it)."""
    a, b = first_two
    fits = [v for v in sp.values if rows_satisfy(rule, sp.attribute, list(rows12) + [(a, b, v)])]
    return fits[0] if len(fits) == 1 else None


@functools.lru_cache(maxsize=None)
def feasible_rows(rule: Rule, sp: Space) -> tuple[Row, ...]:
    """Every row of ``sp`` values satisfying ``rule`` on its own."""
    vals = sp.values
    rows = ((a, b, c) for a in vals for b in vals for c in vals)
    return tuple(row for row in rows if row_holds(rule, sp.attribute, row))


@functools.lru_cache(maxsize=None)
def rule_instances(sp: Space) -> tuple[Rule, ...]:
    """The rules ``sp``'s attribute admits that some rows of its range satisfy."""
    out = []
    for name in ATTRIBUTE_RULES[sp.attribute]:
        for value in RULE_VALUES[name]:
            rule = Rule(name, value)
            if (len(sp.values) >= 3) if name == "Distribute_Three" else feasible_rows(rule, sp):
                out.append(rule)
    return tuple(out)


def sample_rule(rng: random.Random, sp: Space) -> Rule:
    """A rule name uniformly among the feasible ones, then its parameter uniformly."""
    rules = rule_instances(sp)
    name = rng.choice(sorted({r.name for r in rules}, key=list(ATTRIBUTE_RULES[sp.attribute]).index))
    return rng.choice([r for r in rules if r.name == name])


def sample_rows(rng: random.Random, rule: Rule, sp: Space) -> list[Row]:
    """Three rows satisfying ``rule``: independent rows, or a random 3x3 Latin square."""
    if rule.name == "Distribute_Three":
        vals, shift = rng.sample(sp.values, 3), rng.choice((1, 2))
        return [tuple(vals[(r * shift + k) % 3] for k in range(3)) for r in range(3)]
    return [rng.choice(feasible_rows(rule, sp)) for _ in range(3)]


# ---------------------------------------------------------------- rules of a problem


def solver_attributes(configuration: str) -> list[tuple[int, str]]:
    """(component, attribute) pairs a solver can read off the panels: distribute_four has both
    ``number`` and ``position`` (one of them rule-governed, the other noise or implied)."""
    if configuration not in CONFIGURATIONS:
        raise ValueError(f"unknown configuration {configuration!r}; expected one of {CONFIGURATIONS}")
    layout = LAYOUT if configuration == "distribute_four" else ()
    return [(c, a) for c in range(num_components(configuration)) for a in layout + SHARED]


def problem_rules(problem: dict) -> list[tuple[int, str, Rule]]:
    """The stored (component, attribute, rule) triples of a validated problem."""
    return [(c, attr, Rule.from_dict(rule)) for c, comp in enumerate(problem["rules"])
            for attr, rule in comp.items()]


def grid_rows(panels9: Sequence[dict], component: int, attribute: str) -> list[Row]:
    """The three rows of one attribute over nine panels (the 8 contexts and one candidate)."""
    vals = [panel_value(p, component, attribute) for p in panels9]
    return [tuple(vals[3 * r:3 * r + 3]) for r in range(3)]


def misleading_rules(configuration: str, panels9: Sequence[dict]) -> list[str]:
    """Rules other than the stored ones that also fit rows 1-2 but imply another value for panel 9.

    For every attribute a solver can read (``solver_attributes``) and every rule it admits: if rows 1
    and 2 satisfy the rule and it predicts a different third value of row 3 than the ninth panel
    holds, the context does not single out the answer's rule; the generator redraws such problems.
    """
    out = []
    for c, attr in solver_attributes(configuration):
        sp = space(configuration, c, attr)
        rows = grid_rows(panels9, c, attr)
        for rule in rule_instances(sp):
            if rows_satisfy(rule, attr, rows[:2]):
                v = predict(rule, sp, rows[:2], rows[2][:2])
                if v is not None and v != rows[2][2]:
                    out.append(f"component {c} {attr}: rows 1-2 also fit {rule.name} {rule.value:+d}, "
                               f"which implies {v}, not {rows[2][2]}")
    return out
