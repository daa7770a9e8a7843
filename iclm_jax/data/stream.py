"""An endless training source of fresh ACRE problems: a lazy, picklable ``Sequence`` of examples.

Example ``i`` is a pure function of (split, part, seed, styles, packed, i): problem ``i // k``
(``acre_generate.generate_problem``, k examples per problem) rendered by ``pipeline.acre_examples``
exactly as a generated list would be, problem-major: with styles ``(symbolic, text)`` and packed
rows, examples 2p and 2p+1 are problem p in each style. Nothing is stored, so any position of the
stream is reached at once (grain's ``get_state``/``set_state`` resume by index) and grain worker
processes rebuild the same examples from the pickled arguments.

``pipeline.make_dataset(stream, ..., stream=True)`` reads it in order, once: the problems are
already independent random draws, and the stream is long enough (``length``, default 2**40
examples) never to run out.
"""
from __future__ import annotations

import dataclasses

from iclm_jax.data import acre_generate, pipeline
from iclm_jax.data.lazy import LazySequence

STREAM_LENGTH = 2 ** 40


class AcreStream(LazySequence):
    """``AcreStream(split, part, seed, styles, packed)[i]``: the i-th rendered example of the stream.

    ``render_kwargs`` are forwarded to ``pipeline.acre_examples`` (rendering options), or to
    ``render_fn``, a replacement with its signature. Unpacked rows (``packed=False``) give 4 examples
    per problem and style, in ``acre_examples``' order.
    Indexing by a slice returns a list (meant for short slices); iterating the whole stream is refused
    (it never ends): use ``head(n)`` for the examples of the first n problems.
    """

    def __init__(self, split: str, part: str, seed: int, styles, packed: bool,
                 length: int = STREAM_LENGTH, render_fn=None, **render_kwargs):
        self.split, self.part, self.seed = split, part, int(seed)
        self.styles, self.packed = tuple(styles), bool(packed)
        if not self.styles:
            raise ValueError("AcreStream: no styles")
        self.length = int(length)
        self.render_fn = render_fn            # None: pipeline.acre_examples (picklable if top-level)
        self.render_kwargs = dict(render_kwargs)
        self._last: tuple[int, list] | None = None
        # Examples per problem and style (1 packed row, else one per query), from problem 0: bad
        # arguments fail here rather than inside a grain worker.
        self.per_style = len(self.render(0, self.problem(0), self.styles[0]))
        self.per_problem = len(self.styles) * self.per_style
        if self.length < self.per_problem:
            raise ValueError(f"AcreStream: length={length} is less than one problem's "
                             f"{self.per_problem} examples")

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        raise TypeError("AcreStream is endless: iterate stream.head(n) or index it")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_last"] = None
        return state

    def problem(self, p: int) -> list:
        """Problem ``p`` of the stream (the last one is cached: its renderings are consecutive)."""
        if self._last is None or self._last[0] != p:
            self._last = (p, acre_generate.generate_problem(self.split, self.part, p, self.seed))
        return self._last[1]

    def render(self, p: int, problem, style: str) -> list:
        """The examples of ``problem`` (number ``p``) in ``style``, named after their stream position."""
        fn = self.render_fn or pipeline.acre_examples
        out = fn([problem], styles=(style,), packed=self.packed, **self.render_kwargs)
        tag = f"{self.split}/{self.part} stream seed {self.seed} problem {p}"
        return [dataclasses.replace(e, source=e.source.replace("problem 0", tag, 1)) for e in out]

    def item(self, i: int):
        p, r = divmod(i, self.per_problem)
        s, q = divmod(r, self.per_style)
        return self.render(p, self.problem(p), self.styles[s])[q]

    def head(self, n: int, problems: list | None = None) -> list:
        """The examples of the first ``n`` problems (``problems``: those problems, if already made)."""
        problems = problems[:n] if problems is not None else [self.problem(p) for p in range(n)]
        if len(problems) != n:
            raise ValueError(f"head({n}): got {len(problems)} problems")
        return [e for p, problem in enumerate(problems) for style in self.styles
                for e in self.render(p, problem, style)]

    def problems(self, n: int) -> list:
        """The first ``n`` problems of the stream."""
        return [acre_generate.generate_problem(self.split, self.part, p, self.seed) for p in range(n)]

    def __repr__(self) -> str:
        return (f"AcreStream({self.split!r}, {self.part!r}, seed={self.seed}, styles={self.styles}, "
                f"packed={self.packed}, length={self.length})")
