"""The ACRE problem generator: our own code following the recipe of the original (WellyZhang/ACRE).

A problem draws 2-4 *potential* blickets and 3-5 non-blickets from the split's objects. The first
potential blicket A and the first non-blicket B give three habituation panels A+, B-, AB+. Then one
evidence trial (panel order shuffled within each trial):

* ``OnOffOff``: one "on" panel holding the other potential blickets plus non-blicket noise, and two
  "off" panels that together cover the other non-blickets (3 "on" contexts in all);
* ``OnOnOff``: two "on" panels covering the other potential blickets, each with noise, and one
  "off" panel of the other non-blickets (4 "on" contexts in all).

Queries 7-8 ("cause") are single objects chosen by type quota; queries 9-10 ("intervention") are the
objects of one "off" context (index in ``ref``) plus a candidate object or a minimal "set blicket"
(the unexplained objects of an "on" panel). Types come from how each object appears in the contexts;
every label is re-derived by ``acre.derive_label`` and must fit its type.

The draw sizes and quotas, including the original's per-split screen-off cap (its "magic numbers" to
balance the query types), reproduce the release's type mix: about 37% direct, 12% indirect,
27% potential and 24% screen_off in the test parts.
"""
from __future__ import annotations

import random
from typing import Sequence

from iclm_jax.data.acre import (
    NUM_CONTEXTS,
    TYPE_LABELS,
    Problem,
    _check_split,
    derive_label,
    split_objects,
    validate_problems,
)

# (min, max) potential blickets and (min, max) non-blickets per evidence trial, as the original.
TRIALS = {"OnOffOff": ((2, 3), (3, 5)), "OnOnOff": ((2, 4), (3, 4))}


