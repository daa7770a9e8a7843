"""The XLA flags of the suite's processes and of the runs its tests start (no jax import here: conftest sets
them before jax starts).

The suite is compile-bound (tiny shapes, hundreds of distinct programs, many fresh processes), so it compiles
with LLVM's -O0: a train step compiles ~40% faster, the matmuls are library calls either way, and what the
programs compute is the same (measured on test_step, test_mesh_equivalence, test_learning and test_iclm: 233
-> 179 s, every test passing).
"""
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """``devices`` fake CPU devices, compiled fast."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
