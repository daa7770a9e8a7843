"""Learning-curve plots from a synthetic metrics.jsonl (+ references.json)."""
import json

import numpy as np
import pytest

from iclm_jax import report


def _write_metrics(path, timed=True, resumed=False):
    rows = []
    for step in range(10, 110, 10):
        t = {"time_s": 6.0 * step} if timed else {}
        rows.append({"step": step, "split": "train", "loss": 1.0 / step, "ce": 0.5, "answer_ce": 1.0 - step / 200,
                     "answer_acc": 0.3 + step / 400, "answer_queries": 64.0, **t})
        if step % 50 == 0:
            for name, off in (("IID", 0.0), ("Sys", -0.1)):
                rows.append({"step": step, "split": f"eval/{name}", "all": 0.35 + step / 500 + off,
                             "answer_ce": 0.9 - step / 300, **t})
    if resumed:       # a resumed run re-logs a step: the last record wins
        rows.append({"step": 50, "split": "train", "answer_acc": 0.9, "answer_ce": 0.1,
                     **({"time_s": 301.0} if timed else {})})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _refs():
    return {"IID": {"majority": {"all": 0.37, "direct": 0.5, "screen_off": float("nan")},
                    "object_count": {"all": 0.45}},
            "Sys": {"majority": {"all": 0.33}, "object_count": {"all": 0.4}},
            "majority_loss": {"IID": 1.05, "Sys": 1.1}}


@pytest.mark.parametrize("with_refs", [True, False])
def test_plot_learning_curve_writes_pngs(tmp_path, with_refs):
    _write_metrics(tmp_path / "metrics.jsonl", resumed=True)
    if with_refs:
        (tmp_path / "references.json").write_text(json.dumps(_refs()))
    written = report.plot_learning_curve(str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["answer_loss.png", "learning_curve.png"]
    for name in ("learning_curve.png", "answer_loss.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_learning_curve_falls_back_to_steps_without_times(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl", timed=False)
    (tmp_path / "references.json").write_text(json.dumps({**_refs(), "majority_loss": 1.0}))
    assert len(report.plot_learning_curve(str(tmp_path))) == 2
    assert (tmp_path / "learning_curve.png").stat().st_size > 5000


def test_plot_learning_curve_without_metrics_writes_nothing(tmp_path):
    assert report.plot_learning_curve(str(tmp_path)) == []


def test_records_dedupe_and_resume_clock(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl", resumed=True)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('\n{"step": 110, "split": "train", "time_s": 9')     # a line cut short by a kill
    recs = report._records(str(tmp_path))
    assert set(recs) == {"train", "eval/IID", "eval/Sys"}
    train = recs["train"]
    assert [r["step"] for r in train] == list(range(10, 110, 10))
    assert train[4]["answer_acc"] == 0.9                      # the re-logged step 50 wins
    assert report.last_time_s(str(tmp_path), 55) == pytest.approx(301.0)
    assert report.last_time_s(str(tmp_path), 100) == pytest.approx(600.0)
    assert report.last_time_s(str(tmp_path), 5) == 0.0
    assert np.isfinite(report.last_time_s(str(tmp_path), 1000))


@pytest.mark.parametrize("modules,mi", [(1, 0.0), (2, 0.03)])
def test_routing_and_mi_plots_only_when_they_mean_something(tmp_path, modules, mi):
    rows = [{"step": s, "split": "train", "loss": 1.0, "mi": mi * s, "mine_critic_bound": mi * s,
             "router_perplexity": float(modules), "route_purity": 1.0,
             **{f"route_fraction/{m}": 1.0 / modules for m in range(modules)}} for s in (10, 20)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    written = {p.rsplit("/", 1)[-1] for p in report.plot_training(str(tmp_path))}
    # one module: nothing is routed; mi.estimator=none logs zeros: both plots would be flat lines
    assert written == ({"loss.png"} if modules == 1 else {"loss.png", "mi.png", "routing.png"})
    assert report.routing_panels(rows, 2) == ([] if modules == 1 else
                                              ["route_fraction", "router_perplexity", "route_purity"])
    assert report.routing_panels(rows, 1) == ([] if modules == 1 else ["route_fraction", "router_perplexity"])


def test_loss_plot_leaves_out_terms_that_are_off():
    rows = [{"step": s, "loss": 1.0 / s, "ce": 0.5 / s, "answer_ce": 0.7 / s, "vq": 0.0, "aux": 0.0}
            for s in (10, 20)]
    keys = ["loss", "ce", "answer_ce", "vq", "aux"]
    assert report.drawn_loss_terms(rows, keys) == ["loss", "ce", "answer_ce"]     # baseline: no router, no heads
    rows[1]["vq"] = 0.2
    assert report.drawn_loss_terms(rows, keys) == ["loss", "ce", "answer_ce", "vq"]


def test_one_module_purity_is_a_dash():
    from iclm_jax import evaluate
    r = {"domain_symbolic": 0.9, "domain_text": float("nan"), "module_0": 0.9, "module_0_rows": 100,
         "purity": 1.0}
    one = evaluate.modules_table({"IID": r}, 1).splitlines()[-1]
    assert one.rstrip().endswith("-") and "100.0%" not in one
    two = evaluate.modules_table({"IID": {**r, "module_1": 0.8, "module_1_rows": 50}}, 2).splitlines()[-1]
    assert two.rstrip().endswith("100.0%")


def test_relocation_and_outputs_lines():
    from iclm_jax.run_report import outputs_line, relocation_report
    assert relocation_report(2, 2, 100) == ""             # each dead code restarted once: normal
    line = relocation_report(9, 4, 300)
    assert line.startswith("the router relocated codes 9 times in 300 steps") and "routing.png" in line
    out = outputs_line("runs/x", "runs/x/report.md", ["runs/x/loss.png", "runs/x/mi.png"])
    assert out == ("outputs in runs/x: report.md, summary.json, metrics.jsonl, TensorBoard events in tb/ "
                   "(make tensorboard LOGDIR=runs/x); plots: loss.png, mi.png")
