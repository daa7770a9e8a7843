"""One writer per workdir: an exclusive ``flock`` on ``<workdir>/.lock``, held while a run trains.

The kernel drops the lock when the process exits, however it exits (kill -9 included), so a stale lock
cannot block the next run on a local filesystem. The file records pid, host and start time, which the
refusal names. In a multi-process run only process 0 takes it (the processes share the workdir).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time

LOCK_NAME = ".lock"


class WorkdirBusy(OSError):
    """Another process holds the workdir's lock."""


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True):
    """Hold the workdir's lock for the ``with`` block; raise ``WorkdirBusy`` naming the holder."""
    if not enabled:
        yield
        return
    path = os.path.join(workdir, LOCK_NAME)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise WorkdirBusy(f"workdir {workdir!r} is in use by another run ({_holder(f.read())}); "
                              "wait for it to finish, or use another --workdir") from None
        f.seek(0)
        f.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")},
                  f)
        f.flush()
        yield
    finally:
        f.close()       # releases the lock


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, since {h['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
