"""Joining the multi-process runtime fails fast and says why when a peer is missing or flags are incomplete."""
import os
import subprocess
import sys

from tests.helpers import free_port, one_device_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(tmp_path, *flags, timeout=120):
    env = one_device_env()
    return subprocess.run([sys.executable, "-m", "iclm_jax.main", f"--workdir={tmp_path / 'run'}", *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_worker_without_coordinator_exits_2_naming_the_address(tmp_path):
    port = free_port()
    r = _main(tmp_path, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=1",
              "--init_timeout_s=2")
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"coordinator 127.0.0.1:{port} not reachable after --init_timeout_s=2 s" in r.stderr
    assert not (tmp_path / "run").exists()          # nothing written before the runtime is joined


def test_coordinator_without_peers_stops_after_the_timeout_and_says_what_it_waited_for(tmp_path):
    # JAX aborts the process here (no Python error is possible); our line before joining explains it.
    port = free_port()
    r = _main(tmp_path, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=0",
              "--init_timeout_s=2")
    assert r.returncode != 0
    assert f"joining the distributed runtime via 127.0.0.1:{port} as process 0 of 2; waiting up to 2 s" \
        in r.stderr
    assert "DEADLINE_EXCEEDED" in r.stderr


def test_incomplete_flags_are_refused(tmp_path):
    r = _main(tmp_path, "--coordinator_address=127.0.0.1:1234", "--process_id=0")
    assert r.returncode == 2 and "--coordinator_address needs --num_processes and --process_id" in r.stderr
    r = _main(tmp_path, "--coordinator_address=nohost", "--num_processes=2", "--process_id=1")
    assert r.returncode == 2 and "expected host:port" in r.stderr
