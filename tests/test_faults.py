"""Faults: kill -9 and resume bit-exactly, interrupted saves, SIGTERM, NaN, unwritable or full workdir,
incompatible resume configs."""
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from iclm_jax.checkpoint import to_storable
from tests.helpers import one_device_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.d_model=16", "--config.model.n_layers=1", "--config.model.n_heads=2",
        "--config.model.n_kv_heads=1", "--config.model.head_dim=8", "--config.model.mlp_dim=32",
        "--config.lora.rank=2", "--config.mi.critic_hidden=16", "--config.train.warmup_steps=2",
        "--config.train.log_every=1", "--config.train.batch_size=4", "--config.eval.batch_size=8",
        "--config.data.train_problems=24", "--config.data.eval_problems=4",
        "--config.data.eval_splits=IID", "--config.mesh.data=1", "--quiet"]
STEPS = 14


def _cmd(workdir, *extra):
    return [sys.executable, "-m", "iclm_jax.main", f"--workdir={workdir}", *TINY,
            f"--config.train.steps={STEPS}", *extra]


def _env():
    return one_device_env()


def _copy_run(reference_run, tmp_path):
    """A private copy of the reference run's workdir, to damage or resume."""
    work = tmp_path / "run"
    shutil.copytree(reference_run, work)
    return work


def _run(workdir, *extra):
    return subprocess.run(_cmd(workdir, *extra), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)


