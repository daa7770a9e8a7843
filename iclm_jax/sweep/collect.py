"""``collect``: one table from a sweep's finished points: ``results.csv`` (a row per point × eval set),
``results.md`` (mean ± std over seeds per group × eval set, beside the reference predictors) and
``results.png`` (the same as bars with error bars, the majority predictor as a line). Points that have
``iclm-sweep intervene``'s reports add the intervention tables and ``interventions.png``
(``intervention_table.py``).

It reads ``sweep.json`` (written by the launch) for the points, and each point's ``summary.json``; a point
without one is listed as not finished. ``answer_acc`` is the eval's ``all`` accuracy (query exact match).
"""
from __future__ import annotations

import csv
import json
import os
from collections import defaultdict

import numpy as np

from iclm_jax.data.render import DOMAINS
from iclm_jax.report import save_with_outside_legend
from iclm_jax.sweep import intervention_table

SWEEP_FILE = "sweep.json"
# The reference predictors a point's summary may hold (``summary["reference"][split]``): ACRE has the majority
# label and the label per query object count, RAVEN the majority letter and the best single attribute
# (data/reference.py, data/raven_reference.py); a table lists those its points measured.
REFERENCES = {"majority": "the majority label", "object_count": "the most frequent label per query object count",
              "best_attribute": "the best single-attribute heuristic (RAVEN)"}
INDEPENDENCE = ("router_nmi", "cka_inv_spec", "cka_inv_spec_delta", "cka_spec0_spec1_delta", "mi_mine",
                "mi_plugin")   # see independence.py


