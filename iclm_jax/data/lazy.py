"""``LazySequence``: the indexing every on-demand sequence of examples shares (``AcreStream``,
``IndexedRecords``, ``RenderedProblems``): slices give lists, negative indices count from the end, an
index out of range is an ``IndexError`` naming the sequence. Subclasses define ``__len__`` and ``item``."""
from __future__ import annotations

import collections.abc


class LazySequence(collections.abc.Sequence):
    def item(self, i: int):
        """Element ``i``, with ``0 <= i < len(self)``."""
        raise NotImplementedError

    def __getitem__(self, i):
        n = len(self)
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(n))]
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self!r}: index {i} out of range [0, {n})")
        return self.item(i)
