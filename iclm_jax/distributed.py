"""Multi-process initialisation (JAX's multi-controller runtime; nothing of our own).

With no flags, ``jax.distributed.initialize()`` auto-detects TPU pods and SLURM only when asked
(``--distributed``); explicit ``--coordinator_address/--num_processes/--process_id`` work anywhere,
including N processes on localhost with fake CPU devices (what the tests use). A missing peer fails
after ``--init_timeout_s`` seconds instead of the default 5 minutes.

JAX's runtime *aborts* the process (SIGABRT, "DEADLINE_EXCEEDED ... RegisterTask") when peers do not
all join in time, so no Python error can be raised there. Hence: a line before joining says what is
awaited and what such an abort means, and a non-coordinator first checks, with the same timeout, that
the coordinator's port answers at all, failing with a clear error (exit 2) if it does not.
"""
from __future__ import annotations

import socket
import sys
import time

from absl import flags

flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detects TPU/SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process).")
flags.DEFINE_integer("process_id", None, "This process's id (explicit multi-process).")
flags.DEFINE_integer("init_timeout_s", 120, "Seconds to wait for every peer to join.")


def initialize_from_flags() -> None:
    import jax

    f = flags.FLAGS
    explicit = f.coordinator_address is not None
    if not (f.distributed or explicit):
        return
    kwargs = dict(initialization_timeout=f.init_timeout_s)
    if explicit:
        if f.num_processes is None or f.process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        kwargs.update(coordinator_address=f.coordinator_address, num_processes=f.num_processes,
                      process_id=f.process_id)
    if explicit and f.process_id != 0:
        wait_for_coordinator(f.coordinator_address, f.init_timeout_s)
    where = f"via {f.coordinator_address} as process {f.process_id} of {f.num_processes}" if explicit \
        else "(auto-detected TPU pod / SLURM)"
    print(f"iclm: joining the distributed runtime {where}; waiting up to {f.init_timeout_s} s for every "
          "process (a 'DEADLINE_EXCEEDED ... RegisterTask' abort means a peer did not start or cannot "
          "reach the coordinator)", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:   # a missing peer or a bad address: one clear line
        raise RuntimeError(f"jax.distributed.initialize failed ({kwargs}): {e}") from e


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Poll ``host:port`` until it accepts a TCP connection; a clear RuntimeError after ``timeout_s``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator_address={address!r}: expected host:port")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"coordinator {address} not reachable after --init_timeout_s={timeout_s:g} s ({e}); "
                    "start process 0 there, or check the address and the firewall") from e
            time.sleep(0.2)
