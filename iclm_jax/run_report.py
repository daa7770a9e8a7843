"""A finished run's analysis in its workdir: ``routing_confusion.png``, ``similarity.png`` and ``report.md``.

Drawn from the final evaluation's results (``Run.evaluate(..., views=True)``): per eval set, the routing
confusion counts (which module each rendering domain went to), the CKA / |Pearson| matrices between the
pooled representations (invariant, routed specific, each specific module alone), and the tables the
training prints. ``report.md`` gathers those tables, the held-out MI estimates side by side and every plot.
"""
from __future__ import annotations

import os

import numpy as np

from iclm_jax import evaluate
from iclm_jax.report import _pyplot, format_table


def _sets_with(results: dict, key: str) -> list[str]:
    return [name for name, r in results.items() if key in r.get("matrices", {})]


def plot_routing(workdir: str, results: dict) -> list[str]:
    """routing_confusion.png: rows per (rendering domain, module), one panel per eval set, each row of
    a panel normalised to fractions (the counts are written in the cells)."""
    plt = _pyplot()
    names = _sets_with(results, "routing")
    if plt is None or not names:
        return []
    fig, axes = plt.subplots(1, len(names), figsize=(2.2 + 1.6 * len(names) + 0.5 * len(names)
                                                     * len(results[names[0]]["matrices"]["routing"]["counts"][0]),
                                                     2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = results[name]["matrices"]["routing"]
        counts = np.asarray(r["counts"], dtype=float)
        frac = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        ax.imshow(frac, vmin=0, vmax=1, cmap="Blues", aspect="auto")
        for (i, j), c in np.ndenumerate(counts):
            ax.text(j, i, f"{int(c)}", ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.6 else "black")
        ax.set_xticks(range(counts.shape[1]), [f"module {m}" for m in range(counts.shape[1])], fontsize=8)
        ax.set_yticks(range(len(r["domains"])), r["domains"], fontsize=8)
        ax.set_xlabel("routed to")
        ax.set_ylabel("rendering domain")
        ax.set_title(f"{name}: NMI {results[name].get('independence', {}).get('router_nmi', float('nan')):.2f}",
                     fontsize=9)
    fig.suptitle("Routing confusion (rows per domain and module; colour = fraction of the domain)", fontsize=9)
    fig.tight_layout()
    path = os.path.join(workdir, "routing_confusion.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_similarity(workdir: str, results: dict) -> list[str]:
    """similarity.png: linear CKA between the pooled representations and between the adapters'
    contributions to them (state minus the base's), per eval set (a row each). Off-diagonal values near
    0 = unrelated representations; 1 = the same up to rotation and scale."""
    plt = _pyplot()
    names = [n for n in _sets_with(results, "similarity")
             if len(results[n]["matrices"]["similarity"]["names"]) >= 2]
    if plt is None or not names:
        return []
    k = len(results[names[0]]["matrices"]["similarity"]["names"])
    side = 1.2 + 0.55 * k
    fig, axes = plt.subplots(len(names), 2, figsize=(2 * side + 2.5, (side + 0.9) * len(names)), squeeze=False,
                             layout="constrained")
    im = None
    for row, name in zip(axes, names):
        mats = results[name]["matrices"]
        for ax, which, label in zip(row, ("similarity", "delta_similarity"),
                                    ("CKA of pooled states", "CKA of adapter contributions")):
            sim = mats.get(which, {"names": mats["similarity"]["names"],
                                   "cka": np.full((k, k), np.nan).tolist()})
            m = np.asarray(sim["cka"], dtype=float)
            im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else "white")
            ticks = [n.replace(" alone", "").replace("specific", "spec.") for n in sim["names"]]
            ax.set_xticks(range(len(ticks)), ticks, rotation=35, ha="right", fontsize=7)
            ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
            ax.set_title(f"{name}: {label}", fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="similarity (0 = unrelated, 1 = same)")
    path = os.path.join(workdir, "similarity.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _mi_table(results: dict) -> str:
    keys = [("mi", "configured estimator (mean over eval batches)"), ("mi_mine", "MINE DV bound (whole set)"),
            ("mi_plugin", "plug-in (whole set)")]
    rows = []
    for name, r in results.items():
        ind = r.get("independence", {})
        vals = [r.get("mi") if k == "mi" else ind.get(k) for k, _ in keys]
        if any(v is not None for v in vals):
            rows.append([name] + ["-" if v is None or not np.isfinite(v) else f"{v:.4f}" for v in vals])
    if not rows:
        return ""
    return format_table(["eval set"] + [label for _, label in keys], rows,
                                 "Held-out MI between invariant and routed specific representations (nats)")


def write_markdown(workdir: str, results: dict, refs: dict, num_modules: int, summary: dict,
                   config=None) -> str:
    """report.md: the run's setup, every table of the final evaluation and the plots, in one file."""
    lines = [f"# Run report: `{os.path.abspath(workdir)}`", ""]
    if config is not None:
        m, mi, r = config.model, config.mi, config.router
        lines += [f"- model: {m.get('num_modules')} specific module(s), invariant={m.get('invariant')}, "
                  f"aggregator={m.get('aggregator')}; router.mode={r.get('mode')}; mi.estimator={mi.get('estimator')}, "
                  f"mi.weight={mi.get('weight')}"]
    lines += [f"- steps {summary.get('steps')}, training {summary.get('train_s', 0):.0f} s "
              f"(+ {summary.get('train_wall_s', 0) - summary.get('train_s', 0):.0f} s periodic evaluation)", ""]
    blocks = [("Answer accuracy", evaluate.results_table(results, refs)),
              ("Routed modules", evaluate.modules_table(results, num_modules))]
    if any("views" in r for r in results.values()):
        blocks += [("Per-module views", evaluate.views_table(results)),
                   ("Independence", evaluate.independence_table(results))]
    mi = _mi_table(results)
    if mi:
        blocks.append(("Mutual information on held-out data", mi))
    for title, text in blocks:
        lines += [f"## {title}", "", "```", text, "```", ""]
        if title == "Routed modules":
            lines += [f"**{name}: {r['collapse']}**" for name, r in results.items() if "collapse" in r] + [""]
    lines += ["Independence numbers: router_nmi = normalised MI between routed module and rendering domain "
              "(1 = routing is the domain); router_codes_used / router_perplexity = codebook use; cka_* / corr_* "
              "= linear CKA and mean |Pearson| between pooled prompt representations (0 = unrelated).", ""]
    plots = [os.path.basename(p) for p in summary.get("plots", [])]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def relocation_report(moved: int, num_modules: int, step: int) -> str:
    """A line when the router's dead-code restart moved codes more often than once per module (codes kept
    moving between parts of the data, e.g. more modules than the prompts form clusters), else ``""``."""
    if moved <= num_modules:
        return ""
    return (f"the router relocated codes {moved} times in {step} steps: rows moved between modules "
            "(more modules than the prompts form clusters?); see routing.png")


def outputs_line(workdir: str, report_path: str, plots: list[str]) -> str:
    """Where a finished run's outputs are (printed last)."""
    names = ", ".join(os.path.basename(p) for p in plots)
    return (f"outputs in {workdir}: {os.path.basename(report_path)}, summary.json, metrics.jsonl, "
            f"TensorBoard events in tb/ (make tensorboard LOGDIR={workdir}); plots: {names}")
