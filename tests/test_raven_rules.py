"""RAVEN row rules on hand-made rows: each rule accepts its rows and rejects a violating one."""
import random

import pytest

from iclm_jax.data.raven import CONFIGURATIONS
from iclm_jax.data.raven_rules import (
    Rule,
    Space,
    grid_rows,
    misleading_rules,
    predict,
    rows_satisfy,
    rule_instances,
    sample_rows,
    solver_attributes,
    space,
)

C, P, A, D3 = "Constant", "Progression", "Arithmetic", "Distribute_Three"
SIZE = Space("size", tuple(range(6)))
COLOR = Space("color", tuple(range(10)))


@pytest.mark.parametrize("rule,attribute,good,bad", [
    (Rule(C), "size", [(2, 2, 2), (4, 4, 4)], [(2, 2, 2), (4, 4, 5)]),
    (Rule(P, 1), "type", [(0, 1, 2), (2, 3, 4)], [(0, 1, 2), (2, 3, 3)]),
    (Rule(P, 2), "type", [(0, 2, 4)], [(0, 2, 3)]),
    (Rule(P, -1), "size", [(5, 4, 3), (2, 1, 0)], [(0, 1, 2)]),
    (Rule(P, -2), "color", [(9, 7, 5), (4, 2, 0)], [(9, 7, 6)]),
    (Rule(A, 1), "color", [(1, 2, 3), (4, 5, 9)], [(1, 2, 4)]),
    (Rule(A, 1), "size", [(1, 1, 2)], [(3, 0, 3)]),            # adding code 0 is a copy, not arithmetic
    (Rule(A, -1), "size", [(5, 2, 3), (4, 4, 0)], [(5, 2, 4)]),
    (Rule(A, -1), "color", [(9, 1, 8)], [(1, 2, 0)]),
    (Rule(D3), "color", [(0, 1, 2), (1, 2, 0), (2, 0, 1)], [(0, 1, 2), (1, 2, 0), (2, 1, 0)]),
    (Rule(D3), "type", [(4, 0, 2), (2, 4, 0)], [(4, 0, 2), (2, 4, 1)]),  # rows hold other values
    (Rule(D3), "size", [(3, 1, 5)], [(3, 3, 5)]),
    # distribute_four: number (entity counts 1-4) and position (4-bit masks of the 2x2 cells)
    (Rule(C), "number", [(2, 2, 2), (4, 4, 4)], [(2, 2, 3)]),
    (Rule(P, -1), "number", [(4, 3, 2)], [(4, 3, 3)]),
    (Rule(A, 1), "number", [(1, 2, 3), (2, 2, 4)], [(1, 2, 4)]),
    (Rule(A, -1), "number", [(4, 1, 3), (3, 2, 1)], [(4, 2, 3)]),
    (Rule(D3), "number", [(1, 3, 4), (4, 1, 3), (3, 4, 1)], [(1, 3, 4), (3, 4, 1), (3, 1, 4)]),
    (Rule(C), "position", [(0b0101, 0b0101, 0b0101)], [(0b0101, 0b0101, 0b0100)]),
    (Rule(A, 1), "position", [(0b0001, 0b0010, 0b0011), (0b0011, 0b0110, 0b0111)],
     [(0b0011, 0b0001, 0b0011)]),                                  # union must add a cell
    (Rule(A, -1), "position", [(0b0111, 0b0010, 0b0101), (0b1111, 0b0001, 0b1110)],
     [(0b0001, 0b0010, 0b0001)]),                                  # difference must remove one
    (Rule(A, -1), "position", [(0b0011, 0b0010, 0b0001)], [(0b0011, 0b0011, 0b0000)]),  # none left
    (Rule(D3), "position", [(1, 6, 8), (6, 8, 1), (8, 1, 6)], [(1, 6, 8), (6, 8, 1), (8, 6, 1)]),
])
def test_rule_accepts_and_rejects(rule, attribute, good, bad):
    assert rows_satisfy(rule, attribute, good)
    assert not rows_satisfy(rule, attribute, bad)


