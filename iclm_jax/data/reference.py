"""Reference predictors printed beside the model: what surface statistics alone achieve.

On ACRE problems:
* ``majority`` — always the most frequent training label.
* ``object_count`` — the most frequent training label for queries holding the same number of objects.
A model near the second row has learned surface statistics, not the blicket rule.

On any examples (evals JSONL, where there are no problems): the most frequent answer per rendering domain
(a model sees the domain), fitted on the training examples (``majority answer (train)``) or on the eval
set itself (``majority answer (this set)``: the best any prompt-blind predictor can do there, so a
model's accuracy near it is the label prior, not learning).
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


ALL_DOMAINS = "all"


def _answers(examples):
    for ex in examples:
        for a in ([a for _, a in ex.queries] if hasattr(ex, "queries") else [ex.answer]):
            yield ex.domain, a.strip()


def fit_majority_answer(examples) -> dict:
    """Domain -> its most frequent answer (and ``ALL_DOMAINS`` -> the overall one), in one pass."""
    by_domain: dict = defaultdict(Counter)
    for domain, a in _answers(examples):
        by_domain[domain][a] += 1
        by_domain[ALL_DOMAINS][a] += 1
    return {d: c.most_common(1)[0][0] for d, c in by_domain.items()}


def score_majority_answer(table: dict, examples) -> dict[str, float]:
    """Accuracy of answering each query with its domain's majority answer (exact match, stripped)."""
    hits = [int(table.get(domain, table.get(ALL_DOMAINS)) == a) for domain, a in _answers(examples)]
    return {"all": sum(hits) / len(hits)} if hits else {}
