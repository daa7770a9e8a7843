"""``data.task``: what differs between the benchmarks behind one data path (generate -> render -> tokenize
-> grain). Each task names its splits, its problem generator, how problems become domain-labelled
examples, its problem files and its reference predictors (its word tokenizer: ``data.tokenizer=acre_word|raven_word``).

* ``acre``: ACRE blicket problems; splits IID/Comp/Sys/CompHeldout/...; four queries per problem (packed
  rows share the contexts); references majority and object count.
* ``raven``: RAVEN-style matrices (``raven``); the splits are its configurations (train on
  ``center_single``, test o.o.d. on ``distribute_four`` and ``in_center_single_out_center_single``); one
  question per problem (answer letter " A".." H"); packed rows add, with ``extra_queries``, the missing
  panel's attributes as training questions and, with ``data.extra_query_kinds`` naming ``candidates``
  or ``echo``, each candidate's number of attributes shared with the answer, or with ``lookup`` each
  candidate's letter given its panel (``raven_render.render_packed``);
  with ``data.worked_answer`` the answer writes the missing panel out before its letter
  (``raven_render.worked_answer_text``); references majority letter and the best single attribute.
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
    render,
)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    splits: tuple[str, ...]
    generate: Callable            # (split, part, n, seed) -> problems
    render: Callable              # (problems, styles, packed, form, extra_queries, worked) -> examples
    load: Callable                # path -> problems (a release-format / problem JSON file), read whole
    index: Callable               # path -> the same problems, read on demand where the task can
    fit_reference: Callable       # train problems -> {name: predictor}
    score_reference: Callable     # (predictor, problems) -> {"all": accuracy, ...}
    streams: bool                 # data.stream can generate it (AcreStream: ACRE only)
    max_queries: Callable         # extra_queries -> the most queries a packed row of the task holds
    query_kinds: tuple[str, ...] = ()   # names data.extra_query_kinds may list (empty: not selectable)
    worked: bool = False          # offers data.worked_answer (the answer's working, then the answer)


def _raven_examples(problems, styles, packed: bool = False, form: str = "full", extra_queries=False,
                    worked: bool = False):
    if extra_queries and not packed:
        raise ValueError("data.extra_queries needs packed rows (data.packed=True)")
    if packed:
        return [dataclasses.replace(raven_render.render_packed(p, style, form, extra_queries, worked),
                                    source=f"problem {i} {style}")
                for i, p in enumerate(problems) for style in styles]
    return [dataclasses.replace(raven_render.render_problem(p, style, form, worked), source=f"problem {i} {style}")
            for i, p in enumerate(problems) for style in styles]


def _acre_examples(problems, styles, packed: bool = False, form: str = "full", extra_queries=False,
                   worked: bool = False):
    if worked:
        raise ValueError("data.worked_answer: ACRE's answers have no working to write out (RAVEN only)")
    return pipeline.acre_examples(problems, styles, packed, form, extra_queries)


TASKS = {
    "acre": Task("acre", acre.SPLITS, acre_generate.generate_problems, _acre_examples, acre.load_problems,
                 acre.index_problems, reference.fit_reference, reference.score_reference, True,
                 lambda extra: acre.NUM_QUERIES + (render.MAX_EXTRA_QUERIES if extra else 0)),
    "raven": Task("raven", raven.CONFIGURATIONS, raven_generate.generate_problems, _raven_examples,
                  raven.load_problems, raven.load_problems, raven_reference.fit_reference,
                  raven_reference.score_reference, False, raven_render.max_queries,
                  tuple(raven_render.QUERY_KINDS), worked=True),
}


def get(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"data.task={name!r}: expected one of {tuple(TASKS)}")
    return TASKS[name]


def examples(task: str, problems, styles, packed: bool, form: str = "full", extra_queries: bool = False,
             worked: bool = False) -> list:
    """Each problem in each style (domain-labelled), problem-major; ``source`` names each; ``worked``: the
    task's worked answers (``data.worked_answer``)."""
    return get(task).render(problems, styles, packed, form, extra_queries, worked)
