"""Interventions over a sweep (``iclm-sweep intervene``, ``sweep/intervention_table.py``).

A loaded run's eval sets are checked against the training build's own sets. The sweep command is run on
random tiny runs: its unintervened row must equal ``Run.evaluate`` on the same set, a one-module point is
skipped with its reason, and a rerun skips the points done. ``collect``'s intervention tables are checked
against a hand computation (NumPy) from known counts, with module numbers that differ between seeds.
"""
import json
import re
import time

import numpy as np
import pytest

from iclm_jax.data import sources
from iclm_jax.sweep.__main__ import main as sweep_main
from iclm_jax.sweep.collect import collect
from iclm_jax.train.run import load_run
from tests.helpers import write_random_run
from tests.test_generate_score import _config as tiny_config


def _tiny(k: int = 2, seed: int = 0):
    c = tiny_config()
    c.seed = seed
    c.model.num_modules = k
    c.data.update(eval_splits="IID,Sys", eval_problems=3, val_problems=2)
    if k == 1:
        c.model.invariant, c.mi.estimator = False, "none"
    return c


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A sweep directory: two seeds of a K = 2 ICLM (random models, nonzero adapters) and a K = 1 point."""
    work = tmp_path_factory.mktemp("swiv") / "sw"
    pts = []
    for name, k, seed in (("variant=iclm,seed=0", 2, 0), ("variant=iclm,seed=1", 2, 1),
                          ("variant=baseline,seed=0", 1, 0)):
        d = work / name
        d.mkdir(parents=True)
        write_random_run(d, _tiny(k, seed))
        (d / "summary.json").write_text(json.dumps({"steps": 1, "eval": {}}))
        pts.append({"name": name, "dirname": name, "group": name.rsplit(",", 1)[0], "seed": seed})
    (work / "sweep.json").write_text(json.dumps({"config": "tiny", "command": "x", "points": pts}))
    return work


def test_a_loaded_runs_eval_sets_are_the_training_builds(tiny_sweep):
    """``LoadedRun.eval_sets`` makes the sets again with the run's seeds: the same examples, in order."""
    path = tiny_sweep / "variant=iclm,seed=1"
    run = load_run(str(path))
    built = sources.build(run.config.data, run.config.seed).eval_sets
    again = run.eval_sets()
    assert [e.name for e in again] == [e.name for e in built] == ["val", "IID", "Sys"]
    for a, b in zip(again, built):
        assert a.examples == b.examples and a.problems == b.problems
    assert [e.name for e in run.eval_sets(only=["Sys"])] == ["Sys"]


def test_sweep_intervene_matches_the_runs_own_eval_skips_one_module_and_resumes(tiny_sweep, capsys):
    assert sweep_main(["intervene", str(tiny_sweep)]) == 0
    out = capsys.readouterr().out
    assert "[3/3] variant=baseline,seed=0: skipped (1 specific module: nothing to route, swap or tell apart)" in out
    for seed in (0, 1):
        path = tiny_sweep / f"variant=iclm,seed={seed}"
        rec = json.loads((path / "interventions" / "interventions.json").read_text())
        assert rec["sets"] == ["IID", "Sys"]                     # the test sets, not the validation set
        assert 0 < rec["started_at"] < rec["finished_at"] <= time.time()     # its time, for the sweep's wall time
        assert (path / "interventions" / "interventions.png").read_bytes()[:4] == b"\x89PNG"
        assert "## Teacher-forced exact match" in (path / "interventions" / "report.md").read_text()
        run = load_run(str(path))
        for es in run.eval_sets(only=["IID", "Sys"]):
            ref = run.evaluate(es.examples)                       # the run's own evaluation path
            hits, n = rec["interventions"]["teacher"]["sets"][es.name]["none"]["groups"]["all"]
            assert n > 0 and hits / n == pytest.approx(ref["all"], abs=1e-12), es.name
            for d in ("text", "symbolic"):
                h, m = rec["interventions"]["teacher"]["sets"][es.name]["none"]["groups"][d]
                assert h / m == pytest.approx(ref[f"domain_{d}"], abs=1e-12), (es.name, d)
    assert sweep_main(["intervene", str(tiny_sweep)]) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 2
    assert sweep_main(["intervene", str(tiny_sweep), "--only=seed=1", "--sets=Sys", "--redo"]) == 0
    rec = json.loads((tiny_sweep / "variant=iclm,seed=1" / "interventions" / "interventions.json").read_text())
    assert rec["sets"] == ["Sys"]
    md = (tiny_sweep / "results.md")
    collect(str(tiny_sweep))
    assert "| variant=iclm | text |" in md.read_text() and (tiny_sweep / "interventions.png").is_file()
    # the fixture's summaries carry no training times: only the interventions' wall time is claimed
    assert re.search(r"Wall time: \d+\.\d\d h of interventions \(", md.read_text())
    assert "; 3 finished points or reports without start/end times are not counted" in md.read_text()