def trial_kinds(split: str, part: str, n: int) -> list[str]:
    """Evidence trial of each of ``n`` problems (before the final shuffle)."""
    if split == "Sys":
        return ["OnOffOff" if part == "train" else "OnOnOff"] * n
    return ["OnOffOff"] * (n // 2) + ["OnOnOff"] * (n - n // 2)


def _screen_off_slack(split: str, part: str) -> int:
    """How many screen-off objects are withheld from the cause-query quota (the original's)."""
    if split == "Comp":
        return 2
    return 3 if (split, part) == ("Sys", "train") else 1


def generate_problems(split: str, part: str, n: int, seed: int) -> list[Problem]:
    """``n`` problems of ``split``/``part``, the same for the same arguments on any machine."""
    _check_split(split, part)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # A string seed is hashed with SHA-512 by `random`, so parts and splits get unrelated streams.
    rng = random.Random(f"acre/{split}/{part}/{seed}")
    objects = list(split_objects(split, part))
    slack = _screen_off_slack(split, part)
    problems = [_problem(rng, objects, kind, slack) for kind in trial_kinds(split, part, n)]
    rng.shuffle(problems)
    if problems:
        validate_problems(problems, f"<generated {split}/{part}>")
    return problems


def generate_problem(split: str, part: str, index: int, seed: int) -> Problem:
    """Problem ``index`` of an endless stream of ``split``/``part``: a pure function of its arguments.

    Each index has its own generator (a SHA-512-hashed string seed), so any problem of the stream is
    made without the ones before it, on any machine and in any process. The evidence trial is drawn
    per index in ``trial_kinds``' proportions (Sys: one kind per part; else half of each), with the
    same objects, draw sizes, quotas and label checks as ``generate_problems``. The stream differs
    from ``generate_problems``' lists (another seeding), not in distribution.
    """
    _check_split(split, part)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = random.Random(f"acre-stream/{split}/{part}/{seed}/{index}")
    kind = rng.choice(trial_kinds(split, part, 2))
    problem = _problem(rng, list(split_objects(split, part)), kind, _screen_off_slack(split, part))
    validate_problems([problem], f"<generated {split}/{part} stream, seed {seed}, problem {index}>")
    return problem


def _ctx(light: str, objects: list[int]) -> dict:
    return {"light_state": light, "objects": list(objects)}


def _cover(rng: random.Random, items: list[int]) -> tuple[list[int], list[int]]:
    """Two non-empty panels whose union is ``items``; the second may repeat some of the first."""
    first = rng.sample(items, rng.randint(1, len(items)))
    rest = [o for o in items if o not in first]
    return first, rest + rng.sample(first, rng.randint(0 if rest else 1, len(first)))


def _noise(rng: random.Random, non_blickets: list[int]) -> list[int]:
    return rng.sample(non_blickets, rng.randint(0, len(non_blickets)))


def _contexts(rng: random.Random, objects: list[int], kind: str) -> list[dict]:
    (lo_p, hi_p), (lo_n, hi_n) = TRIALS[kind]
    n_pot, n_non = rng.randint(lo_p, hi_p), rng.randint(lo_n, hi_n)
    drawn = rng.sample(objects, n_pot + n_non)
    (a, *pot), (b, *non) = drawn[:n_pot], drawn[n_pot:]
    habituation = [_ctx("on", [a]), _ctx("off", [b]), _ctx("on", [a, b])]
    if kind == "OnOffOff":
        off1, off2 = _cover(rng, non)
        evidence = [_ctx("on", pot + _noise(rng, non)), _ctx("off", off1), _ctx("off", off2)]
    else:
        on1, on2 = _cover(rng, pot)
        evidence = [_ctx("on", on1 + _noise(rng, non)), _ctx("on", on2 + _noise(rng, non)),
                    _ctx("off", non)]
    rng.shuffle(habituation)
    rng.shuffle(evidence)
    return habituation + evidence


def object_roles(contexts: list[dict]) -> tuple[dict[int, tuple[str, int]], list[tuple[int, ...]]]:
    """(query type, label) of each context object in first-seen order, and the minimal set blickets.

    direct: alone in an "on" panel, or only ever in "off" panels; screen_off: in an "off" panel
    and in an "on" one; indirect: a blicket by elimination (the one unexplained object of an "on"
    panel); potential: the rest. A set blicket is an "on" panel's unexplained objects (2+, none
    a known blicket): one of them must be a blicket, so the set as a whole lights the lamp.
    The labels follow from the types alone (direct: on iff seen alone in an "on" panel); the
    generator asserts that ``derive_label`` agrees.
    """
    on = [c["objects"] for c in contexts if c["light_state"] == "on"]
    off = {o for c in contexts if c["light_state"] == "off" for o in c["objects"]}
    in_on = {o for objs in on for o in objs}
    unexplained = [tuple(sorted(set(objs) - off)) for objs in on]
    blickets = {u[0] for u in unexplained if len(u) == 1}
    alone = {objs[0] for objs in on if len(objs) == 1}
    roles: dict[int, tuple[str, int]] = {}
    for o in (o for c in contexts for o in c["objects"]):
        if o in alone:
            roles.setdefault(o, ("direct", 2))
        elif o in off:
            roles.setdefault(o, ("screen_off", 0) if o in in_on else ("direct", 0))
        else:
            roles.setdefault(o, ("indirect", 2) if o in blickets else ("potential", 1))
    sets = {u for u in unexplained if len(u) > 1 and not blickets & set(u)}
    minimal = [u for u in sorted(sets) if not any(set(v) < set(u) for v in sets)]
    return roles, minimal


def _fixed_sum(rng: random.Random, caps: Sequence[int], total: int) -> list[int] | None:
    """Counts in [0, cap] summing to ``total`` (None if impossible), the original's sampler."""
    if sum(caps) < total:
        return None
    while True:
        counts, left = [], total
        for cap in caps[:-1]:
            counts.append(rng.randint(0, min(cap, left)))
            left -= counts[-1]
        if left <= caps[-1]:
            return counts + [left]


def _query(objects: Sequence[int], role: tuple[str, int], ref: int | None = None) -> dict:
    q = {"light_state": "no", "objects": list(objects), "label": role[1], "type": role[0]}
    if ref is not None:
        q["ref"] = ref
    return q


def _cause_queries(rng: random.Random, roles: dict[int, tuple[str, int]],
                   slack: int) -> list[dict] | None:
    pools = {t: [o for o, r in roles.items() if r[0] == t]
             for t in ("direct", "indirect", "screen_off", "potential")}
    n_pot = min(len(pools["potential"]), 1)
    caps = (len(pools["direct"]), len(pools["indirect"]), max(len(pools["screen_off"]) - slack, 0))
    counts = _fixed_sum(rng, caps, 2 - n_pot)
    if counts is None:
        return None
    queries = [_query([o], roles[o]) for t, k in zip(pools, counts + [n_pot])
               for o in rng.sample(pools[t], k)]
    rng.shuffle(queries)
    return queries


def _intervention_queries(rng: random.Random, contexts: list[dict],
                          roles: dict[int, tuple[str, int]],
                          sets: list[tuple[int, ...]]) -> list[dict]:
    ref = rng.choice([k for k, c in enumerate(contexts) if c["light_state"] == "off"])
    base = contexts[ref]["objects"]
    singles = [o for o in roles if o not in base]
    # Potential objects are listed twice (the original's weighting); a pick can therefore repeat.
    options = [(o,) for o in singles] + sets + [(o,) for o in singles if roles[o][0] == "potential"]
    queries = [_query(base + list(c), ("indirect", 2) if len(c) > 1 else roles[c[0]], ref)
               for c in rng.sample(options, 2)]
    rng.shuffle(queries)
    return queries


def _problem(rng: random.Random, objects: list[int], kind: str, slack: int) -> Problem:
    while True:  # redraw the rare problem whose objects cannot fill the cause-query quota
        contexts = _contexts(rng, objects, kind)
        roles, sets = object_roles(contexts)
        cause = _cause_queries(rng, roles, slack)
        if cause is not None:
            break
    queries = cause + _intervention_queries(rng, contexts, roles, sets)
    for q in queries:  # the generator's intent must match the rule, label and type
        assert q["label"] == derive_label(contexts, q["objects"]), (contexts, q)
        assert q["label"] in TYPE_LABELS[q["type"]], (contexts, q)
    assert len(contexts) == NUM_CONTEXTS
    return contexts + queries
