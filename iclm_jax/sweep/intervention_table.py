"""The interventions of a sweep's points (``iclm-sweep intervene``) as ``collect``'s tables and
``interventions.png``: mean ± std over seeds per group.

Per point the eval sets are pooled (hits and queries summed, ``intervention_report.pooled_sets``). Module
numbers are not comparable across seeds (the router may give the text rendering module 0 in one seed and
module 1 in the next), so the tables name modules by the domain that owns them (``own``: where the
unintervened router sends most of that domain's rows): "its module ablated" is ``ablate=own[d]``.
Verdicts are ``intervention_report.verdict``'s, counted over seeds.
"""
from __future__ import annotations

import json
import os

import numpy as np

from iclm_jax import intervention_report as ir
from iclm_jax.data.render import DOMAINS
from iclm_jax.report import _pyplot, save_with_outside_legend
from iclm_jax.sweep.intervene import results_path

# The intervention columns that mean the same in every seed (route=M depends on the router's numbering).
COLUMNS = ("none", "swap", "ablate=invariant", "invariant-only", "specific-only")


def point_effects(res: dict) -> dict:
    """One point's teacher results -> {"acc": {intervention: accuracy of all queries}, "domains": {domain:
    {"module", "own_drop", "other_drop", "swap_drop", "verdict", "noise"}}} on its pooled sets (NaN: the
    intervention means nothing for this run)."""
    sets = ir.pooled_sets(res)
    cells = sets[ir.POOLED] if ir.POOLED in sets else next(iter(sets.values()))
    acc = {iv: ir.accuracy(cells.get(iv), "all") for iv in COLUMNS}
    domains = {}
    for d in DOMAINS:
        m = res["own"].get(d)
        if m is None or cells.get(f"ablate={m}") is None:
            continue
        drop = ir.drops(cells, f"ablate={m}")
        others = [drop[o] for o in DOMAINS if o != d and np.isfinite(drop[o])]
        label = f"specific {m}"
        owners = ir.own_domains(res, label)
        word, why = ir.verdict(drop, owners, label, ir.drop_variances(cells, f"ablate={m}"))
        swap = (ir.accuracy(cells["none"], d) - ir.accuracy(cells["swap"], d)) if cells.get("swap") else float("nan")
        domains[d] = {"module": m, "own_drop": drop[d], "other_drop": max(others) if others else float("nan"),
                      "swap_drop": swap, "verdict": word, "noise": why.startswith("within noise"),
                      "shared": len(owners) > 1}
    return {"acc": acc, "domains": domains}


def load(workdir: str, sweep: dict) -> dict[str, list[dict]]:
    """{group: [point_effects of each seed with interventions]}, in the sweep's group order."""
    out: dict[str, list[dict]] = {}
    for p in sweep["points"]:
        path = results_path(workdir, p)
        if os.path.isfile(path):
            with open(path) as f:
                rec = json.load(f)
            out.setdefault(p["group"], []).append(point_effects(rec["interventions"]["teacher"]) | {
                "point": p["name"], "sets": rec["sets"], "interval": _interval(rec)})
    return out


def _interval(rec: dict) -> tuple[float, float] | None:
    """(started_at, finished_at) of a record that has both (written since they were recorded), else None."""
    a, b = rec.get("started_at"), rec.get("finished_at")
    return (float(a), float(b)) if a is not None and b is not None else None


def _cell(xs, pct_points: bool = False) -> str:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    if not xs:
        return "-"
    m, f = 100 * float(np.mean(xs)), "+.1f" if pct_points else ".1f"
    return f"{m:{f}} ± {100 * float(np.std(xs, ddof=1)):.1f} (n={len(xs)})" if len(xs) > 1 else f"{m:{f}} (n=1)"


def _verdicts(rows: list[dict]) -> str:
    if not rows:
        return "-"
    if all(r["shared"] for r in rows):
        return "- (one module serves every domain)"
    words = [r["verdict"] for r in rows]
    noise = sum(r["noise"] for r in rows if r["verdict"] == "holds")
    out = f"holds in {words.count('holds')} of {len(rows)}"
    if noise:
        out += f" ({noise} within noise)"
    dashes = words.count("-")
    return out + (f"; {dashes} '-' (shared module)" if dashes else "")


