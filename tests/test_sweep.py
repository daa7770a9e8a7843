"""Sweeps: points from get_sweep, the local launcher (runs, resumes after a kill, skips finished points),
collect's numbers against the points' own summaries, and the SLURM / TPU dry runs as valid bash."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from iclm_jax.sweep import points
from iclm_jax.sweep.__main__ import main as sweep_main
from tests.xla_env import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_CONFIG = f'''
import importlib.util
spec = importlib.util.spec_from_file_location("acre_base", {os.path.join(REPO, "experiments", "configs", "acre.py")!r})
acre = importlib.util.module_from_spec(spec)
spec.loader.exec_module(acre)


def get_config(arg=""):
    c = acre.get_config(arg or "demo")
    c.model.update(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32)
    c.lora.rank, c.mi.critic_hidden = 2, 16
    c.train.update(steps=STEPS, warmup_steps=2, log_every=1, batch_size=4)
    c.eval.batch_size = 8
    c.data.update(train_problems=24, eval_problems=4, eval_splits="IID,Sys")
    c.checkpoint.every = 1
    c.mesh.data = 1
    return c


def get_sweep(arg=""):
    return [{{"variant": v, "seed": s}} for v in ("iclm", "baseline") for s in (0, 1)]
'''


def _config(tmp_path, steps=6) -> str:
    path = tmp_path / "tiny.py"
    path.write_text(TINY_CONFIG.replace("STEPS", str(steps)))
    return str(path)


def _env():
    return dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")    # the sweep's own compilation cache


def test_points_are_named_grouped_and_checked_against_the_config(tmp_path):
    cfg = _config(tmp_path)
    pts = points.load(f"{cfg}:demo")
    assert [p.name for p in pts] == ["variant=iclm,seed=0", "variant=iclm,seed=1", "variant=baseline,seed=0",
                                     "variant=baseline,seed=1"]
    assert [p.group for p in pts] == ["variant=iclm", "variant=iclm", "variant=baseline", "variant=baseline"]
    assert pts[3].train_args(str(tmp_path / "sw")) == [
        f"--config={cfg}:demo,baseline", f"--workdir={tmp_path / 'sw' / 'variant=baseline,seed=1'}", "--config.seed=1"]
    assert [p.name for p in points.select(pts, "baseline")] == ["variant=baseline,seed=0", "variant=baseline,seed=1"]
    quick = points.load(f"{cfg}:demo", ("train.steps=2", "data.eval_splits=IID"))     # --set: after the point's own
    assert quick[3].train_args("sw")[2:] == ["--config.seed=1", "--config.train.steps=2",
                                             "--config.data.eval_splits=IID"]
    assert quick[3].name == pts[3].name
    for extra, message in [(("train.stepz=2",), r"--set=train.stepz=2: no such config field 'train.stepz'"),
                           (("train.steps",), r"--set='train.steps': expected FIELD=VALUE")]:
        with pytest.raises(points.SweepError, match=message):
            points.load(f"{cfg}:demo", extra)
    with pytest.raises(points.SweepError, match="matches none of the 4 points"):
        points.select(pts, "nothing")
    bad = tmp_path / "bad.py"
    for sweep, message in [('[{"model.nope": 1}]', r"point 0: no such config field 'model.nope'"),
                           ('[{"model": 1}]', r"'model' is a config group"),
                           ('[{"train.steps": "many"}]', r"train.steps='many' is a str, the field is a int"),
                           ('[{"seed": 1}, {"seed": 1}]', r"points 0 and 1 are the same \(seed=1\)"),
                           ('[{"variant": "nope"}]', r"get_config\('nope'\) failed: unknown config variant"),
                           ("[]", r"must return a non-empty list of dicts")]:
        head = TINY_CONFIG.split("def get_sweep")[0].replace("STEPS", "6")
        bad.write_text(head + f"def get_sweep(arg=''):\n    return {sweep}\n")
        with pytest.raises(points.SweepError, match=message):
            points.load(str(bad))


def test_slurm_and_tpu_dry_runs_write_valid_bash_that_dispatches_each_point(tmp_path, capsys):
    cfg, work = _config(tmp_path), tmp_path / "sw"
    assert sweep_main([f"--config={cfg}", f"--workdir={work}", "--launcher=slurm", "--dry-run",
                       "--sbatch=--nodes=1", "--only=seed=1"]) == 0
    script = work / "sweep.sbatch"
    text = script.read_text()
    assert "#SBATCH --array=0-1\n" in text and "#SBATCH --nodes=1\n" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    fake = tmp_path / "repo" / "launch"                          # launch/slurm.sbatch that echoes its args
    fake.mkdir(parents=True)
    (fake / "slurm.sbatch").write_text('printf "%s\\n" "$@"\n')
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="1", REPO=str(tmp_path / "repo"))
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"--config={cfg}:baseline", f"--workdir={work / 'variant=baseline,seed=1'}",
                                     "--config.seed=1"]
    r = subprocess.run(["bash", str(script)], env=dict(os.environ, SLURM_ARRAY_TASK_ID="2"), capture_output=True,
                       text=True)
    assert r.returncode == 64 and "no point 2" in r.stderr
    capsys.readouterr()
    assert sweep_main([f"--config={cfg}", f"--workdir={work}", "--launcher=tpu", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    assert len(lines) == 4 and all("launch/tpu_pod.sh --config=" in x for x in lines)
    for line in lines:
        assert subprocess.run(["bash", "-n", "-c", line]).returncode == 0


def test_bad_sweep_command_lines_are_one_line_and_exit_2(tmp_path):
    for args, message in [(["--workdir=x"], "the following arguments are required: --config"),
                          ([f"--config={tmp_path}/none.py", "--workdir=x"], "none.py: no such config file"),
                          ([f"--config={_config(tmp_path)}", "--workdir=x", "--launcher=k8s"], "invalid choice: 'k8s'"),
                          (["collect", str(tmp_path)], "not a sweep directory")]:
        r = subprocess.run([sys.executable, "-m", "iclm_jax.sweep", *args], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_collect_lists_the_reference_predictors_its_points_measured(tmp_path):
    """RAVEN points report the majority letter and the best single attribute (no object count): the table and
    results.csv carry those two."""
    from iclm_jax.sweep.collect import collect
    work = tmp_path / "sw"
    (work / "p0").mkdir(parents=True)
    (work / "sweep.json").write_text(json.dumps({"config": "raven.py", "command": "x", "points": [
        {"name": "variant=iclm,seed=0", "dirname": "p0", "group": "variant=iclm", "seed": 0}]}))
    (work / "p0" / "summary.json").write_text(json.dumps({"steps": 6, "train_s": 1.0, "eval": {
        "center_single": {"all": 0.9}, "distribute_four": {"all": 0.0}}, "reference": {
        "center_single": {"majority": {"all": 0.107}, "best_attribute": {"all": 0.25}},
        "distribute_four": {"majority": {"all": 0.13}, "best_attribute": {"all": 0.23}}}}))
    collect(str(work))
    md = (work / "results.md").read_text()
    assert "| *best_attribute predictor* | 25.0 (n=1) | 23.0 (n=1) |" in md and "object_count" not in md
    assert "| *majority predictor* | 10.7 (n=1) | 13.0 (n=1) |" in md and "single-attribute" in md
    header = (work / "results.csv").read_text().splitlines()[0].split(",")
    assert "best_attribute" in header and "object_count" not in header


def test_collect_means_and_stds_equal_numpy_and_unfinished_points_are_listed(tmp_path):
    """collect against numpy on summaries with known numbers (one point unfinished, one module: no purity)."""
    from iclm_jax.sweep.collect import collect
    cfg, work = _config(tmp_path), tmp_path / "sw"
    pts = points.load(cfg)
    (work).mkdir()
    (work / "sweep.json").write_text(json.dumps({"config": cfg, "command": "x", "points": [
        {"name": p.name, "dirname": p.dirname, "group": p.group, "seed": p.seed} for p in pts]}))
    acc = {("iclm", 0): 0.5, ("iclm", 1): 0.75, ("baseline", 0): 0.25}       # baseline seed 1 unfinished
    for (v, s), a in acc.items():
        d = work / f"variant={v},seed={s}"
        d.mkdir()
        rows = {"module_0_rows": 8} | ({"module_1_rows": 8, "purity": 0.9} if v == "iclm" else {"purity": 1.0})
        ind = {"independence": {"router_nmi": a / 4}, "domain_symbolic": a, "domain_text": a / 2,
               "views": {"model (router)": {"all": a}, "specific 0 alone": {"all": a / 4}}} if v == "iclm" else {}
        (d / "summary.json").write_text(json.dumps({"steps": 6, "train_s": 1.0, "eval": {
            "IID": {"all": a, "answer_ce": 1.0, **rows, **ind}, "Sys": {"all": a / 2, "answer_ce": 1.0, **rows}},
            "reference": {"IID": {"majority": {"all": 0.4}, "object_count": {"all": 0.45}}}}))
    out = collect(str(work))
    assert out["missing"] == ["variant=baseline,seed=1"]
    m, sd, n = out["groups"]["variant=iclm"]["Sys"]
    assert n == 2 and m == pytest.approx(np.mean([0.25, 0.375])) and sd == pytest.approx(np.std([0.25, 0.375], ddof=1))
    assert out["groups"]["variant=baseline"]["IID"][0] == 0.25 and out["groups"]["variant=baseline"]["IID"][2] == 1
    md = (work / "results.md").read_text()
    assert "| variant=iclm | 62.5 ± 17.7 (n=2) | 31.2 ± 8.8 (n=2) |" in md
    assert "| variant=baseline | 25.0 (n=1) | 12.5 (n=1) |" in md
    assert "| *majority predictor* | 40.0 ± 0.0 (n=3) | - |" in md and "Not finished: variant=baseline,seed=1" in md
    assert "| *object_count predictor* | 45.0 ± 0.0 (n=3) | - |" in md and "best_attribute" not in md   # ACRE's two
    assert "| variant=iclm | IID | 0.156 ± 0.044 (n=2) |" in md and "| variant=baseline | IID | - |" in md
    assert "| variant=iclm | IID | 62.5 ± 17.7 (n=2) | 31.2 ± 8.8 (n=2) |" in md      # per rendering
    assert "| variant=iclm | IID | 62.5 ± 17.7 (n=2) | 15.6 ± 4.4 (n=2) |" in md      # per module view
    assert "| variant=baseline | IID | - | - |" not in md                            # no such numbers: no row
    assert "Summed over the finished points: 0.00 h of training" in md and "cores, jax" in md
    assert "Wall time:" not in md                                   # no start/end times recorded: no claim
    from iclm_jax.sweep.__main__ import main
    assert main(["collect", str(work), "--out", str(tmp_path / "res" / "table.md")]) == 0
    assert (tmp_path / "res" / "table.md").read_text() == md
    purity = {r["point"]: r["purity"] for r in out["rows"] if r["split"] == "IID"}
    assert purity == {"variant=iclm,seed=0": 0.9, "variant=iclm,seed=1": 0.9, "variant=baseline,seed=0": None}


def test_union_seconds_equals_a_count_of_covered_seconds():
    """The union of intervals against counting the covered unit cells one by one (integer endpoints)."""
    from iclm_jax.sweep.collect import union_seconds
    rng = np.random.default_rng(0)
    for _ in range(50):
        spans = [tuple(sorted(rng.integers(0, 60, 2))) for _ in range(rng.integers(0, 6))]
        cells = {t for a, b in spans for t in range(a, b)}
        assert union_seconds(spans) == len(cells)
    assert union_seconds([(0, 10), (5, 12), (100, 101)]) == 13       # side by side once, the gap not at all


def test_collect_reports_the_wall_time_of_points_side_by_side_and_of_interventions(tmp_path, monkeypatch):
    """Two points trained at once (overlapping start/end times), a third in a later sitting, and two
    intervention reports: the wall line is the union of each kind's times, the sums stay the sums."""
    from iclm_jax.sweep.collect import collect
    cfg, work = _config(tmp_path), tmp_path / "sw"
    pts = points.load(cfg)
    work.mkdir()
    (work / "sweep.json").write_text(json.dumps({"config": cfg, "command": "x", "points": [
        {"name": p.name, "dirname": p.dirname, "group": p.group, "seed": p.seed} for p in pts]}))
    spans = {"variant=baseline,seed=0": (0, 1800), "variant=baseline,seed=1": (0, 3600),
             "variant=iclm,seed=0": (10_000, 13_600)}
    for name, (a, b) in spans.items():
        (work / name).mkdir()
        (work / name / "summary.json").write_text(json.dumps({
            "steps": 6, "train_s": b - a, "setup_s": 0, "train_wall_s": b - a, "started_at": 1e9 + a,
            "finished_at": 1e9 + b, "eval": {"IID": {"all": 0.5, "answer_ce": 1.0, "module_0_rows": 8}}}))
    from iclm_jax.sweep import intervention_table  # two reports' times; their tables are tested elsewhere
    monkeypatch.setattr(intervention_table, "load", lambda w, s: {"variant=iclm": [
        {"point": "a", "interval": (2e9, 2e9 + 900)}, {"point": "b", "interval": (2e9 + 600, 2e9 + 1800)}]})
    monkeypatch.setattr(intervention_table, "markdown", lambda groups: [])
    monkeypatch.setattr(intervention_table, "plot", lambda workdir, groups: None)
    collect(str(work))
    md = (work / "results.md").read_text()
    assert "Wall time: 2.00 h training the points + 0.50 h of interventions" in md
    assert "Summed over the finished points: 2.50 h of training" in md
    assert "without start/end times" not in md


