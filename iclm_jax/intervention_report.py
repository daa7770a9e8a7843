"""The intervention report: ``report.md`` and ``interventions.png`` of ``intervene.evaluate_files``' results.

Per score (teacher-forced exact match, or exact match of greedy generations) there are three parts.
First, accuracy per eval set × intervention × domain, with the rows per module the router (or the forced
route) used. Second, the causal effect of each module: the accuracy drop when it is ablated,
acc(none) − acc(ablate=m), in points, per domain. Third, a verdict per specific module. A module that is
really domain-specific should cost its own domain the most when ablated and the others the least: the
verdict "holds" when the drop on each of its own domains (those whose own module it is) is larger than
the drop on every other domain. "Does not hold" otherwise. "-" when there is nothing to compare: fewer
than two domains with queries, no domain owned by the module, or the invariant module, which is not
domain-specific. With several eval sets the verdicts are read on the sets pooled (the hits and queries
summed), and the table gives each set's too. A verdict whose gap (own domain's drop minus the other's)
is under 2 standard errors is marked "within noise". The standard error treats the two accuracies as
independent, which overstates the noise of these paired numbers, so the mark is conservative.
"""
from __future__ import annotations

import os

import numpy as np

from iclm_jax.data.render import DOMAINS
from iclm_jax.report import _pyplot, format_table

GROUPS = ("all",) + DOMAINS
POOLED = "all sets"
SCORES = {"teacher": "teacher-forced exact match", "generate": "exact match of greedy generations"}


def accuracy(cell: dict | None, group: str) -> float:
    """hits / queries of one group of a cell (NaN: no cell, or no queries)."""
    if cell is None:
        return float("nan")
    hits, n = cell["groups"][group]
    return hits / n if n else float("nan")


def pooled_sets(res: dict) -> dict[str, dict]:
    """The sets, plus ``POOLED`` (every set's hits, queries and rows summed) when there are several."""
    sets = dict(res["sets"])
    if len(sets) > 1:
        pool = {}
        for iv in res["interventions"]:
            cells = [s[iv] for s in sets.values()]
            pool[iv] = None if any(c is None for c in cells) else {
                "groups": {g: np.sum([c["groups"][g] for c in cells], axis=0).tolist() for g in GROUPS},
                "routed": np.sum([c["routed"] for c in cells], axis=0).tolist()}
        sets[POOLED] = pool
    return sets


def modules(res: dict) -> list[tuple[str, str]]:
    """(label, ablate intervention name) of every module whose ablation was evaluated."""
    out = [(f"specific {m}", f"ablate={m}") for m in range(res["num_modules"])] + [("invariant", "ablate=invariant")]
    return [(label, name) for label, name in out if name in res["interventions"]]


def own_domains(res: dict, label: str) -> list[str]:
    """The labelled domains whose own module is ``label`` ("specific m")."""
    if not label.startswith("specific"):
        return []
    m = int(label.split()[1])
    return [d for d in DOMAINS if res["own"].get(d) == m]


def drops(res_set: dict, ablate: str) -> dict[str, float]:
    """acc(none) − acc(ablate) per group (NaN where either is undefined)."""
    return {g: accuracy(res_set["none"], g) - accuracy(res_set[ablate], g) for g in GROUPS}


def drop_variances(res_set: dict, ablate: str) -> dict[str, float]:
    """Per group, p0(1−p0)/n + p1(1−p1)/n: the variance of the drop if the two accuracies were independent.
    They are paired (the same queries) and positively correlated, so this overstates the noise: a
    conservative yardstick."""
    def var(cell, g):
        p, n = accuracy(cell, g), cell["groups"][g][1]
        return p * (1 - p) / n if n else float("nan")
    return {g: var(res_set["none"], g) + var(res_set[ablate], g) for g in GROUPS}


def verdict(drop: dict[str, float], own: list[str], label: str,
            variance: dict[str, float] | None = None) -> tuple[str, str]:
    """("holds" | "does not hold" | "-", why) for one module's drops (see the module docstring). With
    ``variance`` (``drop_variances``), a gap between the own domain's drop and the other's that is smaller
    than 2 standard errors is noted as "within noise"."""
    if not label.startswith("specific"):
        return "-", "not domain-specific"
    seen = [d for d in DOMAINS if np.isfinite(drop[d])]
    if len(seen) < 2:
        return "-", "fewer than two domains with queries"
    if not own:
        return "-", "no domain is routed to it by majority"
    mine, others = [d for d in own if d in seen], [d for d in seen if d not in own]
    if not mine or not others:
        return "-", "its own domain has no queries" if not mine else "it owns every domain with queries"
    a, b = min(mine, key=drop.get), max(others, key=drop.get)
    word = "holds" if drop[a] > drop[b] else "does not hold"
    if variance is not None:
        gap, se = drop[a] - drop[b], float(np.sqrt(variance[a] + variance[b]))
        if abs(gap) < 2 * se:
            return word, f"within noise: gap {100 * gap:+.1f} < 2 SE = {200 * se:.1f} points"
    return word, ""


