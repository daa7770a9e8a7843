"""Bad command lines of iclm-train: one line on stderr (a config error: one line per bad field), exit
status 2, before anything is built."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    (["--config.model.nonexistent=1"], "bad command line (--config.model.nonexistent=1): no such config field"),
    (["--config=experiments/configs/acre.py:basline"], "unknown config variant 'basline'; known: demo,"),
    (["--config=experiments/configs/smollm2.py:basline"], "unknown config variant 'basline'"),
    (["--config=nope.py"], "No such file or directory: 'nope.py'"),
    (["--config.train.steps=abc"], "flag --config.train.steps=abc: invalid literal for int()"),
    (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    (["--config.train.batch_size=0"], "train.batch_size=0: expected an integer >= 1"),
]


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_command_line_is_one_line_and_exit_2(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "iclm_jax.main", f"--workdir={tmp_path / 'run'}", *args],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("iclm-train: ") and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 or lines[0].endswith("invalid config:"), r.stderr    # config errors: one per line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_workdir_and_a_negative_eval_batch_are_refused_with_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "iclm_jax.main"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "iclm-train: --workdir is required", r.stderr
    r = subprocess.run([sys.executable, "-m", "iclm_jax.eval_main", "--workdir", str(tmp_path), "--data", "x.json",
                        "--batch_size=-5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--batch_size: -5: expected an integer >= 1" in r.stderr, r.stderr