def _start(workdir, *extra):
    return subprocess.Popen(_cmd(workdir, *extra), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _losses(workdir) -> dict[int, float]:
    """Per-step training loss; a resumed run re-logs some steps, the last record wins."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["split"] == "train":
                out[r["step"]] = r["loss"]
    return out


def _wait_for_steps(proc, workdir, n: int, timeout: float = 300) -> None:
    t0 = time.time()
    path = os.path.join(workdir, "metrics.jsonl")
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
        if os.path.exists(path) and len(_losses(workdir)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError("run made no progress")


def _final_state(workdir) -> dict:
    from iclm_jax.train.run import load_run
    run = load_run(workdir)
    return {"step": run.step, "state": to_storable(run.state)}


def _assert_same_state(a: dict, b: dict) -> None:
    import jax
    assert a["step"] == b["step"]
    la = jax.tree_util.tree_leaves_with_path(a["state"])
    lb = dict(jax.tree_util.tree_leaves_with_path(b["state"]))
    assert len(la) == len(lb)
    for path, x in la:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(lb[path]), err_msg=str(path))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run every fault is compared with."""
    work = tmp_path_factory.mktemp("ref") / "run"
    r = _run(work, "--config.checkpoint.every=1")
    assert r.returncode == 0, r.stderr[-3000:]
    return work


@pytest.mark.slow
def test_kill9_then_resume_is_bit_identical(reference_run, tmp_path):
    work = tmp_path / "run"
    kill_after = int(np.random.default_rng(int(time.time())).integers(3, STEPS - 3))
    proc = _start(work, "--config.checkpoint.every=1")
    _wait_for_steps(proc, work, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    r = _run(work, "--config.checkpoint.every=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(work) == _losses(reference_run)
    _assert_same_state(_final_state(work), _final_state(reference_run))


@pytest.mark.slow
def test_interrupted_save_leaves_previous_checkpoint_usable(reference_run, tmp_path):
    """A save killed mid-write leaves orbax's temporary directory behind: it is never resumed from."""
    work = _copy_run(reference_run, tmp_path)
    ckpts = work / "checkpoints"
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    last = steps[-1]
    # Fake a half-written newer step: orbax's tmp naming, truncated files, no finalisation.
    tmp = ckpts / f"{last + 1}.orbax-checkpoint-tmp-1234567"
    shutil.copytree(ckpts / str(last), tmp)
    for root, _, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(os.path.getsize(os.path.join(root, name)) // 2, 0))
    # ...and a finalized older state to resume from: drop the final step so there is work left.
    shutil.rmtree(ckpts / str(last))
    r = _run(work, "--config.checkpoint.every=1")
    assert r.returncode == 0, r.stderr[-3000:]
    from iclm_jax.train.run import load_run
    assert load_run(work).step == STEPS
    _assert_same_state(_final_state(work), _final_state(reference_run))


def _largest_file(step_dir):
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")    # orbax's failed read: below
def test_a_flipped_or_truncated_checkpoint_falls_back_to_the_previous_one(reference_run, tmp_path):
    """400 flipped bytes in the latest step's largest data file: caught by its SHA-256, the run resumes
    from the step before (saying which and why) and ends bit-identical to the reference; eval, export
    and a new run's init_from refuse the damaged step by name. A truncated file in a step without a
    record is caught by orbax."""
    from iclm_jax.checkpoint import CorruptCheckpoint
    from iclm_jax.train.run import load_run
    work = _copy_run(reference_run, tmp_path)
    assert (work / ".checkpoints_integrity" / f"{STEPS}.json").is_file()
    target = _largest_file(work / "checkpoints" / str(STEPS))
    data = bytearray(target.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 400] = bytes(b ^ 0xFF for b in data[mid:mid + 400])
    target.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match=rf"checkpoint step {STEPS} in .* is damaged: .* differs from"):
        load_run(str(work))
    rel = target.relative_to(work / "checkpoints" / str(STEPS))
    r = subprocess.run([sys.executable, "-m", "iclm_jax.eval_main", "--workdir", str(work), "--data", "x.json"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and f"is damaged: {rel} differs" in r.stderr, r.stderr[-2000:]
    r = _run(tmp_path / "child", f"--config.init_from={work}")       # a new run starting from it: refused
    assert r.returncode == 2 and f"is damaged: {rel} differs" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = _run(work, "--config.checkpoint.every=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"restored step {STEPS - 1} instead" in r.stderr and f"resuming from step {STEPS - 1}" in r.stderr
    assert len(list((work / "corrupt_checkpoints").iterdir())) == 1      # kept aside, not deleted
    assert _losses(work) == _losses(reference_run)
    _assert_same_state(_final_state(work), _final_state(reference_run))

    cut = _copy_run(reference_run, tmp_path / "cut")                 # truncated, and no record to catch it
    target = cut / "checkpoints" / str(STEPS) / rel
    target.write_bytes(target.read_bytes()[:100])
    os.remove(cut / ".checkpoints_integrity" / f"{STEPS}.json")
    with pytest.raises(CorruptCheckpoint, match=rf"checkpoint step {STEPS} in .* could not be read"):
        load_run(str(cut))
    # orbax leaves the failed read's coroutines unawaited: collected here, not as ~100 warnings in the next test
    gc.collect()


@pytest.mark.slow
def test_resume_message_names_the_finalized_step(reference_run, tmp_path):
    work = _copy_run(reference_run, tmp_path)
    ckpts = work / "checkpoints"
    shutil.rmtree(ckpts / str(STEPS))                      # keep=3: steps 12, 13, 14 exist
    os.rename(ckpts / str(STEPS - 1), ckpts / f"{STEPS - 1}.orbax-checkpoint-tmp-99")
    cmd = [c for c in _cmd(work, "--config.checkpoint.every=1") if c != "--quiet"]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from step {STEPS - 2}: the latest finalized checkpoint" in r.stderr


@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_with_documented_status(reference_run, tmp_path):
    from iclm_jax.train.preemption import EXIT_PREEMPTED
    work = tmp_path / "run"
    proc = _start(work, "--config.checkpoint.every=1000")        # no periodic saves: SIGTERM's own
    _wait_for_steps(proc, work, 4)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr.read()[-2000:]
    saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and saved[0] >= 4
    assert max(_losses(work)) >= saved[0]
    r = _run(work, "--config.checkpoint.every=1000")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(work) == _losses(reference_run)
    _assert_same_state(_final_state(work), _final_state(reference_run))


@pytest.mark.slow
def test_sigterm_on_a_periodic_save_step_exits_143_and_resumes_exactly(reference_run, tmp_path):
    """checkpoint.every=1: the notice always lands on a step that was just saved (it used to exit 2 with
    orbax's StepAlreadyExistsError)."""
    from iclm_jax.train.preemption import EXIT_PREEMPTED
    work = tmp_path / "run"
    proc = _start(work, "--config.checkpoint.every=1")
    _wait_for_steps(proc, work, 4)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    err = proc.stderr.read()
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "preemption notice: saved step" in err and "Error" not in err
    r = _run(work, "--config.checkpoint.every=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(work) == _losses(reference_run)
    _assert_same_state(_final_state(work), _final_state(reference_run))


@pytest.mark.slow
def test_a_second_writer_on_a_workdir_is_refused_while_the_first_trains(tmp_path):
    """Two real processes on one workdir: the second exits 2 naming the first; the first finishes alone."""
    work = tmp_path / "run"
    first = _start(work, "--config.checkpoint.every=1", "--config.train.steps=40")
    _wait_for_steps(first, work, 2)
    second = _run(work, "--config.checkpoint.every=1", "--config.train.steps=40")
    assert second.returncode == 2, second.stderr[-2000:]
    line = second.stderr.strip().splitlines()[-1]
    assert f"is in use by another run (pid {first.pid} on " in line and "WorkdirBusy" in line
    first.wait(timeout=600)
    assert first.returncode == 0, first.stderr.read()[-2000:]
    steps = [json.loads(x)["step"] for x in open(work / "metrics.jsonl") if json.loads(x)["split"] == "train"]
    assert steps == list(range(1, 41))                      # no duplicated steps from a second writer
    r = _run(work, "--config.checkpoint.every=1", "--config.train.steps=40")   # the lock is free again
    assert r.returncode == 0, r.stderr[-2000:]


_LAST_STEP_SCRIPT = """
import json, os, sys
sys.path.insert(0, os.getcwd())
from iclm_jax.train import loop
from tests.test_step import acre_cfg
c = acre_cfg.get_config()
for flag in json.loads(sys.argv[2]):
    field, value = flag.removeprefix("--config.").split("=")
    group, name = field.split(".")
    c[group][name] = type(c[group][name])(value)
c.train.steps, c.checkpoint.every = 3, 1
loop.PreemptionWatcher.should_stop = lambda self, step, mngr=None: step == 3
try:
    loop.train(c, sys.argv[1], quiet=True)
except loop.Preempted as e:
    first = {"step": e.step, "code": e.code, "ckpts": sorted(os.listdir(os.path.join(sys.argv[1], "checkpoints"))),
             "summary": os.path.exists(os.path.join(sys.argv[1], "summary.json"))}
summary = loop.train(c, sys.argv[1], quiet=True)
print(json.dumps({"first": first, "resumed_from": summary["resumed_from"], "steps": summary["steps"],
                  "evals": sorted(summary["eval"])}))
"""


@pytest.mark.slow
def test_sigterm_on_the_last_step_saves_it_and_the_rerun_only_evaluates(tmp_path):
    """A notice on the last step saves it and exits 143; rerunning evaluates and writes the summary. (A
    process of its own: two in-process runs in a long-lived pytest worker once aborted inside XLA.)"""
    flags = [f for f in TINY if f.startswith("--config.")]
    r = subprocess.run([sys.executable, "-c", _LAST_STEP_SCRIPT, str(tmp_path / "run"), json.dumps(flags)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["first"] == {"step": 3, "code": 143, "ckpts": ["1", "2", "3"], "summary": False}
    assert out["resumed_from"] == 3 and out["steps"] == 3 and out["evals"] == ["IID"]
    assert (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_nonfinite_stops_naming_step_and_term_and_keeps_last_good_checkpoint(tmp_path):
    work = tmp_path / "run"
    r = _run(work, "--config.train.lr=1e6", "--config.train.grad_clip=0", "--config.checkpoint.every=1")
    assert r.returncode == 3, r.stderr[-3000:]
    line = [x for x in r.stderr.splitlines() if "NonFiniteError" in x][0]
    step = int(line.split("step ")[1].split(":")[0])
    assert "non-finite" in line and any(t in line for t in ("ce", "vq", "mi", "aux", "grad_norm"))
    saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] == step - 1
    assert "Traceback" not in r.stderr

    skip = tmp_path / "skip"                                     # skipping without a limit: runs to the end
    r = _run(skip, "--config.train.lr=1e6", "--config.train.grad_clip=0", "--config.train.nonfinite=skip",
             "--config.train.skip_limit=1.0")
    assert r.returncode == 0, r.stderr[-3000:]
    last = [json.loads(x) for x in open(skip / "metrics.jsonl") if '"train"' in x][-1]
    assert last["skipped_steps"] >= 1
    limited = tmp_path / "limited"                               # the default limit: stops, naming the terms
    r = _run(limited, "--config.train.lr=1e6", "--config.train.grad_clip=0", "--config.train.nonfinite=skip")
    assert r.returncode == 3, r.stderr[-3000:]
    line = [x for x in r.stderr.splitlines() if "NonFiniteError" in x][0]
    assert "steps were skipped (non-finite " in line and "above train.skip_limit=0.5" in line, line
    assert "Traceback" not in r.stderr


def test_unwritable_workdir_is_refused_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = _run(blocker / "run")
    assert r.returncode == 2
    assert "is not writable" in r.stderr and "Traceback" not in r.stderr


def test_full_disk_is_refused_before_training_and_before_a_save(tmp_path, monkeypatch):
    from iclm_jax.train import disk_space
    monkeypatch.setattr(disk_space, "free_mib", lambda p: 1.0)
    with pytest.raises(disk_space.DiskFull, match=r"1.0 MiB free, checkpoints need about 4\.2 MiB \(4 x 1\.1"):
        disk_space.check_before_training(str(tmp_path), 2**19, 3)                  # 4 x (0.55 + 0.5)
    with pytest.raises(disk_space.DiskFull, match=r"saving step 7 to .* needs about 1\.6 MiB, 1\.0 MiB free; "
                                                   r"the last finalized checkpoint \(step 5\) is intact"):
        disk_space.check_before_save(str(tmp_path), 2**20, 7, [4, 5])
    disk_space.check_before_save(str(tmp_path), 2**19 // 2, 7, [])      # 0.8 MiB fits in 1.0


def test_a_full_disk_is_recognised_in_each_shape_it_takes(tmp_path):
    """Our own files raise OSError ENOSPC (with or without a file name); orbax/tensorstore a ValueError
    whose text names the file; a wrapper keeps the cause. Anything else is not a full disk."""
    import errno

    from iclm_jax.train.disk_space import as_disk_full
    orbax = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/2.orbax-checkpoint-tmp/'
                       'state/_sharding": Failed writing: "/w/x.__lock": No space left on device '
                       "[os_error_code='28']")
    full = as_disk_full(orbax, str(tmp_path), [1])
    assert str(full).startswith("disk full: writing /w/checkpoints/2.orbax-checkpoint-tmp/state/_sharding failed, ")
    assert "MiB free; the last finalized checkpoint (step 1) is intact" in str(full)
    mine = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    assert f"writing {tmp_path / 'metrics.jsonl'} failed" in str(as_disk_full(mine, str(tmp_path), []))
    assert "no checkpoint was finalized yet" in str(as_disk_full(mine, str(tmp_path), []))
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as e:
            raise RuntimeError("saving failed") from e
    except RuntimeError as wrapped:
        assert f"a write under {tmp_path} failed" in str(as_disk_full(wrapped, str(tmp_path), [3]))
    assert as_disk_full(ValueError("RESOURCE_EXHAUSTED: out of memory"), str(tmp_path), []) is None
    assert as_disk_full(OSError(errno.EACCES, "Permission denied"), str(tmp_path), []) is None


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MiB filesystem (tmpfs), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"no real small filesystem here (mount: {r.stderr.strip()}); the shapes a full disk takes "
                    "are covered by test_a_full_disk_is_recognised_in_each_shape_it_takes")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(path) -> None:
    """Write zeros to ``path`` until its filesystem is full (printing what else is on it, for a failure)."""
    print(subprocess.run(["du", "-a", os.path.dirname(path)], capture_output=True, text=True).stdout)
    try:
        with open(path, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    except OSError as e:
        print(f"filled: {e}")


@pytest.mark.slow
def test_a_disk_filling_up_mid_run_ends_it_in_one_line_and_the_rerun_resumes(small_disk):
    """A real full filesystem mid-run: exit 4 within seconds with one line naming the file, the free space
    and the intact step; a rerun on the still-full disk is refused the same way; after freeing space the
    rerun resumes from that step and finishes."""
    work, filler = small_disk / "run", small_disk / "filler"
    first = _start(work, "--config.checkpoint.every=1", "--config.train.steps=2000")
    try:
        _wait_for_steps(first, work, 3)
        _fill(filler)
        t0 = time.time()
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert time.time() - t0 < 60, "a full disk must end the run promptly"
    assert first.returncode == 4, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iclm-train: DiskFull: disk full: "), err[-3000:]
    assert f"{work}" in lines[0] and "MiB free; the last finalized checkpoint (step " in lines[0]
    step = int(lines[0].split("(step ")[1].split(")")[0])
    assert (work / "checkpoints" / str(step)).is_dir()

    again = _run(work, "--config.checkpoint.every=1", f"--config.train.steps={step + 3}")
    assert again.returncode == 4, again.stderr[-3000:]
    assert again.stderr.strip().startswith("iclm-train: DiskFull: ") and len(again.stderr.strip().splitlines()) == 1
    assert "MiB free" in again.stderr

    filler.unlink(missing_ok=True)
    done = _run(work, "--config.checkpoint.every=1", f"--config.train.steps={step + 3}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from step {step}: " in done.stderr
    summary = json.loads((work / "summary.json").read_text())
    assert summary["resumed_from"] == step and summary["steps"] == step + 3


@pytest.mark.slow
def test_incompatible_resume_config_names_each_field(reference_run, tmp_path):
    work = _copy_run(reference_run, tmp_path)
    r = _run(work, "--config.model.num_modules=3", "--config.lora.rank=4", "--config.model.rope_theta=500000")
    assert r.returncode == 2
    assert "model.num_modules: checkpoint has 2, config has 3" in r.stderr
    assert "lora.rank: checkpoint has 2, config has 4" in r.stderr
    assert "model.rope_theta: checkpoint has 10000.0, config has 500000.0" in r.stderr   # not just shapes
    os.remove(work / "config.json")
    r = _run(work)
    assert r.returncode == 2 and "config.json: missing, but the workdir holds checkpoints" in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr


@pytest.mark.slow
def test_init_from_copies_parameters_and_best_checkpoint_is_kept(reference_run, tmp_path):
    work = tmp_path / "run"
    r = _run(work, f"--config.init_from={reference_run}", "--config.train.lr=1e-12",
             "--config.eval.every=5", "--config.checkpoint.best_metric=IID/all")
    assert r.returncode == 0, r.stderr[-3000:]
    import jax
    a = _final_state(reference_run)["state"]["model"]
    b = _final_state(work)["state"]["model"]
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)):
        if "rng" in str(path).lower() or "router" in str(path) or np.asarray(x).dtype.kind not in "f":
            continue      # RNG streams and the router's EMA statistics move whatever the lr
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, err_msg=str(path))
    best = [p.name for p in (work / "best").iterdir() if p.name.isdigit()]
    assert len(best) == 1


def _tree(work):
    """Every file under ``work`` (lock files aside) -> (size, mtime_ns, sha256)."""
    import hashlib
    out = {}
    for p in sorted(work.rglob("*")):
        if p.is_file() and p.name != ".lock":
            st = p.stat()
            out[str(p.relative_to(work))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.mark.slow
def test_rerunning_a_finished_run_touches_nothing_and_more_steps_continue_it(reference_run, tmp_path):
    """issue `newcomer`: the same command on a finished run says so and exits 0 without loading, evaluating
    or writing anything; a larger train.steps continues it from its last step."""
    work = _copy_run(reference_run, tmp_path)
    before = _tree(work)
    r = _run(work, "--config.checkpoint.every=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"already finished at step {STEPS} (train.steps={STEPS})" in r.stderr, r.stderr[-2000:]
    assert _tree(work) == before
    r = _run(work, "--config.checkpoint.every=1", f"--config.train.steps={STEPS + 2}")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["resumed_from"] == STEPS and summary["steps"] == STEPS + 2
