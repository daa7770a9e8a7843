"""``data.task``: what differs between the benchmarks behind one data path (generate -> render -> tokenize
-> grain). Each task names its splits, its problem generator, how problems become domain-labelled
examples, its problem files and its reference predictors (its word tokenizer: ``data.tokenizer=acre_word|raven_word``).

* ``acre``: ACRE blicket problems; splits IID/Comp/Sys/CompHeldout/...; four queries per problem (packed
  rows share the contexts); references majority and object count.
* ``raven``: RAVEN-style matrices (``raven``); the splits are its configurations (train on
  ``center_single``, test o.o.d. on ``distribute_four`` and ``in_center_single_out_center_single``); one
  question per problem (answer letter " A".." H"), so rows are never packed; references majority letter
  and the best single attribute.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from iclm_jax.data import (
    acre,
    acre_generate,
    pipeline,
    raven,
    raven_generate,
    raven_reference,
    raven_render,
    reference,
)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    splits: tuple[str, ...]
    generate: Callable            # (split, part, n, seed) -> problems
    render: Callable              # (problems, styles, packed, form, extra_queries) -> examples
    load: Callable                # path -> problems (a release-format / problem JSON file), read whole
    index: Callable               # path -> the same problems, read on demand where the task can
    fit_reference: Callable       # train problems -> {name: predictor}
    score_reference: Callable     # (predictor, problems) -> {"all": accuracy, ...}
    packable: bool                # several queries per problem (data.packed, data.extra_queries)


def _raven_examples(problems, styles, packed: bool = False, form: str = "full", extra_queries: bool = False):
    if packed or extra_queries:
        raise ValueError("data.task=raven asks one question per problem: set data.packed=False and "
                         "data.extra_queries=False")
    return [dataclasses.replace(raven_render.render_problem(p, style, form), source=f"problem {i} {style}")
            for i, p in enumerate(problems) for style in styles]


TASKS = {
    "acre": Task("acre", acre.SPLITS, acre_generate.generate_problems, pipeline.acre_examples, acre.load_problems,
                 acre.index_problems, reference.fit_reference, reference.score_reference, True),
    "raven": Task("raven", raven.CONFIGURATIONS, raven_generate.generate_problems, _raven_examples,
                  raven.load_problems, raven.load_problems, raven_reference.fit_reference,
                  raven_reference.score_reference, False),
}


def get(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"data.task={name!r}: expected one of {tuple(TASKS)}")
    return TASKS[name]


def examples(task: str, problems, styles, packed: bool, form: str = "full", extra_queries: bool = False) -> list:
    """Each problem in each style (domain-labelled), problem-major; ``source`` names each."""
    return get(task).render(problems, styles, packed, form, extra_queries)
