"""Test-wide settings: 8 fake CPU devices, a persistent compilation cache, parsed absl flags."""
import os
import pathlib

from tests.xla_env import xla_flags  # imports no jax

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import flags  # noqa: E402

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# grain 0.2.18 multi-worker iteration reads absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()


# The files that take longest (seconds of a full run on the idle 2-core machine, `--durations=0`, 2026-12-02),
# longest first. `make test` passes --no-loadscope-reorder, so pytest-xdist hands files to its workers in the
# order below instead of the most-tests-first order it defaults to, which started these single-test
# files last: one of them then ran alone for minutes at the end. A file not listed keeps its place after these.
LONGEST_FIRST = (                        # seconds in the fresh-clone CI run of 135e97a (1,514 s in all)
    "test_readme_run_scale_sweep.py",    # 448
    "test_faults.py",                    # ~350 (622 before its runs shared the compilation cache)
    "test_readme_commands.py",           # 262 (the acre group)
    "test_sweep.py",                     # ~220
    "test_continual.py",                 # 192
    "test_benchmarks.py",                # 185
    "test_mesh_equivalence.py",          # 185
    "test_readme_run_raven_continual.py",  # 183
    "test_activation_sharding.py",       # 149
    "test_multiprocess.py",              # 141
    "test_step.py",                      # 109
    "test_interventions.py",             # 100
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)          # stable: tests keep their order within a file