def _point_rows(workdir: str, point: dict) -> list[dict] | None:
    path = os.path.join(workdir, point["dirname"], "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        s = json.load(f)
    rows = []
    for split, r in s.get("eval", {}).items():
        ref = s.get("reference", {}).get(split, {})
        rows.append({"point": point["name"], "group": point["group"], "seed": point.get("seed"), "split": split,
                     "answer_acc": r.get("all"), "answer_ce": r.get("answer_ce"),
                     "purity": r.get("purity") if "module_1_rows" in r else None,   # one module: none
                     **{k: ref.get(k, {}).get("all") for k in REFERENCES}, "steps": s.get("steps"),
                     "train_s": s.get("train_s"), "wall_s": (s.get("train_wall_s") or 0) + (s.get("setup_s") or 0),
                     **{f"domain_{d}": r.get(f"domain_{d}") for d in DOMAINS},
                     **{f"view: {v}": x.get("all") for v, x in r.get("views", {}).items()},
                     **{k: r.get("independence", {}).get(k) for k in INDEPENDENCE}})
    return rows


def union_seconds(intervals) -> float:
    """Seconds covered by the union of ``(start, end)`` intervals: points trained side by side (``--jobs``)
    count once, the gap between two sittings of a resumed sweep not at all."""
    total, reach = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def _training_intervals(workdir: str, sweep: dict) -> tuple[list[tuple[float, float]], int]:
    """(started_at, finished_at) of each finished point's (last) training process, and how many finished
    points have no such record (trained before it was written)."""
    spans, unknown = [], 0
    for point in sweep["points"]:
        path = os.path.join(workdir, point["dirname"], "summary.json")
        if os.path.isfile(path):
            with open(path) as f:
                s = json.load(f)
            if s.get("started_at") is None or s.get("finished_at") is None:
                unknown += 1
            else:
                spans.append((float(s["started_at"]), float(s["finished_at"])))
    return spans, unknown


def _wall_line(train: tuple[list, int], interventions: dict) -> str:
    """The sweep's measured wall time: training and interventions, each the union of its processes' times."""
    spans, unknown = train
    runs = [r.get("interval") for rs in interventions.values() for r in rs]
    parts = [f"{union_seconds(spans) / 3600:.2f} h training the points" if spans else "",
             f"{union_seconds([x for x in runs if x]) / 3600:.2f} h of interventions" if any(runs) else ""]
    text = " + ".join(x for x in parts if x)
    if not text:
        return ""
    missing = unknown + sum(x is None for x in runs)
    return (f"Wall time: {text} (each the union of its processes' start-to-end times: points run side by side "
            "count once, pauses between sittings not at all; a resumed point counts from its last start)"
            + (f"; {missing} finished points or reports without start/end times are not counted" if missing else "")
            + ". ")


def _mean_std(xs) -> tuple[float, float, int]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan"), 0
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan"), len(xs)


def _cell(m: float, s: float, n: int, pct: bool = True) -> str:
    if n == 0:
        return "-"
    k, f = (100, ".1f") if pct else (1, ".3f" if abs(m) >= 0.01 or m == 0 else ".2e")   # plug-in MI ~1e-4
    return f"{k * m:{f}} ± {k * s:{f}} (n={n})" if n > 1 else f"{k * m:{f}} (n=1)"


def read_sweep(workdir: str) -> dict:
    """The sweep's ``sweep.json`` (written by the launch); FileNotFoundError naming it when there is none."""
    path = os.path.join(workdir, SWEEP_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not a sweep directory (no {SWEEP_FILE}; run the sweep first)")
    with open(path) as f:
        return json.load(f)


def collect(workdir: str) -> dict:
    """Write results.csv/.md/.png in ``workdir``; returns {"groups": {group: {split: (mean, std, n)}}, ...}."""
    sweep = read_sweep(workdir)
    rows, missing = [], []
    for point in sweep["points"]:
        r = _point_rows(workdir, point)
        if r is None:
            missing.append(point["name"])
        else:
            rows.extend(r)
    views = list(dict.fromkeys(k for r in rows for k in r if k.startswith("view: ")))
    references = [k for k in REFERENCES if k == "majority" or any(r[k] is not None for r in rows)]
    fields = ["point", "group", "seed", "split", "answer_acc", "answer_ce", "purity", *references,
              "steps", "train_s", "wall_s", *(f"domain_{d}" for d in DOMAINS), *views, *INDEPENDENCE]
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")  # unmeasured references
        w.writeheader()
        w.writerows(rows)
    groups = list(dict.fromkeys(p["group"] for p in sweep["points"]))
    splits = list(dict.fromkeys(r["split"] for r in rows))
    table = defaultdict(dict)
    refs = {}
    for g in groups:
        for sp in splits:
            sel = [r for r in rows if r["group"] == g and r["split"] == sp]
            table[g][sp] = _mean_std([r["answer_acc"] for r in sel])
    for sp in splits:
        refs[sp] = {k: _mean_std([r[k] for r in rows if r["split"] == sp]) for k in references}
    lines = [f"# Sweep results: {sweep['config']}", "",
             f"Answer accuracy (%, query exact match), mean ± std over seeds; {len(sweep['points']) - len(missing)} "
             f"of {len(sweep['points'])} points finished. Reference predictors: "
             f"{' and '.join(REFERENCES[k] for k in references)}, fitted on each point's training data.", "",
             "| group | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for g in groups:
        lines.append(f"| {g} | " + " | ".join(_cell(*table[g][sp]) for sp in splits) + " |")
    for k in references:
        lines.append(f"| *{k} predictor* | " + " | ".join(_cell(*refs[sp][k]) for sp in splits) + " |")
    lines += _breakdown(rows, groups, splits, [f"domain_{d}" for d in DOMAINS],
                        "Per rendering (answer accuracy %, mean ± std over seeds):", "rendering")
    lines += _breakdown(rows, groups, splits, views, "Per module (answer accuracy %: the model as routed, routed "
                        "by domain, each module alone on the base head; mean ± std over seeds):", "view")
    measured = [k for k in INDEPENDENCE if any(r[k] is not None for r in rows)]
    if measured:
        lines += ["", "Independence (mean ± std over seeds; `independence.py`):", "",
                  "| group | split | " + " | ".join(measured) + " |", "|---|---|" + "---|" * len(measured)]
        for g in groups:
            for sp in splits:
                sel = [r for r in rows if r["group"] == g and r["split"] == sp]
                lines.append(f"| {g} | {sp} | " + " | ".join(
                    _cell(*_mean_std([r[k] for r in sel]), pct=False) for k in measured) + " |")
    interventions = intervention_table.load(workdir, sweep)
    lines += intervention_table.markdown(interventions)
    if missing:
        lines += ["", "Not finished: " + "; ".join(missing)]
    train_h = sum(r["train_s"] or 0 for r in _per_point(rows)) / 3600
    wall_h = sum(r["wall_s"] or 0 for r in _per_point(rows)) / 3600
    lines += ["", f"Command: `{sweep.get('command', '')}`", "",
              _wall_line(_training_intervals(workdir, sweep), interventions)
              + f"Summed over the finished points: {train_h:.2f} h of training, {wall_h:.2f} h with set-up and "
              f"evaluation. Machine: {_machine()}."]
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    png = _plot(workdir, groups, splits, table, refs, rows) if rows else None
    return {"groups": {g: dict(v) for g, v in table.items()}, "refs": refs, "missing": missing,
            "rows": rows, "png": png, "interventions": interventions,
            "interventions_png": intervention_table.plot(workdir, interventions)}


def _per_point(rows: list[dict]) -> list[dict]:
    return list({r["point"]: r for r in rows}.values())


def _breakdown(rows, groups, splits, keys, title: str, what: str) -> list[str]:
    """A table group × split × key (``keys``: per-rendering or per-view columns), skipping empty rows."""
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not keys:
        return []
    names = [k.removeprefix("domain_").removeprefix("view: ") for k in keys]
    out = ["", title, "", "| group | split | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(keys)]
    for g in groups:
        for sp in splits:
            sel = [r for r in rows if r["group"] == g and r["split"] == sp]
            cells = [_cell(*_mean_std([r.get(k) for r in sel])) for k in keys]
            if any(c != "-" for c in cells):
                out.append(f"| {g} | {sp} | " + " | ".join(cells) + " |")
    return out if len(out) > 5 else []


def _machine() -> str:
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import jax
    return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.default_backend()}"


def _plot(workdir, groups, splits, table, refs, rows) -> str:
    """Bars of the mean over seeds with their std, and a dot for each seed: two seeds that disagree (one run
    that learned, one that did not) show as two dots, not as one bar with an error bar past 100%."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = [g for g in groups if any(table[g][sp][2] for sp in splits)]   # unfinished groups: no bar
    fig, ax = plt.subplots(figsize=(min(16, max(6, 1.2 * len(groups) * len(splits) / 2 + 3)), 4.5))
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(splits))
    for i, g in enumerate(groups):
        means = np.array([100 * table[g][sp][0] for sp in splits])
        xs = x + (i - (len(groups) - 1) / 2) * width
        ax.bar(xs, means, width, label=g)
        spread = np.array([table[g][sp][2] >= 2 for sp in splits])   # a std needs 2+ seeds: no cap at n = 1
        if spread.any():
            stds = np.array([100 * np.nan_to_num(table[g][sp][1]) for sp in splits])
            ax.errorbar(xs[spread], means[spread], yerr=stds[spread], fmt="none", ecolor="black", capsize=3,
                        lw=1)
        for j, sp in enumerate(splits):
            seeds = [100 * r["answer_acc"] for r in rows if r["group"] == g and r["split"] == sp
                     and r["answer_acc"] is not None]
            ax.scatter([xs[j]] * len(seeds), seeds, s=9, color="black", zorder=3,
                       label="one seed" if i == 0 and j == 0 else None)
    for j, sp in enumerate(splits):
        m = refs[sp]["majority"][0]
        if not np.isnan(m):
            ax.hlines(100 * m, j - 0.45, j + 0.45, colors="black", linestyles="dashed",
                      label="majority predictor" if j == 0 else None)
    ax.set_xticks(x, splits)
    ax.set_xlabel("eval set")
    ax.set_ylabel("answer accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("sweep: bars: mean over seeds, error bars: std over seeds, dots: each seed")
    return save_with_outside_legend(fig, ax, os.path.join(workdir, "results.png"))
