"""Launch scripts: local.sh really runs N processes to a checkpoint and propagates failures; the cluster
scripts (SLURM, TPU pod), which cannot run here, at least parse and keep the flags they must pass."""
import os
import subprocess
import sys

import pytest

from tests.test_faults import REPO, TINY

LAUNCH = os.path.join(REPO, "launch")


def _local(*args, timeout=600):
    env = dict(os.environ, PYTHON=sys.executable, DEVICES_PER_PROCESS="4", JAX_PLATFORMS="cpu", GRACE_S="20")
    return subprocess.run(["bash", os.path.join(LAUNCH, "local.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_local_two_processes_train_and_checkpoint(tmp_path):
    work = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("--config.mesh")]
    r = _local("2", f"--workdir={work}", *args, "--config.train.steps=4", "--config.train.batch_size=8",
               "--init_timeout_s=120")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    saved = [p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()]
    assert "4" in saved, saved
    lines = r.stdout.splitlines()   # every line is prefixed with its process id
    assert lines and all(ln.startswith(("[0] ", "[1] ")) for ln in lines), lines[:5]


def test_local_returns_first_failure_status(tmp_path):
    # --workdir missing: every process exits non-zero at once (absl UsageError = 1); the launcher says so.
    r = _local("2", "--init_timeout_s=20", timeout=300)
    assert r.returncode != 0
    assert "exited with status" in r.stderr


def test_local_usage_error():
    r = _local("zero")
    assert r.returncode == 64 and "usage" in r.stderr


@pytest.mark.parametrize("script", ["local.sh", "slurm.sbatch", "tpu_pod.sh"])
def test_scripts_parse(script):
    r = subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cluster_scripts_pass_distributed():
    for script in ("slurm.sbatch", "tpu_pod.sh"):
        text = open(os.path.join(LAUNCH, script)).read()
        assert "--distributed" in text and "iclm_jax.main" in text, script
    assert "srun" in open(os.path.join(LAUNCH, "slurm.sbatch")).read()
    assert "--worker=all" in open(os.path.join(LAUNCH, "tpu_pod.sh")).read()
