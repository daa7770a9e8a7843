"""A full disk, before and during a run: refuse to start without room for the checkpoints, check before
each save, and turn the many shapes a full disk takes mid-run (``OSError`` ENOSPC/EDQUOT from our own
files, orbax/tensorstore's ``ValueError: RESOURCE_EXHAUSTED ... No space left on device``) into one
``DiskFull`` that names the file, the free space and the checkpoint a rerun resumes from.
"""
from __future__ import annotations

import errno
import os
import re
import shutil

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os_error_code='28'", "os_error_code='122'")
_PATH = re.compile(r'(?:local file|writing:?) "([^"]+)"')


class DiskFull(OSError):
    """The workdir's filesystem has no room left (the message names the file and the free space)."""


def free_mib(path: str) -> float:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path or ".").free / 2**20


def checkpoint_mib(state_bytes: int) -> float:
    """About what one checkpoint takes: the state, plus orbax's metadata (measured: ~0.25 MiB for a tiny
    state) and a margin."""
    return (state_bytes * 1.1 + 2**19) / 2**20


def check_before_training(workdir: str, state_bytes: int, keep: int) -> None:
    """Refuse a run whose ``keep + 1`` checkpoints cannot fit (orbax writes the next before deleting)."""
    free = free_mib(workdir)
    need = checkpoint_mib(state_bytes) * (keep + 1)
    if free < need:
        raise DiskFull(f"workdir {workdir!r}: {free:.1f} MiB free, checkpoints need about {need:.1f} MiB "
                       f"({keep + 1} x {checkpoint_mib(state_bytes):.1f} MiB)")


def check_before_save(directory: str, state_bytes: int, step: int, finalized: list[int]) -> None:
    """Refuse to start a save that cannot fit, rather than let orbax fail halfway through writing it."""
    free, need = free_mib(directory), checkpoint_mib(state_bytes)
    if free < need:
        raise DiskFull(f"disk full: saving step {step} to {directory} needs about {need:.1f} MiB, "
                       f"{free:.1f} MiB free; {_resume_hint(finalized)}")


def as_disk_full(exc: BaseException, workdir: str, finalized: list[int]) -> DiskFull | None:
    """``exc`` (or an exception it was raised from) as a ``DiskFull`` when it is a full disk, else None;
    ``finalized``: the steps a rerun can resume from."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFull):
            return exc
        text = str(exc)
        if (isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS) or any(t in text for t in _FULL_TEXT):
            path = getattr(exc, "filename", None) or next(iter(_PATH.findall(text)), None)
            what = f"writing {path} failed" if path else f"a write under {workdir} failed"
            return DiskFull(f"disk full: {what}, {free_mib(os.fspath(path or workdir)):.1f} MiB free; "
                            f"{_resume_hint(finalized)}")
        exc = exc.__cause__ or exc.__context__
    return None


def _resume_hint(finalized: list[int]) -> str:
    if not finalized:
        return "no checkpoint was finalized yet: free space and rerun the same command to start over"
    return (f"the last finalized checkpoint (step {finalized[-1]}) is intact: free space and rerun the same "
            "command to resume from it")
