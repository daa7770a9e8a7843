"""Reference predictors printed beside the model: what surface statistics alone achieve on ACRE.

* ``majority`` — always the most frequent training label.
* ``object_count`` — the most frequent training label for queries holding the same number of objects.
A model near the second row has learned surface statistics, not the blicket rule.
"""
from __future__ import annotations

from collections import Counter, defaultdict

from iclm_jax.data.acre import QUERY_TYPES


def _queries(problems):
    for p in problems:
        for q in p[6:]:
            yield q


def fit_reference(train_problems) -> dict[str, object]:
    labels: Counter = Counter()
    by_count: dict[int, Counter] = defaultdict(Counter)
    for q in _queries(train_problems):     # one pass: the problems may be read from a large file
        labels[q["label"]] += 1
        by_count[len(q["objects"])][q["label"]] += 1
    majority = labels.most_common(1)[0][0]
    count_rule = {n: c.most_common(1)[0][0] for n, c in by_count.items()}
    return {"majority": lambda q: majority,
            "object_count": lambda q: count_rule.get(len(q["objects"]), majority)}


def score_reference(predict, problems) -> dict[str, float]:
    """Accuracy overall and per query type."""
    hits: dict[str, list[int]] = defaultdict(list)
    for q in _queries(problems):
        ok = int(predict(q) == q["label"])
        hits["all"].append(ok)
        hits[q["type"]].append(ok)
    return {k: sum(v) / len(v) for k, v in hits.items() if v} | {
        t: float("nan") for t in QUERY_TYPES if t not in hits}