def test_sweep_intervene_refuses_bad_input_in_one_line(tiny_sweep, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sweep_main(["intervene", str(tiny_sweep), "--spec=route=x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--spec" in err and "route=x" in err
    with pytest.raises(SystemExit) as e:
        sweep_main(["intervene", str(tmp_path)])
    assert e.value.code == 2 and "sweep.json" in capsys.readouterr().err
    assert sweep_main(["intervene", str(tiny_sweep), "--only=seed=0", "--sets=Comp", "--redo"]) == 1
    out = capsys.readouterr().out
    assert "FAILED (ValueError: --sets Comp: not an eval set of" in out and "it has: val, IID, Sys" in out


# ---------------------------------------------------------------------------- collect's tables, by hand
def _teacher(own: dict, counts: dict, k: int = 2, invariant: bool = True) -> dict:
    """Teacher results of one set: ``counts[iv] = (hits text, n text, hits symbolic, n symbolic)``."""
    cells = {}
    for iv, c in counts.items():
        cells[iv] = None if c is None else {
            "groups": {"all": [c[0] + c[2], c[1] + c[3]], "text": [c[0], c[1]], "symbolic": [c[2], c[3]]},
            "routed": [0] * k}
    return {"score": "teacher", "num_modules": k, "invariant": invariant, "interventions": list(counts),
            "own": own, "swap": {d: 1 - m for d, m in own.items()}, "sets": {"Sys": cells}}


def _write(work, name, res):
    d = work / name / "interventions"
    d.mkdir(parents=True)
    (d / "interventions.json").write_text(json.dumps({"sets": ["Sys"], "interventions": {"teacher": res}}))


def test_collect_intervention_tables_equal_a_hand_computation(tmp_path):
    work = tmp_path / "sw"
    names = ["variant=iclm,seed=0", "variant=iclm,seed=1", "variant=no_invariant,seed=0"]
    (work).mkdir()
    (work / "sweep.json").write_text(json.dumps({"config": "x", "command": "x", "points": [
        {"name": n, "dirname": n, "group": n.rsplit(",", 1)[0], "seed": 0} for n in names]}))
    n = 100
    # seed 0: text -> module 1, symbolic -> 0. seed 1: the other way round.
    c0 = {"none": (90, n, 80, n), "swap": (60, n, 70, n), "ablate=0": (88, n, 50, n), "ablate=1": (70, n, 79, n),
          "ablate=invariant": (85, n, 75, n), "invariant-only": (50, n, 50, n), "specific-only": (80, n, 70, n)}
    c1 = {"none": (94, n, 84, n), "swap": (64, n, 74, n), "ablate=0": (54, n, 83, n), "ablate=1": (92, n, 60, n),
          "ablate=invariant": (91, n, 81, n), "invariant-only": (56, n, 52, n), "specific-only": (86, n, 74, n)}
    c2 = {"none": (70, n, 70, n), "swap": (65, n, 70, n), "ablate=0": (69, n, 40, n), "ablate=1": (68, n, 71, n),
          "ablate=invariant": None, "invariant-only": None, "specific-only": None}
    _write(work, names[0], _teacher({"text": 1, "symbolic": 0}, c0))
    _write(work, names[1], _teacher({"text": 0, "symbolic": 1}, c1))
    _write(work, names[2], _teacher({"text": 0, "symbolic": 0}, c2, invariant=False))
    out = collect(str(work))
    md = (work / "results.md").read_text()
    rows = {tuple(c.strip() for c in ln.split("|")[1:3]): [c.strip() for c in ln.split("|")[1:-1]]
            for ln in md.splitlines() if ln.startswith("| variant=")}

    def cell(xs, sign=""):
        xs = 100 * np.asarray(xs, float)
        return f"{xs.mean():{sign}.1f} ± {xs.std(ddof=1):.1f} (n=2)"

    def acc(c, iv):
        h1, n1, h2, n2 = c[iv]
        return (h1 + h2) / (n1 + n2)
    first = {k[0]: v for k, v in rows.items() if len(v) == 6 and k[1] not in ("text", "symbolic")}   # table 1
    iclm, noinv = first["variant=iclm"], first["variant=no_invariant"]
    assert iclm[1:] == [cell([acc(c0, iv), acc(c1, iv)]) for iv in
                        ("none", "swap", "ablate=invariant", "invariant-only", "specific-only")]
    assert noinv[1:] == [f"{100 * acc(c2, 'none'):.1f} (n=1)", f"{100 * acc(c2, 'swap'):.1f} (n=1)", "-", "-", "-"]
    # text: its module is 1 in seed 0 and 0 in seed 1. Drops in points on text, on symbolic, and of swap.
    own_t = [(c0["none"][0] - c0["ablate=1"][0]) / n, (c1["none"][0] - c1["ablate=0"][0]) / n]
    other_t = [(c0["none"][2] - c0["ablate=1"][2]) / n, (c1["none"][2] - c1["ablate=0"][2]) / n]
    swap_t = [(c0["none"][0] - c0["swap"][0]) / n, (c1["none"][0] - c1["swap"][0]) / n]
    text = rows["variant=iclm", "text"]
    assert text[2:5] == [cell(own_t, "+"), cell(other_t, "+"), cell(swap_t, "+")]
    assert own_t == [0.20, 0.40] and other_t == [0.01, 0.01]
    assert text[5] == "holds in 2 of 2"
    sym = rows["variant=iclm", "symbolic"]
    own_s = [(c0["none"][2] - c0["ablate=0"][2]) / n, (c1["none"][2] - c1["ablate=1"][2]) / n]
    assert sym[2] == cell(own_s, "+") and sym[5] == "holds in 2 of 2"
    # one module serves both domains: no verdict
    assert rows["variant=no_invariant", "text"][5] == "- (one module serves every domain)"
    assert out["interventions_png"] and (work / "interventions.png").read_bytes()[:4] == b"\x89PNG"