def _points(x: float) -> str:
    return "-" if not np.isfinite(x) else f"{100 * x:+.1f}"


def accuracy_table(res: dict) -> str:
    sets = pooled_sets(res)
    k = res["num_modules"]
    rows = [[f"{name}: {iv}"] + [accuracy(cells[iv], g) for g in GROUPS]
            + ["-" if cells[iv] is None else " / ".join(map(str, cells[iv]["routed"]))]
            for name, cells in sets.items() for iv in res["interventions"]]
    header = ["eval set: intervention"] + list(GROUPS) + [f"rows per module ({' / '.join(map(str, range(k)))})"]
    return format_table(header, rows, f"Accuracy under interventions ({SCORES[res['score']]})")


def effect_table(res: dict) -> str:
    rows = []
    for name, cells in pooled_sets(res).items():
        for label, ablate in modules(res):
            if cells[ablate] is None:
                continue
            d = drops(cells, ablate)
            own = own_domains(res, label)
            word, why = verdict(d, own, label, drop_variances(cells, ablate))
            rows.append([f"{name}: {label}"] + [_points(d[g]) for g in GROUPS]
                        + [", ".join(own) or "-", word + (f" ({why})" if why else "")])
    header = ["eval set: module ablated"] + [f"drop {g}" for g in GROUPS] + ["own domain", "own domain hurt most?"]
    return format_table(header, rows, "Causal effect of each module: accuracy drop when ablated (points)")


def verdict_lines(res: dict) -> list[str]:
    """One sentence per ablated module, on the pooled sets (or the one set)."""
    sets = pooled_sets(res)
    name = POOLED if POOLED in sets else next(iter(sets))
    cells, out = sets[name], []
    for label, ablate in modules(res):
        if cells[ablate] is None:
            out.append(f"- {label}: - ({res['not_applicable'].get(ablate, 'not evaluated')})")
            continue
        d = drops(cells, ablate)
        own = own_domains(res, label)
        word, why = verdict(d, own, label, drop_variances(cells, ablate))
        costs = ", ".join(f"{g} {_points(d[g])}" for g in DOMAINS)
        head = f"- {label}" + (f" (own domain: {', '.join(own)})" if own else "")
        out.append(f"{head}: **{word}**" + (f" ({why})" if why else "") + f"; ablated, it costs {costs} points "
                   f"({name}).")
    return out


def tables(results: dict[str, dict]) -> str:
    """Every table and verdict of every score, as ``iclm-eval --intervene`` prints them."""
    blocks = []
    for res in results.values():
        blocks += [accuracy_table(res), "", effect_table(res), "",
                   f"Own domain hurt most when its module is ablated? ({SCORES[res['score']]})",
                   *verdict_lines(res), ""]
    return "\n".join(blocks).rstrip()