@pytest.mark.slow
def test_local_sweep_runs_resumes_after_a_kill_skips_finished_points_and_collects(tmp_path):
    """A 2 x 2 sweep killed (-9) while its second point trains; the rerun skips the first, resumes the second
    from its checkpoint and runs the rest; collect's means and stds equal the points' own summaries."""
    cfg, work = _config(tmp_path, steps=12), tmp_path / "sw"
    cmd = [sys.executable, "-m", "iclm_jax.sweep", f"--config={cfg}", f"--workdir={work}"]
    first = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    second = work / "variant=iclm,seed=1" / "checkpoints"
    t0 = time.time()
    while not (second.is_dir() and any(p.name.isdigit() and int(p.name) >= 2 for p in second.iterdir())):
        assert first.poll() is None, first.stdout.read()
        assert time.time() - t0 < 600, "the second point never saved a checkpoint"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)                          # the sweep and its training process
    first.wait()
    assert (work / "variant=iclm,seed=0" / "summary.json").is_file()
    assert not (work / "variant=iclm,seed=1" / "summary.json").exists()

    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert "[1/4] variant=iclm,seed=0: finished, skipped" in lines
    assert any(x.startswith("[2/4] variant=iclm,seed=1: done in ") for x in lines)
    log = (work / "variant=iclm,seed=1" / "train.log").read_text()
    assert "resuming from step " in log
    again = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("finished, skipped") == 4
    # The points share a persistent compilation cache under the sweep's workdir; a point trained again from
    # the warm cache logs the same losses as when it compiled its own steps.
    assert any((work / "xla_cache").iterdir())
    point = work / "variant=baseline,seed=1"

    def losses():
        return [r["loss"] for r in map(json.loads, (point / "metrics.jsonl").read_text().splitlines())
                if r["split"] == "train"]
    before = losses()
    os.rename(point, tmp_path / "moved")
    redo = subprocess.run(cmd + ["--only=baseline,seed=1"], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert redo.returncode == 0, redo.stdout[-3000:] + redo.stderr[-3000:]
    assert len(before) == 12 and losses() == before

    r = subprocess.run([sys.executable, "-m", "iclm_jax.sweep", "collect", str(work)], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summaries = {p: json.loads((work / p / "summary.json").read_text()) for p in os.listdir(work)
                 if (work / p / "summary.json").is_file()}
    md = (work / "results.md").read_text()
    for variant in ("iclm", "baseline"):
        for split in ("IID", "Sys"):
            accs = [summaries[f"variant={variant},seed={s}"]["eval"][split]["all"] for s in (0, 1)]
            cell = f"{100 * np.mean(accs):.1f} ± {100 * np.std(accs, ddof=1):.1f} (n=2)"
            row = next(x for x in md.splitlines() if x.startswith(f"| variant={variant} |"))
            assert cell in row, (cell, row)
    csv_rows = (work / "results.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 4 * 2
    assert (work / "results.png").stat().st_size > 10_000


def test_core_slices_split_the_cores_and_refuse_more_jobs_than_cores():
    from iclm_jax.sweep.launchers import core_slices
    assert core_slices(2, {0, 1}) == [[0], [1]]
    assert core_slices(3, range(8)) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert core_slices(1, {3, 5}) == [[3, 5]]
    with pytest.raises(ValueError, match=r"--jobs=3: only 2 CPU cores here, so at most 2 points at once"):
        core_slices(3, {0, 1})
    with pytest.raises(ValueError, match=r"--jobs=0: expected an integer >= 1"):
        core_slices(0, {0, 1})


def test_jobs_is_refused_in_one_line_where_it_cannot_run(tmp_path):
    cfg = _config(tmp_path)
    for args, message in [([f"--jobs={os.cpu_count() + 1}"], "CPU cores here, so at most"),
                          (["--jobs=2", "--launcher=tpu"], "--jobs=2 is for --launcher=local")]:
        r = subprocess.run([sys.executable, "-m", "iclm_jax.sweep", f"--config={cfg}", f"--workdir={tmp_path / 'w'}",
                            *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_two_jobs_train_points_at_once_on_their_own_cores_with_the_sequential_results(tmp_path):
    """``--jobs=2``: the two points start before either finishes, each on one core, and log the losses the
    same points log when the sweep trains them one after the other. Needs two cores, as CI's machine has."""
    assert len(os.sched_getaffinity(0)) >= 2, "this test pins two points to two different cores"
    cfg = _config(tmp_path, steps=6)
    logs = {}
    for jobs in (1, 2):
        work = tmp_path / f"jobs{jobs}"
        r = subprocess.run([sys.executable, "-m", "iclm_jax.sweep", f"--config={cfg}", f"--workdir={work}",
                            "--only=seed=0", f"--jobs={jobs}"], cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        logs[jobs] = r.stdout.splitlines()
        for name in ("variant=iclm,seed=0", "variant=baseline,seed=0"):
            rows = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
            logs[(jobs, name)] = [x["loss"] for x in rows if x["split"] == "train"]
    started = [i for i, x in enumerate(logs[2]) if ": started on cores " in x]
    done = [i for i, x in enumerate(logs[2]) if ": done in " in x]
    assert len(started) == 2 and len(done) == 2 and max(started) < min(done), logs[2]
    cores = [logs[2][i].rsplit(" ", 1)[1] for i in started]
    assert len(set(cores)) == 2
    assert not any("started on cores" in x for x in logs[1])
    for name in ("variant=iclm,seed=0", "variant=baseline,seed=0"):
        assert len(logs[(1, name)]) == 6 and logs[(2, name)] == logs[(1, name)], name
