"""Run reporting: metrics.jsonl + TensorBoard event files, PNG plots, and plain-text tables.

Only process 0 writes (multi-host runs call these on every process).
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import jax
import numpy as np

from iclm_jax.data.acre import QUERY_TYPES


def _scalarise(metrics: Mapping) -> dict[str, float]:
    """Flatten array metrics (e.g. route_fraction [K]) into name/i scalars."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.ndim == 0:
            out[k] = float(a)
        elif a.ndim == 1:
            out.update({f"{k}/{i}": float(x) for i, x in enumerate(a)})
    return out


class MetricsWriter:
    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.active:
            from tensorboardX import SummaryWriter
            os.makedirs(workdir, exist_ok=True)
            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            self._f = open(self.path, "a")

    def write(self, step: int, metrics: Mapping, prefix: str = "train") -> None:
        if not self.active:
            return
        flat = _scalarise(metrics)
        for k, v in flat.items():
            self.tb.add_scalar(f"{prefix}/{k}", v, step)
        try:
            self._f.write(json.dumps({"step": step, "split": prefix, **flat}) + "\n")
            self._f.flush()
        except OSError as e:    # name the file (a full disk's OSError has none)
            raise OSError(e.errno, e.strerror, self.path) from e

    def close(self) -> None:
        if self.active:
            self._f.close()
            self.tb.close()


def read_metrics(workdir: str, split: str = "train") -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("split") == split]


def answer_metrics(sums: Mapping) -> dict[str, float]:
    """Honest answer metrics from ``losses.answer_counts`` sums accumulated over a log interval.

    ``answer_acc`` (queries whose answer content is all argmax-right / queries), ``answer_acc/<type>``
    per ACRE query type, ``answer_ce`` (mean CE over answer content targets, EOS excluded), and the
    counts behind them: ``answer_queries`` and ``answer_queries/<type>``. A ratio whose count is 0 is
    left out (no NaN in the logs).
    """
    correct = np.asarray(sums["n/answer_correct"], np.float64)
    present = np.asarray(sums["n/answer_present"], np.float64)
    out = {"answer_queries": float(present[0])}
    if present[0] > 0:
        out["answer_acc"] = float(correct[0] / present[0])
    for t, name in enumerate(QUERY_TYPES):
        out[f"answer_queries/{name}"] = float(present[1 + t])
        if present[1 + t] > 0:
            out[f"answer_acc/{name}"] = float(correct[1 + t] / present[1 + t])
    tokens = float(sums["n/answer_tokens"])
    if tokens > 0:
        out["answer_ce"] = float(sums["n/answer_ce_sum"]) / tokens
    return out


def _records(workdir: str) -> dict[str, list[dict]]:
    """metrics.jsonl by split, one record per step (a resumed run re-logs steps: the last wins)."""
    by: dict[str, dict[int, dict]] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:     # blank, or cut short by a killed run
                continue
            if isinstance(r, dict) and "step" in r:
                by.setdefault(r.get("split", "train"), {})[r["step"]] = r
    return {k: [v[s] for s in sorted(v)] for k, v in by.items()}


def last_time_s(workdir: str, up_to_step: int) -> float:
    """The largest ``time_s`` logged at or before ``up_to_step`` (0 if none): a resumed run's clock."""
    recs = [r for rows in _records(workdir).values() for r in rows
            if r["step"] <= up_to_step and "time_s" in r]
    return max((float(r["time_s"]) for r in recs), default=0.0)


