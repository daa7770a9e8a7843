"""What parts of the ACRE rule are worth: accuracy of partial-rule predictors on generated IID validation.

    python experiments/prototypes/rule_heuristics.py [--n 3000] [--seed 5]

An object's status, then a query's label = the highest status of its objects (off < undetermined < on).
"""
import argparse

import numpy as np

from iclm_jax.data import acre, acre_generate


def status(contexts, obj, rule):
    if any(obj in c["objects"] for c in contexts if c["light_state"] == "off"):
        return 0
    if rule == "off_else_on":
        return 2
    if rule == "off_else_undetermined":
        return 1
    alone = any(c["objects"] == [obj] for c in contexts if c["light_state"] == "on")
    return 2 if alone else 1                       # off / alone-on / else undetermined


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--seed", type=int, default=5)
    a = p.parse_args()
    problems = acre_generate.generate_problems("IID", "val", a.n, a.seed)
    for rule in ("off_else_on", "off_alone_on_else_undetermined", "off_else_undetermined"):
        hits = {t: [] for t in acre.QUERY_TYPES}
        for pr in problems:
            for q in pr[6:]:
                label = max(status(pr[:6], o, rule) for o in q["objects"])
                hits[q["type"]].append(label == q["label"])
        n_all = sum(len(v) for v in hits.values())
        print(f"{rule:32s} all {sum(map(sum, hits.values())) / n_all:.1%} "
              + " ".join(f"{t} {np.mean(v):.1%}" for t, v in hits.items()))


if __name__ == "__main__":
    main()