def plot(out_dir: str, res: dict) -> str | None:
    """``interventions.png`` (``interventions_generate.png`` for generations). The left panel is accuracy
    per intervention (rows) and eval set × domain (columns). The right panel is the drop per ablated
    module and domain on the pooled sets, with ±2 standard errors (``drop_variances``)."""
    plt = _pyplot()
    if plt is None:
        return None
    sets = pooled_sets(res)
    ivs = res["interventions"]
    cols = [(name, g) for name in sets for g in GROUPS]
    acc = np.array([[accuracy(sets[name][iv], g) for name, g in cols] for iv in ivs])
    mods = [(label, ablate) for label, ablate in modules(res) if sets[list(sets)[-1]][ablate] is not None]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(3.5 + 0.62 * len(cols) + 1.2 + 1.1 * max(len(mods), 1),
                                                1.6 + 0.36 * len(ivs)),
                                 gridspec_kw={"width_ratios": [0.62 * len(cols) + 1.0, 1.1 * max(len(mods), 1) + 1.2]})
    im = ax.imshow(np.ma.masked_invalid(acc), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(acc):
        ax.text(j, i, "-" if np.isnan(v) else f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                color="black" if np.isnan(v) or v > 0.6 else "white")
    ax.set_xticks(range(len(cols)), [f"{name}\n{g}" for name, g in cols], fontsize=7, rotation=90)
    ax.set_yticks(range(len(ivs)), ivs, fontsize=8)
    for j in range(len(GROUPS), len(cols), len(GROUPS)):
        ax.axvline(j - 0.5, color="white", lw=2)
    ax.set_title(f"accuracy % ({SCORES[res['score']]})", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, pad=0.02, label="accuracy")
    name = list(sets)[-1]
    width = 0.8 / len(GROUPS)
    for i, g in enumerate(GROUPS):
        vals = [100 * drops(sets[name], ablate)[g] for _, ablate in mods]
        err = [200 * np.sqrt(drop_variances(sets[name], ablate)[g]) for _, ablate in mods]
        bx.bar(np.arange(len(mods)) + (i - (len(GROUPS) - 1) / 2) * width, np.nan_to_num(vals), width, label=g,
               yerr=np.nan_to_num(err), capsize=3, error_kw={"elinewidth": 0.8, "alpha": 0.6})
    bx.axhline(0, color="black", lw=0.8)
    labels = [label + (f"\n(own: {', '.join(own_domains(res, label))})" if own_domains(res, label) else "")
              for label, _ in mods]
    bx.set_xticks(range(len(mods)), labels, fontsize=8)
    bx.set_ylabel("accuracy drop when ablated (points)", fontsize=8)
    bx.set_title(f"causal effect of each module ({name})\nerror bars: ±2 SE (conservative)", fontsize=9)
    bx.legend(fontsize=7, title="domain", title_fontsize=7, loc="best")
    fig.tight_layout()
    path = os.path.join(out_dir, "interventions.png" if res["score"] == "teacher" else "interventions_generate.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(results: dict[str, dict], *, workdir: str = "", step=None, plots=()) -> str:
    first = next(iter(results.values()))
    k = first["num_modules"]
    lines = [f"# Interventions on the modules: `{workdir}`" + (f" (step {step})" if step is not None else ""), "",
             f"- {k} specific module(s), invariant module: {'yes' if first['invariant'] else 'no'}"
             + (f", aggregator {first['aggregator']}" if first["invariant"] else "")
             + f", router.source {first['router_source']}",
             "- eval sets: " + ", ".join(f"{name} ({cells['none']['groups']['all'][1]} queries)"
                                         for name, cells in first["sets"].items())]
    for res in results.values():
        own = ", ".join(f"{d} → {m}" for d, m in res["own"].items())
        swap = "-" if res["swap"] is None else ", ".join(f"{d} → {m}" for d, m in res["swap"].items())
        lines += [f"- {SCORES[res['score']]}: own module per domain (where the unintervened router sends most of "
                  f"its rows, all sets together): {own}; swap sends: {swap}"]
    na = first["not_applicable"]
    if na:
        lines += ["- \"-\" rows mean nothing for this run: " + "; ".join(f"{iv}: {why}" for iv, why in na.items())]
    lines += ["", "Interventions: `route=M` forces every input to specific module M; `swap` sends each domain to "
              "another domain's own module; `ablate=M` zeroes that adapter (LoRA A and B) and keeps the rest; "
              "`invariant-only` / `specific-only` let the aggregator read one stream only "
              "(`iclm_jax/intervene.py`). A module that is really domain-specific should cost its own domain "
              "the most when ablated: \"holds\" when each own domain's drop exceeds every other domain's.", ""]
    for res in results.values():
        lines += [f"## {SCORES[res['score']].capitalize()}", "", "```", accuracy_table(res), "```", "",
                  "```", effect_table(res), "```", "", "Own domain hurt most when its module is ablated?", "",
                  *verdict_lines(res), ""]
    for p in plots:
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})", ""]
    return "\n".join(lines)


def write(out_dir: str, results: dict[str, dict], *, workdir: str = "", step=None) -> list[str]:
    """``report.md`` and one PNG per score into ``out_dir`` (created if missing) -> their paths."""
    os.makedirs(out_dir, exist_ok=True)
    plots = [p for res in results.values() if (p := plot(out_dir, res))]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(markdown(results, workdir=workdir, step=step, plots=plots))
    return [path] + plots
