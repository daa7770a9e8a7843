"""Run reporting: metrics.jsonl + TensorBoard event files, PNG plots, and plain-text tables.

Only process 0 writes (multi-host runs call these on every process).
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import jax
import numpy as np


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
        self._f.write(json.dumps({"step": step, "split": prefix, **flat}) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self.active:
            self._f.close()
            self.tb.close()


def read_metrics(workdir: str, split: str = "train") -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("split") == split]


def plot_training(workdir: str) -> list[str]:
    """loss terms, MI and routing fractions over steps -> PNG files in the workdir."""
    if jax.process_index() != 0:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    if not rows:
        return []
    steps = np.array([r["step"] for r in rows])

    def series(key):
        return np.array([r.get(key, np.nan) for r in rows], dtype=float)

    written = []
    panels = [("loss.png", "Loss terms", ["loss", "ce", "vq", "aux"]),
              ("mi.png", "Mutual information (invariant; specific)", ["mi", "mine_critic_bound"]),
              ("routing.png", "Routing", sorted(k for k in rows[-1] if k.startswith("route_fraction/"))
               + ["router_perplexity", "route_purity"])]
    for name, title, keys in panels:
        keys = [k for k in keys if any(k in r for r in rows)]
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in keys:
            ax.plot(steps, series(k), label=k)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(workdir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


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