def markdown(groups: dict[str, list[dict]]) -> list[str]:
    """The two tables (lines for results.md), or [] when no point has interventions."""
    if not groups:
        return []
    lines = ["", "Interventions on the modules (`iclm-sweep intervene`; teacher-forced answer accuracy %, the "
             "point's test sets pooled, mean ± std over seeds). `swap` sends each domain to another domain's "
             "module, `ablate=invariant` zeroes the invariant adapter, `invariant-only` / `specific-only` let "
             "the aggregator read one stream; \"-\": means nothing for this variant:", "",
             "| group | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for g, rows in groups.items():
        lines.append(f"| {g} | " + " | ".join(_cell([r["acc"][iv] for r in rows]) for iv in COLUMNS) + " |")
    lines += ["", "Causal effect of each domain's own module (the one the router sends it to): accuracy drop in "
              "points when that module's adapter is zeroed, on its own domain and on the other domain, and when "
              "the domain is swapped to another module. A really domain-specific module costs its own domain "
              "the most (`intervention_report.py`; \"within noise\": the gap is under 2 standard errors). With hard "
              "routing a module sees only the rows routed to it, so the other domain's drop is 0 wherever the router "
              "is pure, and \"holds\" then says only that the own drop is above 0; the informative columns are the "
              "own drop (what the module adds to the rest of the model) and the swap (whether another domain's "
              "module can stand in for it):", "",
              "| group | domain | its module ablated: drop on it | drop on the other domain | swapped: drop on it "
              "| own domain hurt most? |", "|---|---|---|---|---|---|"]
    for g, rows in groups.items():
        for d in DOMAINS:
            sel = [r["domains"][d] for r in rows if d in r["domains"]]
            if sel:
                lines.append(f"| {g} | {d} | " + " | ".join(_cell([s[k] for s in sel], True) for k in (
                    "own_drop", "other_drop", "swap_drop")) + f" | {_verdicts(sel)} |")
    return lines


def plot(workdir: str, groups: dict[str, list[dict]]) -> str | None:
    """``interventions.png``: per group and domain, the drop on the domain when its module is ablated, on
    the other domain, and when it is swapped; bars are means over seeds, error bars their std, dots each
    seed."""
    pairs = [(g, d) for g, rows in groups.items() for d in DOMAINS if any(d in r["domains"] for r in rows)]
    if not pairs:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    kinds = [("own_drop", "its module ablated: drop on it"), ("other_drop", "its module ablated: drop on the other"),
             ("swap_drop", "swapped to another module: drop on it")]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(pairs) + 3.5), 4.6))
    width = 0.8 / len(kinds)
    for i, (key, label) in enumerate(kinds):
        vals = [[100 * r["domains"][d][key] for r in groups[g] if d in r["domains"]] for g, d in pairs]
        means = [np.nanmean(v) if np.isfinite(v).any() else 0.0 for v in vals]
        stds = [np.nanstd(v, ddof=1) if np.isfinite(v).sum() > 1 else 0.0 for v in vals]
        xs = np.arange(len(pairs)) + (i - (len(kinds) - 1) / 2) * width
        ax.bar(xs, means, width, label=label, yerr=stds, capsize=3, error_kw={"elinewidth": 0.8})
        for j, (x, v) in enumerate(zip(xs, vals)):   # each seed: two seeds are not a distribution
            ax.scatter([x] * len(v), v, s=9, color="black", zorder=3, label="one seed" if i == j == 0 else None)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(pairs)), [f"{g.removeprefix('variant=')}\n{d}" for g, d in pairs], fontsize=8)
    ax.set_ylabel("accuracy drop (points)")
    ax.set_title("interventions: does a domain's own module matter to it most?\n"
                 "bars: mean over seeds, error bars: std over seeds, dots: each seed", fontsize=10)
    return save_with_outside_legend(fig, ax, os.path.join(workdir, "interventions.png"))