def write_json(path: str, obj) -> None:
    """``obj`` as JSON (NumPy scalars and arrays as numbers and lists), written whole or not at all."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else float(o))
    os.replace(tmp, path)


def save_with_outside_legend(fig, ax, path: str) -> str:
    """Legend to the right of ``ax``, tight layout, ``path`` written at 120 dpi, the figure closed."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def _pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend; None off process 0 (only it writes plots)."""
    if jax.process_index() != 0:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_learning_curve(workdir: str) -> list[str]:
    """Answer accuracy and answer CE versus training time -> learning_curve.png, answer_loss.png.

    Curves: ``train`` (the interval answer_acc / answer_ce of the train logs) and ``eval/<set>``
    (``all`` / ``answer_ce`` of each eval set). The x axis is minutes (``time_s``), or steps for a
    metrics file without times. With a ``references.json`` in the workdir (``{"<set>": {"majority":
    {"all": ..}, "object_count": {..}}, "majority_loss": x or {"<set>": x}}``; any predictor names, at most
    four per set) the references are
    dashed horizontal lines.
    """
    plt = _pyplot()
    if plt is None:
        return []

    recs = _records(workdir)
    if not recs:
        return []
    refs = {}
    ref_path = os.path.join(workdir, "references.json")
    if os.path.exists(ref_path):
        with open(ref_path) as f:
            refs = json.load(f)
    timed = all("time_s" in r for rows in recs.values() for r in rows)
    xlabel = "minutes" if timed else "step"

    def xs(rows):
        return np.array([r["time_s"] / 60 if timed else r["step"] for r in rows], dtype=float)

    def ys(rows, key):
        return np.array([r.get(key, np.nan) for r in rows], dtype=float)

    evals = sorted(k for k in recs if k.startswith("eval/"))
    colors = {name: f"C{i}" for i, name in enumerate(evals)}
    written = []

    def finish(fig, ax, name, ylabel, ylim=None):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:   # beside the axes: inside, it hid the last points
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        fig.tight_layout()
        path = os.path.join(workdir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(9, 4))
    train = recs.get("train", [])
    if any("answer_acc" in r for r in train):
        ax.plot(xs(train), ys(train, "answer_acc"), color="0.45", lw=1, label="train (interval)")
    for split in evals:
        ax.plot(xs(recs[split]), ys(recs[split], "all"), "o-", ms=3, color=colors[split], label=split)
    for name, preds in refs.items():
        if not isinstance(preds, dict):
            continue
        color = colors.get(f"eval/{name}", "0.2")
        for (pred, scores), style in zip(preds.items(), ("--", ":", "-.", (0, (1, 3)))):   # every reference
            val = scores.get("all") if isinstance(scores, dict) else None
            if val is not None and np.isfinite(val):
                ax.axhline(val, ls=style, lw=1, color=color, label=f"{name}: {pred} {val:.2f}")
    ax.set_title("Answer accuracy (exact match of the answer, EOS excluded)")
    finish(fig, ax, "learning_curve.png", "answer accuracy", (0, 1))

    fig, ax = plt.subplots(figsize=(9, 4))
    if any("answer_ce" in r for r in train):
        ax.plot(xs(train), ys(train, "answer_ce"), color="0.45", lw=1, label="train (interval)")
    for split in evals:
        if any("answer_ce" in r for r in recs[split]):
            ax.plot(xs(recs[split]), ys(recs[split], "answer_ce"), "o-", ms=3, color=colors[split],
                    label=split)
    ml = refs.get("majority_loss")
    for name, val in (ml.items() if isinstance(ml, dict) else [("", ml)] if ml is not None else []):
        if val is not None and np.isfinite(val):
            ax.axhline(val, ls="--", lw=1, color=colors.get(f"eval/{name}", "0.2"),
                       label=f"{name + ': ' if name else ''}majority loss {val:.3f}")
    ax.set_title("Answer cross-entropy (content tokens, EOS excluded)")
    finish(fig, ax, "answer_loss.png", "answer CE (nats/token)")
    return written


