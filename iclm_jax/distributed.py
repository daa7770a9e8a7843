"""Multi-process initialisation (JAX's multi-controller runtime; nothing of our own).

With no flags, ``jax.distributed.initialize()`` auto-detects TPU pods and SLURM only when asked
(``--distributed``); explicit ``--coordinator_address/--num_processes/--process_id`` work anywhere,
including N processes on localhost with fake CPU devices (what the tests use). A missing peer fails
after ``--init_timeout_s`` seconds instead of the default 5 minutes.
"""
from __future__ import annotations

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
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:   # a missing peer or a bad address: one clear line
        raise RuntimeError(f"jax.distributed.initialize failed ({kwargs}): {e}") from e
