"""Per-query accuracy of a RAVEN run trained with extra queries (``raven.py:cpu,queries``, ``cpu,match`` or
``cpu,echo``): the letter, each of the missing panel's attributes and, with ``match`` / ``echo``, each candidate's
count of attributes shared with the answer, on generated center_single validation problems (teacher-forced).
For a run with worked answers (``raven.py:cpu,worked``: `` t4 s3 c2 C``): each word of the answer given the
true words before it (the letter given the true panel: the lookup alone), and the whole answer (exact match,
what evaluation scores).

    python experiments/prototypes/raven_query_slots.py RUN_DIR [--n 300]

``iclm-eval`` scores the letter only (evaluation rows ask it alone); this tells whether the rules
(type, size, color of panel 9) or the matching of a candidate to them is what is missing.
"""
import argparse

import numpy as np

from iclm_jax.data import raven_render, tasks
from iclm_jax.data.render import Example
from iclm_jax.train.run import load_run


def worked_words(run, problems) -> None:
    """Each word of the worked answer asked after the prompt and the true words before it (compact form)."""
    d = run.config.data
    whole = tasks.examples("raven", problems, tuple(d.styles.split(",")), False, d.form, worked=True)
    steps = []
    for e in whole:
        words = e.answer.split()
        steps.append([Example(e.prompt + "".join(f" {w}" for w in words[:i]), f" {w}", e.domain, -1, i)
                      for i, w in enumerate(words)])
    n = len(steps[0])
    flat = [x for s in steps for x in s]
    ok = run.run_set(run.eval_step, flat)["correct"][:len(flat), 0].reshape(-1, n)
    exact = run.run_set(run.eval_step, whole)["correct"][:len(whole), 0]
    names = ["type", "size", "color", "letter"] if n == 4 else [f"word {i + 1}" for i in range(n)]
    for j, name in enumerate(names):
        print(f"{name} (given the true words before it): {ok[:, j].mean():.1%} of {len(ok)}")
    print(f"panel right (type, size, color): {ok[:, :-1].all(axis=1).mean():.1%}; the letter given a right "
          f"panel: {ok[ok[:, :-1].all(axis=1), -1].mean() if ok[:, :-1].all(axis=1).any() else np.nan:.1%}")
    print(f"whole answer (exact match, what evaluation scores): {exact.mean():.1%} of {len(exact)}")
    print(f"(step {run.step}; chance: letter 12.5%, type 20%, size 16.7%, color 10%)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--n", type=int, default=300)
    a = p.parse_args()
    run = load_run(a.workdir)
    d = run.config.data
    # the run's validation problems (sources.eval_sets: the "val" part, seed + 999), all n of them
    problems = tasks.get("raven").generate(d.train_split, "val", a.n, run.config.seed + 999)
    if d.get("worked_answer", False):
        return worked_words(run, problems)
    kinds = tuple(k for k in d.get("extra_query_kinds", "").split(",") if k) or ("attributes",)
    examples = tasks.examples("raven", problems, tuple(d.styles.split(",")), True, d.form, extra_queries=kinds)
    res = run.run_set(run.eval_step, examples)
    correct, present = res["correct"], res["present"]
    names = ["letter"]
    for k in kinds:           # candidates: asked by letter ("C:"); echo: written out ("C t4 s3 c2 a5 |")
        names += raven_render.ATTRIBUTES if k == "attributes" else [f"{k} {x}" for x in raven_render.LETTERS]
    for j, name in enumerate(names):
        print(f"{name}: {correct[:, j][present[:, j]].mean():.1%} of {int(present[:, j].sum())} queries")
    for k in set(kinds) & {"candidates", "echo"}:
        first = names.index(f"{k} A")
        counts = correct[:, first:first + 8][present[:, first]]      # rows that ask them (not batch padding)
        print(f"{k}: all 8 counts right on {counts.all(axis=1).mean():.1%} of {len(counts)} rows")
    print(f"(step {run.step}; chance: letter 12.5%, type 20%, size 16.7%, color 10%; a count: 3 of 8 are 2s)")


if __name__ == "__main__":
    main()