def plot_training(workdir: str, num_domains: int = 2) -> list[str]:
    """loss terms, MI and routing over steps -> PNG files in the workdir (route purity only with 2+ domains:
    with one it is 1 by definition)."""
    plt = _pyplot()
    if plt is None:
        return []

    rows = read_metrics(workdir)
    if not rows:
        return []
    steps = np.array([r["step"] for r in rows])

    def series(key):
        return np.array([r.get(key, np.nan) for r in rows], dtype=float)

    written = _plot_mi(plt, workdir, steps, series) + _plot_routing(plt, workdir, steps, series, rows, num_domains)
    keys = drawn_loss_terms(rows, [k for k in ("loss", "ce", "answer_ce", "context_ce", "vq", "aux")
                                   if any(k in r for r in rows)])
    if keys:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in keys:
            ax.plot(steps, series(k), label=k)
        ax.set_xlabel("step")
        ax.set_ylabel("value (cross-entropies in nats)")
        ax.set_title("Loss terms (ce: with EOS; answer_ce: answer only)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(plt, fig, workdir, "loss.png"))
    return written


def _save(plt, fig, workdir: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(workdir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _num_routed(rows: list[dict]) -> int:
    """K: the modules whose route fraction the train logs carry."""
    return sum(key.startswith("route_fraction/") for key in rows[-1])


def routing_panels(rows: list[dict], num_domains: int) -> list[str]:
    """The axes of routing.png: none with fewer than 2 modules (nothing is routed: every line would sit at 1),
    else the route fractions, the perplexity and (with 2+ domains; with one it is 1 by definition) purity."""
    if _num_routed(rows) < 2:
        return []
    return ["route_fraction"] + [key for key in ("router_perplexity", "route_purity")[:2 if num_domains > 1 else 1]
                                 if any(key in r for r in rows)]


def _plot_routing(plt, workdir: str, steps, series, rows: list[dict], num_domains: int) -> list[str]:
    """routing.png, one quantity per axis: each module's share of the routed rows (stacked, so that equal
    shares stay visible), the router's perplexity against its range 1..K, and the route purity (the
    fraction of rows sent to their domain's majority module). Nothing is drawn with fewer than 2 modules."""
    panels = routing_panels(rows, num_domains)
    if not panels:
        return []
    k, others = _num_routed(rows), panels[1:]
    fig, axes = plt.subplots(1, 1 + len(others), figsize=(4.2 * (1 + len(others)), 3.4), squeeze=False)
    ax = axes[0][0]
    fractions = np.nan_to_num(np.stack([series(f"route_fraction/{i}") for i in range(k)]))
    ax.stackplot(steps, fractions, labels=[f"module {i}" for i in range(k)], alpha=0.85)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of routed rows")
    ax.set_title("Route per module (stacked)")
    ax.legend(fontsize=7, loc="lower right", ncol=2 if k > 4 else 1, framealpha=0.9)
    for ax, key in zip(axes[0][1:], others):
        ax.plot(steps, series(key), color="C3" if key == "route_purity" else "C4")
        if key == "router_perplexity":
            ax.axhline(k, ls="--", lw=1, color="gray", label=f"{k}: every module used equally")
            ax.set_ylim(0.9, k + 0.1 * k)
            ax.set_ylabel("perplexity of the route distribution")
            ax.set_title("Router perplexity (1 = one module)")
            ax.legend(fontsize=7, loc="lower right")
        else:
            ax.set_ylim(0, 1.02)
            ax.set_ylabel("route purity")
            ax.set_title("Route purity vs domain")
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return [_save(plt, fig, workdir, "routing.png")]


def drawn_loss_terms(rows: list[dict], keys: list[str]) -> list[str]:
    """The loss.png lines: ``loss`` and ``ce`` always; another term only if it is ever nonzero (a term that
    is off, e.g. ``aux`` without auxiliary heads or ``vq`` without a router, would draw a flat 0 line)."""
    return [k for k in keys if k in ("loss", "ce") or any(np.nan_to_num(float(r.get(k, 0.0))) for r in rows)]


def _plot_mi(plt, workdir: str, steps, series) -> list[str]:
    """mi.png: MINE's estimates (the model's penalty term and the critic's own bound, dashed) and the
    plug-in estimate side by side, each on its own axis (their scales differ by orders of magnitude).
    Without a critic, ``mi`` is the plug-in estimate (mi.estimator=plugin) or 0 (none)."""
    def some(x):
        return np.nan_to_num(x).any()

    has_critic = some(series("mine_critic_bound"))
    plugin = series("mi_plugin") if some(series("mi_plugin")) else None
    if plugin is None and not has_critic and some(series("mi")):
        plugin = series("mi")
    panels = (["mine"] if has_critic else []) + (["plugin"] if plugin is not None else [])
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "mine":
            ax.plot(steps, series("mi"), lw=1.5, label="penalty term (mi)")
            ax.plot(steps, series("mine_critic_bound"), "--", lw=1, label="critic's own bound")
            ax.set_title("MINE (Donsker–Varadhan bound)")
        else:
            monitor = some(series("mi_plugin"))
            ax.plot(steps, plugin, color="C2", label="plug-in (monitor, not optimised)" if monitor
                    else "plug-in (the penalty term)")
            ax.set_title("plug-in estimate (the paper's)")
        ax.set_xlabel("step")
        ax.set_ylabel("MI invariant; specific (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(workdir, "mi.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def format_table(header: Sequence[str], rows: Sequence[Sequence], title: str = "") -> str:
    cells = [[str(h) for h in header]] + [[_fmt(x) for x in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "-+-".join("-" * w for w in widths)
    out = [title] if title else []
    for j, r in enumerate(cells):
        out.append(" | ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths))))
        if j == 0:
            out.append(line)
    return "\n".join(out)


def _fmt(x) -> str:
    if isinstance(x, float):
        return "-" if np.isnan(x) else f"{100 * x:.1f}%" if 0 <= x <= 1 else f"{x:.3f}"
    return str(x)
