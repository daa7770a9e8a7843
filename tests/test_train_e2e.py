"""End to end on generated ACRE: CLI training, reports, checkpoint, and iclm-eval on a release-format file."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import one_device_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.d_model=16", "--config.model.n_layers=1", "--config.model.n_heads=2",
        "--config.model.n_kv_heads=1", "--config.model.head_dim=8", "--config.model.mlp_dim=32",
        "--config.lora.rank=2", "--config.mi.critic_hidden=16", "--config.train.steps=12",
        "--config.train.log_every=4", "--config.train.batch_size=8",
        "--config.eval.batch_size=8", "--config.data.train_problems=40", "--config.data.eval_problems=8",
        "--config.mesh.data=1"]


def _run(args, **kw):
    env = one_device_env()
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.mark.slow
def test_cli_train_then_eval(tmp_path):
    work = tmp_path / "run"
    r = _run(["-m", "iclm_jax.main", f"--workdir={work}", "--quiet", *TINY])
    assert r.returncode == 0, r.stderr[-3000:]
    # The config's warmup (25) exceeds the 12 steps: the run warms up over a tenth of them and says so.
    assert "train.warmup_steps=25 exceeds train.steps=12: warming up over 1 steps" in r.stderr
    summary = json.loads((work / "summary.json").read_text())
    assert summary["steps"] == 12
    # the process's start and end (a sweep's wall time): they hold its setup, training and evaluation
    span = summary["finished_at"] - summary["started_at"]
    assert summary["setup_s"] + summary["train_wall_s"] <= span <= time.time() - summary["started_at"]
    assert set(summary["eval"]) == {"IID", "Comp", "Sys"}
    for split, res in summary["eval"].items():
        assert 0.0 <= res["all"] <= 1.0
        assert 0.0 <= res["purity"] <= 1.0
        assert set(summary["reference"][split]) == {"majority", "object_count"}
        views = res["views"]     # per-module rows: as routed, routed by domain, each module alone
        assert set(views) == {"model (router)", "routed by domain", "specific 0 alone", "specific 1 alone",
                              "invariant alone"}
        assert views["model (router)"]["all"] == res["all"] and all(0 <= v["all"] <= 1 for v in views.values())
        ind = res["independence"]     # router vs domain, invariant vs specific, specific vs specific
        assert 0 <= ind["router_nmi"] <= 1 and 0 <= ind["cka_inv_spec"] <= 1 + 1e-9
        assert 0 <= ind["cka_spec0_spec1"] <= 1 + 1e-9 and 0 <= ind["corr_inv_spec"] <= 1
        assert ind["mi_plugin"] >= 0 and np.isfinite(ind["mi_mine"])    # both estimators, held out
        routing = res["matrices"]["routing"]      # every real row counted once, by domain and module
        assert routing["domains"] == ["symbolic", "text"] and len(routing["counts"][0]) == 2
        assert sum(map(sum, routing["counts"])) == sum(res[f"module_{m}_rows"] for m in range(2))
        sim = res["matrices"]["similarity"]
        assert sim["names"] == ["invariant", "routed specific", "specific 0 alone", "specific 1 alone"]
        assert sim["cka"][0][1] == pytest.approx(ind["cka_inv_spec"]) and sim["cka"][2][2] == pytest.approx(1)
        delta = res["matrices"]["delta_similarity"]     # minus the base's pooled state
        assert delta["cka"][0][1] == pytest.approx(ind["cka_inv_spec_delta"])
        assert delta["cka"][2][3] == pytest.approx(ind["cka_spec0_spec1_delta"])
    for png in ("loss.png", "mi.png", "routing.png", "learning_curve.png", "answer_loss.png",
                "routing_confusion.png", "similarity.png"):
        assert (work / png).stat().st_size > 1000
    md = (work / "report.md").read_text()
    assert "## Independence" in md and "![similarity.png](similarity.png)" in md and "MINE DV bound" in md
    lines = (work / "metrics.jsonl").read_text().splitlines()
    train_rows = [json.loads(x) for x in lines if '"split": "train"' in x]
    assert [r["step"] for r in train_rows] == [4, 8, 12]
    assert all("tokens_per_s" in r and "mi" in r and "vq" in r for r in train_rows)
    for r in train_rows:       # honest answer metrics over each log interval (4 steps of 8 rows)
        assert 0.0 <= r["answer_acc"] <= 1.0 and r["answer_ce"] > 0 and r["answer_queries"] >= 32
        typed = sum(r[f"answer_queries/{t}"] for t in ("direct", "indirect", "screen_off", "potential"))
        assert 0 < typed <= r["answer_queries"]
        assert not any(k.startswith("n/") or k == "answer_token_acc" for k in r)
    times = [r["time_s"] for r in train_rows]
    assert times == sorted(times) and times[0] > 0
    eval_rows = [json.loads(x) for x in lines if '"split": "eval/' in x]
    assert {r["split"] for r in eval_rows} == {"eval/IID", "eval/Comp", "eval/Sys"}
    assert all(r["time_s"] >= times[-1] and r["answer_ce"] > 0 for r in eval_rows)
    refs = json.loads((work / "references.json").read_text())
    assert set(refs) == {"IID", "Comp", "Sys", "majority_loss"}
    assert all(v > 0 for v in refs["majority_loss"].values())
    assert any(f.startswith("events") for f in os.listdir(work / "tb"))
    assert (work / "tokenizer" / "tokenizer.json").exists()

    data = tmp_path / "test.json"
    r = _run(["-m", "iclm_jax.data.acre", "generate", "--split", "Sys", "--part", "test", "--n", "6",
              "--seed", "5", "--out", str(data)])
    assert r.returncode == 0, r.stderr[-2000:]
    from iclm_jax.data import acre, jsonl, pipeline
    as_jsonl = tmp_path / "test.jsonl"                     # the same problems as evals JSONL (text rendering)
    jsonl.write_jsonl(pipeline.acre_examples(acre.load_problems(data), styles=("text",)), as_jsonl)
    out = tmp_path / "eval.json"
    r = _run(["-m", "iclm_jax.eval_main", "--workdir", str(work), "--data", str(data), "--data", str(as_jsonl),
              "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads(out.read_text())                  # --out: the printed numbers, as JSON
    assert sorted(saved["teacher"]) == ["test.json", "test.jsonl"] and saved["step"] > 0
    acc = saved["teacher"]["test.json"]["all"]
    assert f"{100 * acc:.1f}%" in r.stdout and "object_count" in saved["reference"]["test.json"]
    assert "majority answer (this set)" in saved["reference"]["test.jsonl"]
    assert "test.json: model" in r.stdout and "object_count" in r.stdout and "purity" in r.stdout
    assert "test.jsonl: majority answer (this set)" in r.stdout     # JSONL: the answer prior beside the model
    assert "Per-module accuracy" in r.stdout and "test.json: invariant alone" in r.stdout
    assert "Independence of the modules" in r.stdout and "cka_inv_spec" in r.stdout
    foreign = tmp_path / "foreign.jsonl"                  # words the ACRE word tokenizer does not know
    foreign.write_text(json.dumps({"input": "Does smoking cause cancer, statistically speaking?", "ideal": 1}) + "\n")
    r = _run(["-m", "iclm_jax.eval_main", "--workdir", str(work), "--data", str(foreign)])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "% of its tokens are <unk> under data.tokenizer='acre_word' (above data.max_unk=0.05)" in r.stderr
    r = _run(["-m", "iclm_jax.eval_main", "--workdir", str(work), "--data", str(data),
              "--out", str(tmp_path / "no" / "x.json")])
    assert r.returncode == 2 and "--out" in r.stderr and "does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_refuses_bad_config_before_building(tmp_path):
    r = _run(["-m", "iclm_jax.main", f"--workdir={tmp_path / 'x'}", "--config.model.num_modules=0"])
    assert r.returncode == 2
    assert "model.num_modules=0" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_reports_bad_data_files_in_one_line(tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text('[[{"light_state": "on", "objects": [1]}]]')          # 1 panel instead of 10
    r = _run(["-m", "iclm_jax.main", f"--workdir={tmp_path / 'x'}", f"--config.data.train_file={bad}"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("iclm-train:")][0]
    assert str(bad) in line and "problem 0" in line

    bad_jsonl = tmp_path / "train.jsonl"
    bad_jsonl.write_text('{"input": [{"role": "user", "content": "hi"}], "ideal": "x"}\n{"input": 3}\n')
    r = _run(["-m", "iclm_jax.main", f"--workdir={tmp_path / 'y'}", f"--config.data.train_file={bad_jsonl}"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad_jsonl}:2" in r.stderr


@pytest.mark.slow
def test_cli_refuses_oracle_routing_without_domains_and_short_max_len(tmp_path):
    plain = tmp_path / "train.jsonl"
    plain.write_text('{"input": [{"role": "user", "content": "1 + 1 ="}], "ideal": "2"}\n')
    r = _run(["-m", "iclm_jax.main", f"--workdir={tmp_path / 'x'}", f"--config.data.train_file={plain}",
              "--config.router.mode=oracle", "--config.data.eval_splits=", "--config.data.max_unk=1"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "router.mode='oracle' needs a domain label" in r.stderr

    r = _run(["-m", "iclm_jax.main", f"--workdir={tmp_path / 'y'}", "--config.data.max_len=16",
              "--config.data.train_problems=4", "--config.data.eval_problems=2", "--config.data.workers=2"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "data.max_len=16: the longest example needs" in r.stderr
