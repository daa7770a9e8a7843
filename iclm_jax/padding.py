"""Sizes padded up to a multiple (row lengths, eval batches, decode buckets, loss chunks), so one
compiled program serves every size in the same bucket."""
from __future__ import annotations


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` (>= 1) that is >= ``n``."""
    return -(-n // multiple) * multiple
