"""Two processes x 4 fake CPU devices on localhost: the same training as one process x 8 devices; a SIGTERM
to one of them stops both at the same step, with one collective checkpoint that a single process restores."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.helpers import free_port
from tests.test_faults import REPO, TINY
from tests.xla_env import xla_flags

STEPS = 40


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path):
    from iclm_jax.train.preemption import EXIT_PREEMPTED
    work = tmp_path / "run"
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    args = [a for a in TINY if not a.startswith("--config.mesh")]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "iclm_jax.main", f"--workdir={work}", *args,
         f"--config.train.steps={STEPS}", "--config.train.batch_size=8", "--config.checkpoint.every=1000",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
         "--init_timeout_s=60"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    metrics = work / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
        assert time.time() - t0 < 300, "no progress"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(timeout=300)
    errs = [p.stderr.read() for p in procs]
    assert [p.returncode for p in procs] == [EXIT_PREEMPTED] * 2, errs[0][-3000:] + errs[1][-3000:]
    saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < STEPS
    assert f"saved step {saved[0]}" in errs[0]

    from iclm_jax.train.run import load_run
    run = load_run(work)        # one process, 8 devices: orbax reshards the 2-process save
    assert run.step == saved[0]


def _records(work) -> dict[tuple[str, int], dict]:
    """metrics.jsonl as (split, step) -> record (report.MetricsWriter: one JSON object per line)."""
    from iclm_jax import report
    out = {}
    for split in ("train", "eval/IID"):
        for r in report.read_metrics(str(work), split):
            out[(split, r["step"])] = r
    return out


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """2 processes x 4 devices == 1 process x 8 devices: the same global batches (each process loads its
    block of rows), hence the same losses, eval results and final parameters."""
    steps = 6
    args = [a for a in TINY if not a.startswith("--config.mesh")] + [
        f"--config.train.steps={steps}", "--config.train.batch_size=8", "--config.checkpoint.every=1000",
        "--config.mesh.fsdp=2",       # parameters sharded too: a 2-process checkpoint to reshard
        # Adam's g / (|g| + eps) turns the rounding of near-cancelling gradients (the MINE critic's at
        # MI ~ 0 is a difference of two nearly equal means) into lr-sized steps whatever computes them, so
        # the all-reduce order (cross- vs in-process) would move those parameters by percents in 6 steps
        # (as another mesh in one process does). eps=1e-3 makes such updates linear in g, so parameters
        # compare the distributed computation, not Adam's conditioning (see test_mesh_equivalence.py).
        "--config.train.adam_eps=1e-3"]
    port = free_port()
    multi, single = tmp_path / "multi", tmp_path / "single"

    def start(work, devices, *extra):
        env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
                   JAX_PLATFORMS="cpu")
        return subprocess.Popen([sys.executable, "-m", "iclm_jax.main", f"--workdir={work}", *args, *extra],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [start(multi, 4, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                   f"--process_id={i}", "--init_timeout_s=60") for i in range(2)]
    procs.append(start(single, 8))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 3, "\n----\n".join(e[-3000:] for e in errs)

    a, b = _records(multi), _records(single)
    assert sorted(a) == sorted(b) and [("train", s) in a for s in range(1, steps + 1)] == [True] * steps
    assert ("eval/IID", steps) in a
    for key, ra in a.items():
        rb = b[key]
        assert set(ra) == set(rb), key
        names = (("loss", "ce", "answer_ce", "answer_acc") if key[0] == "train"
                 else [k for k in ra if k not in ("step", "split", "time_s")])     # time_s: wall clock
        for name in names:
            np.testing.assert_allclose(ra[name], rb[name], rtol=1e-5, err_msg=f"{key} {name}")

    from iclm_jax.checkpoint import to_storable
    from iclm_jax.train.run import load_run
    ra, rb = load_run(multi), load_run(single)     # this process: 8 devices, one host
    assert ra.step == rb.step == steps
    la = jax.tree_util.tree_leaves_with_path(to_storable(ra.state))
    lb = dict(jax.tree_util.tree_leaves_with_path(to_storable(rb.state)))
    assert len(la) == len(lb) > 0
    for path, x in la:
        x, y = np.asarray(x), np.asarray(lb[path])
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(y), initial=0.0)),
                                   err_msg=jax.tree_util.keystr(path))
