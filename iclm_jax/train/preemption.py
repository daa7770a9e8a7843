"""SIGTERM (preemption notice) handling: finish the current step, save, exit with EXIT_PREEMPTED.

TPU and SLURM schedulers send SIGTERM some seconds before killing a job. The handler only sets a flag;
the loop checks it between steps. In multi-process runs every process must stop at the *same* step
(orbax saves collectively), so the flag is all-gathered and any process's notice stops them all; orbax's
own preemption sync point (multi-host JAX preemption service) is honoured too.
"""
from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

EXIT_PREEMPTED = 143   # 128 + SIGTERM: "terminated by a preemption notice, checkpoint saved"


class PreemptionWatcher:
    def __init__(self):
        self.notified = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.notified = True

    def should_stop(self, step: int, mngr=None) -> bool:
        local = self.notified
        if jax.process_count() > 1:
            local = bool(np.any(multihost_utils.process_allgather(np.array(local))))
        if mngr is not None and not local:
            try:
                local = bool(mngr.reached_preemption(step))
            except Exception:   # no preemption service in single-process runs
                pass
        return local

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
