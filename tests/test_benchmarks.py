"""``python -m benchmarks.run --quick`` runs every section and writes BENCHMARKS-style markdown (issue
``perf``: the suite is not a test of speed, but ``make test`` proves it runs). No timing is asserted."""
import os
import subprocess
import sys

from benchmarks.run import SECTIONS
from tests.helpers import one_device_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_suite_runs_every_section_and_writes_the_file(tmp_path):
    # one device, as a user runs it (the suite's 8 fake devices would shard every step 8 ways), and the
    # suite's compilation cache (the sections build the same tiny steps; compile_depth turns it off to time).
    # A generous bound, not a speed check: on a slow day (half the usual matmul rate) it once took 1,437 s.
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)], cwd=REPO,
                          env=one_device_env(), capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks") and "Machine: " in text
    assert text.count("\n## ") == len(SECTIONS), text
    for name in SECTIONS:
        assert f"--only {name} --quick" in text, name
    assert "nan" not in text.lower().replace("nanosecond", "")


def test_an_unknown_section_is_refused_by_name():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--only", "routed,warp"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "warp" in proc.stderr and "routed" not in proc.stderr.split("known")[0]