def test_predict_third_value():
    assert predict(Rule(P, 1), SIZE, [(0, 1, 2), (2, 3, 4)], (3, 4)) == 5
    assert predict(Rule(P, 2), SIZE, [(0, 2, 4)], (2, 4)) is None       # 6 is out of range
    assert predict(Rule(A, 1), COLOR, [(1, 2, 3)], (4, 5)) == 9
    assert predict(Rule(A, -1), COLOR, [(9, 1, 8)], (7, 3)) == 4
    assert predict(Rule(C), COLOR, [(1, 1, 1)], (6, 6)) == 6
    assert predict(Rule(D3), COLOR, [(7, 1, 4), (1, 4, 7)], (4, 7)) == 1
    assert predict(Rule(D3), COLOR, [(7, 1, 4), (1, 4, 7)], (1, 7)) is None   # column 1 repeats
    pos = Space("position", tuple(range(1, 16)))
    assert predict(Rule(A, 1), pos, [(1, 2, 3)], (0b0100, 0b1000)) == 0b1100
    assert predict(Rule(A, -1), pos, [(3, 1, 2)], (0b1110, 0b0110)) == 0b1000


def test_rule_instances_respect_attributes_and_ranges():
    def names(config, component, attribute):
        return {(r.name, r.value) for r in rule_instances(space(config, component, attribute))}

    assert not any(n == A for n, _ in names("center_single", 0, "type"))          # no arithmetic on type
    assert names("center_single", 0, "type") >= {(P, 2), (P, -2), (D3, 0), (C, 0)}
    assert names("center_single", 0, "size") >= {(A, 1), (A, -1), (P, 2)}
    outer = names(CONFIGURATIONS[2], 0, "size")                                   # large..giant only
    assert outer == {(C, 0), (P, 1), (P, -1), (D3, 0)}
    assert (A, 1) in names(CONFIGURATIONS[2], 1, "size")                          # tiny..medium: 0+1=1
    assert not any(n == P for n, _ in names("distribute_four", 0, "position"))
    assert (P, 2) not in names("distribute_four", 0, "number")                    # counts 1..4


def test_sampled_rows_satisfy_their_rule():
    rng = random.Random(0)
    for config in CONFIGURATIONS:
        for c, attr in solver_attributes(config):
            sp = space(config, c, attr)
            for rule in rule_instances(sp):
                for _ in range(20):
                    rows = sample_rows(rng, rule, sp)
                    assert rows_satisfy(rule, attr, rows), (config, attr, rule, rows)
                    assert all(v in sp.values for row in rows for v in row)


def d4_panel(*cells, t=0, s=2, c=1):
    return {"entities": [{"type": t, "size": s, "color": c, "angle": 0, "position": p, "component": 0}
                         for p in cells]}


def test_number_and_position_rows_of_distribute_four_panels():
    # counts 1,2,3 / 2,1,3 / 1,1,2: Number arithmetic (+); the cells are the union too
    panels = [d4_panel(0), d4_panel(1, 2), d4_panel(0, 1, 2), d4_panel(0, 3), d4_panel(1),
              d4_panel(0, 1, 3), d4_panel(2), d4_panel(3), d4_panel(2, 3)]
    assert grid_rows(panels, 0, "number") == [(1, 2, 3), (2, 1, 3), (1, 1, 2)]
    assert grid_rows(panels, 0, "position") == [(1, 6, 7), (9, 2, 11), (4, 8, 12)]
    assert rows_satisfy(Rule(A, 1), "number", grid_rows(panels, 0, "number"))
    assert rows_satisfy(Rule(A, 1), "position", grid_rows(panels, 0, "position"))
    panels[8] = d4_panel(0, 3)                                   # right count, wrong cells
    assert rows_satisfy(Rule(A, 1), "number", grid_rows(panels, 0, "number"))
    assert not rows_satisfy(Rule(A, 1), "position", grid_rows(panels, 0, "position"))


def test_misleading_rules_flags_a_second_explanation():
    def panel(size):
        ent = {"type": 0, "size": size, "color": 0, "angle": 0, "position": 0, "component": 0}
        return {"entities": [ent]}

    # size rows (1,2,3), (1,2,3): Progression +1 and Arithmetic + both fit; they disagree on (2,3,?)
    sizes = [1, 2, 3, 1, 2, 3, 2, 3, 4]
    lines = misleading_rules("center_single", [panel(s) for s in sizes])
    assert len(lines) == 1 and "size" in lines[0] and "Arithmetic +1" in lines[0] and "implies 5" in lines[0]
    sizes = [1, 2, 3, 2, 3, 4, 3, 4, 5]                        # only Progression fits rows 1-2
    assert misleading_rules("center_single", [panel(s) for s in sizes]) == []
