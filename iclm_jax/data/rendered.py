"""The examples of a sequence of ACRE problems, rendered on access: ``pipeline.acre_examples`` without
holding them, for problems read on demand from a large release file (``acre.index_problems``).

``RenderedProblems(problems, styles, packed, ...)[i]`` equals ``pipeline.acre_examples(problems, styles,
packed, ...)[i]``: problem-major, each problem in each style, one packed row or one row per query. Every
problem renders to the same number of rows (4 queries, or one packed row), which is what makes item
``i`` a pure function of problem ``i // per_problem``.
"""
from __future__ import annotations

import dataclasses

from iclm_jax.data import pipeline
from iclm_jax.data.lazy import LazySequence


class RenderedProblems(LazySequence):
    def __init__(self, problems, styles, packed: bool, form: str = "full", extra_queries: bool = False,
                 name: str = ""):
        self.problems, self.styles, self.packed = problems, tuple(styles), bool(packed)
        self.kwargs = dict(form=form, extra_queries=extra_queries)
        self.name = name
        self._last = None
        self.per_style = len(self._render(0, problems[0], self.styles[0]))
        self.per_problem = self.per_style * len(self.styles)

    def _render(self, p: int, problem, style: str) -> list:
        out = pipeline.acre_examples([problem], styles=(style,), packed=self.packed, **self.kwargs)
        tag = f"{self.name} problem {p}" if self.name else f"problem {p}"
        return [dataclasses.replace(e, source=e.source.replace("problem 0", tag, 1)) for e in out]

    def __len__(self) -> int:
        return len(self.problems) * self.per_problem

    def item(self, i: int):
        p, r = divmod(i, self.per_problem)
        s, q = divmod(r, self.per_style)
        if self._last is None or self._last[:2] != (p, s):
            rows = self._render(p, self.problems[p], self.styles[s])
            if len(rows) != self.per_style:     # cannot happen for ACRE problems; guard the arithmetic
                raise ValueError(f"{self.name or 'problems'}: problem {p} renders to {len(rows)} rows in "
                                 f"style {self.styles[s]!r}, problem 0 to {self.per_style}")
            self._last = (p, s, rows)
        return self._last[2][q]

    def __iter__(self):
        for p in range(len(self.problems)):
            problem = self.problems[p]
            for style in self.styles:
                yield from self._render(p, problem, style)

    def __getstate__(self):
        return {**self.__dict__, "_last": None}

    def __repr__(self) -> str:
        return f"RenderedProblems({self.name or 'problems'!r}, {len(self)} examples)"
