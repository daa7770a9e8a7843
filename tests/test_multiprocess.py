"""Two processes x 4 fake CPU devices on localhost: a SIGTERM to one of them stops both at the same step,
with one collective checkpoint that a single process restores."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.test_faults import REPO, TINY

STEPS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path):
    from iclm_jax.train.preemption import EXIT_PREEMPTED
    work = tmp_path / "run"
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
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

    from iclm_jax.train import restore_run
    run = restore_run.load(work)        # one process, 8 devices: orbax reshards the 2-process save
    assert run.step == saved[0]
