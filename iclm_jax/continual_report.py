"""The forgetting report of continual runs (``continual.from_run``): ``report.md``, ``continual.png`` and
``continual.json``.

``python -m iclm_jax.continual_report RUN [RUN ...] --out DIR [--split IID] [--problems 100]``

Every RUN continues the same trained run (its ``continual.from_run``: "before"), in mode ``grow`` or
``finetune``. Before and every RUN are evaluated on the same inputs: ``--problems`` generated test problems
of ``--split`` (seed: before's ``seed`` + 1000, its first eval split's problems when that is ``--split``),
rendered as before's data was (form, packing) in every rendering that before or a RUN trained on. The
renderings before trained on are the old domains; the others are new.

Reported per run: teacher-forced accuracy per domain and its change from before (forgetting = before −
after on an old domain). Routing: rows per module and domain, and the purity of modules vs domains. "Old
rows routed as before" is the fraction of old-domain rows sent to the same module as before's router sent
them; those rows of a grow run get exactly before's output, whatever the training. "New rows to the new
module" is the fraction of new-domain rows a grow run sends to its new module.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from iclm_jax import evaluate
from iclm_jax.config_check import ConfigError
from iclm_jax.data import sources, tasks
from iclm_jax.data.render import DOMAINS
from iclm_jax.fields import csv
from iclm_jax.padding import round_up
from iclm_jax.report import _pyplot, format_table
from iclm_jax.train.run import load_run


def evaluate_runs(workdirs: list[str], split: str = "IID", problems: int = 100) -> dict:
    """Before (the runs' common ``continual.from_run``) and each run on the same examples: accuracy per domain,
    routing counts and per-row routing against before's. JSON-able."""
    if not workdirs:
        raise ConfigError("no continual run given")
    if problems < 1:
        raise ConfigError(f"--problems {problems}: expected an integer >= 1")
    runs = [load_run(w) for w in workdirs]
    for w, r in zip(workdirs, runs):
        if not _from_run(r):
            raise ConfigError(f"{w}: not a continual run (its config has no continual.from_run)")
    froms = sorted({os.path.realpath(_from_run(r)) for r in runs})
    if len(froms) > 1:
        raise ConfigError(f"the runs continue different runs ({', '.join(froms)}); report one at a time")
    before_dir = _from_run(runs[0])
    before = load_run(before_dir)
    d = before.config.data
    old = csv(d.styles)
    new = [s for s in DOMAINS if s not in old and any(s in csv(r.config.data.styles) for r in runs)]
    styles = [s for s in DOMAINS if s in old + new]
    task = tasks.get(d.get("task", "acre"))
    seed = int(before.config.seed) + 1000
    test = task.generate(split, "test", problems, seed)
    examples = task.render(test, styles, d.packed, d.get("form", "full"), False, d.get("worked_answer", False))
    # what surface statistics alone score on these problems (the same in every rendering), fitted on before's
    # training problems: a run near them has not learned the rule
    refs = {k: task.score_reference(f, test)["all"] for k, f in task.fit_reference(before.train_problems()).items()}
    out = {"before": before_dir, "split": split, "problems": problems, "seed": seed, "domains": styles,
           "old_domains": old, "new_domains": new, "references": refs, "runs": []}
    ref = None
    for name, workdir, run in [("before", before_dir, before)] + [(None, w, r) for w, r in zip(workdirs, runs)]:
        res = _results(run, examples)
        row = _summary(res, run, styles)
        mode = "-" if name else run.config.continual.get("mode", "grow")     # before: no mode
        row.update(name=name or f"{mode}: {os.path.basename(os.path.normpath(workdir))}", workdir=workdir,
                   mode=mode, steps=int(run.step))
        if ref is None:
            ref = res
        else:
            row.update(_against(res, ref, styles, old, new, mode, run.num_modules))
        out["runs"].append(row)
    return out


def _from_run(run) -> str:
    return (run.config.get("continual") or {}).get("from_run", "")


def _results(run, examples) -> dict:
    need = sources.measure(run.data.num_slots, run.data.tokenizer, "the report's examples", examples) + 1
    run.data.max_len = max(run.data.max_len, round_up(need, 32))
    res = run.run_set(run.eval_step, examples)
    real = res["present"].any(1)
    return {k: v for k, v in res.items() if not k.startswith("pooled")} | {"real": real}


def _summary(res: dict, run, styles: list[str]) -> dict:
    s = evaluate.summarise(res, run.num_modules)
    k, real = run.num_modules, res["real"]
    counts = [[int(np.sum(real & (res["module"] == m) & (res["domain"] == DOMAINS.index(st)))) for st in styles]
              for m in range(k)]
    return {"num_modules": k, "accuracy": {"all": s["all"], **{st: s[f"domain_{st}"] for st in styles}},
            "routing": counts, "purity": s["purity"]}


def _against(res: dict, ref: dict, styles, old, new, mode: str, k: int) -> dict:
    """Per-row routing of a run against before's (the same rows in the same order)."""
    real = res["real"] & ref["real"]
    is_old = np.isin(res["domain"], [DOMAINS.index(s) for s in old]) & real
    is_new = np.isin(res["domain"], [DOMAINS.index(s) for s in new]) & real
    kept = float(np.mean(res["module"][is_old] == ref["module"][is_old])) if is_old.any() else float("nan")
    to_new = (float(np.mean(res["module"][is_new] == k - 1)) if mode == "grow" and is_new.any() else float("nan"))
    return {"old_rows_kept": kept, "new_rows_to_new_module": to_new}


# ---------------------------------------------------------------------------------------------- writing
def write(out_dir: str, results: dict) -> list[str]:
    """``report.md``, ``continual.png`` and ``continual.json`` in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "continual.json"), os.path.join(out_dir, "report.md")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=2)
    png = plot(out_dir, results)
    with open(paths[1], "w") as f:
        f.write(markdown(results, os.path.basename(png) if png else ""))
    return paths + ([png] if png else [])


def tables(results: dict) -> str:
    """The accuracy and routing tables (plain text)."""
    styles, old = results["domains"], results["old_domains"]
    tag = lambda s: f"{s} ({'old' if s in old else 'new'})"   # noqa: E731
    before = results["runs"][0]["accuracy"]
    rows = []
    for r in results["runs"]:
        acc = r["accuracy"]
        cells = [acc[s] if r is results["runs"][0] else f"{_pct(acc[s])} ({_pts(acc[s] - before[s])})" for s in styles]
        rows.append([r["name"], r["steps"], *cells, acc["all"]])
    for name, acc in results.get("references", {}).items():
        rows.append([f"*{name} predictor*", "-", *([acc] * len(styles)), acc])
    acc_table = format_table(["run", "steps", *map(tag, styles), "all"], rows)
    rows = []
    for r in results["runs"]:
        per_domain = [" / ".join(str(r["routing"][m][i]) for m in range(r["num_modules"])) for i in range(len(styles))]
        rows.append([r["name"], *per_domain, r["purity"], r.get("old_rows_kept", float("nan")),
                     r.get("new_rows_to_new_module", float("nan"))])
    route_table = format_table(["run", *(f"{tag(s)}: rows per module" for s in styles), "purity",
                                "old rows routed as before", "new rows to the new module"], rows)
    return acc_table + "\n\n" + route_table


def markdown(results: dict, png: str = "") -> str:
    old, new = ", ".join(results["old_domains"]), ", ".join(results["new_domains"]) or "none"
    lines = ["# Continual learning: forgetting report", "",
             f"Before: `{results['before']}` (trained on {old}). Every run is evaluated on the same "
             f"{results['problems']} generated `{results['split']}` test problems (seed {results['seed']}) in "
             f"{', '.join(results['domains'])}; old domains: {old}; new: {new}.", "",
             "Accuracy (teacher-forced exact match per query) and its change from before in points; "
             "forgetting is a drop on an old domain. The reference predictors (fitted on before's training "
             "problems; the same in every rendering) score what surface statistics alone reach. "
             "Routing: rows per module (module 0 / 1 / ...) for each "
             "domain; *old rows routed as before*: old-domain rows the run sends to the module before's router "
             "sent them to (in a grow run they get exactly before's output); *new rows to the new module*: "
             "new-domain rows a grow run sends to its new module.", "", "```", tables(results), "```", ""]
    for r in results["runs"][1:]:
        drops = [f"{s} {_pts(r['accuracy'][s] - results['runs'][0]['accuracy'][s])}" for s in results["domains"]]
        lines.append(f"- {r['name']}: {', '.join(drops)}; old rows routed as before {_pct(r['old_rows_kept'])}"
                     + (f", new rows to module {r['num_modules'] - 1} {_pct(r['new_rows_to_new_module'])}"
                        if r["mode"] == "grow" else "") + ".")
    if png:
        lines += ["", f"![accuracy per domain and routing]({png})"]
    return "\n".join(lines) + "\n"


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"


def _pts(x: float) -> str:
    return "-" if x != x else f"{100 * x:+.1f}"


def plot(out_dir: str, results: dict) -> str:
    """continual.png: accuracy per domain for before and each run (left); the share of each domain's rows per
    module, per run (right; the grow runs' new module in orange)."""
    plt = _pyplot()
    if plt is None:
        return ""
    runs, styles, old = results["runs"], results["domains"], results["old_domains"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.3]})
    width = 0.8 / len(runs)
    run_colours = ["0.6"] + [f"C{i}" for i in range(1, len(runs))]        # before grey
    for i, r in enumerate(runs):
        xs = np.arange(len(styles)) + (i - (len(runs) - 1) / 2) * width
        ys = [100 * r["accuracy"][s] for s in styles]
        bars = left.bar(xs, ys, width, label=r["name"], color=run_colours[i])
        for b, y in zip(bars, ys):
            left.text(b.get_x() + b.get_width() / 2, y + 1, f"{y:.0f}", ha="center", fontsize=8)
    for j, (name, acc) in enumerate(results.get("references", {}).items()):
        left.axhline(100 * acc, color="k", ls=("--", ":")[j % 2], lw=1, label=f"{name} predictor")
    left.set_xticks(range(len(styles)), [f"{s}\n({'old' if s in old else 'new'} domain)" for s in styles])
    left.set_ylabel("accuracy (%)")
    left.set_ylim(0, 105)
    left.set_title(f"Accuracy per domain ({results['split']}, {results['problems']} problems)", fontsize=10)
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    k_max = max(r["num_modules"] for r in runs)
    colours = [plt.cm.Blues(0.35 + 0.5 * m / max(k_max - 1, 1)) for m in range(k_max)]
    labels, x = [], 0
    for r in runs:
        counts = np.asarray(r["routing"], float)                      # [K, domains]
        share = counts / np.maximum(counts.sum(0, keepdims=True), 1)
        for j, s in enumerate(styles):
            bottom = 0.0
            for m in range(r["num_modules"]):
                new = r["mode"] == "grow" and m == r["num_modules"] - 1
                right.bar(x, share[m, j], 0.8, bottom=bottom, color="tab:orange" if new else colours[m],
                          edgecolor="white")
                if share[m, j] > 0.08:
                    right.text(x, bottom + share[m, j] / 2, str(m), ha="center", va="center", fontsize=8)
                bottom += share[m, j]
            labels.append(f"{r['name'].split(':')[0]}\n{s}")
            x += 1
        x += 0.5
    ticks = [i + 0.5 * (i // len(styles)) for i in range(len(labels))]
    right.set_xticks(ticks, labels, fontsize=8)
    right.set_ylabel("share of the domain's rows")
    right.set_ylim(0, 1)
    right.set_title("Routing: where each domain's rows go (numbers: module; orange: new)", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "continual.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m iclm_jax.continual_report", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="continual runs' workdirs (all continuing the same run)")
    p.add_argument("--out", required=True, help="directory for report.md, continual.png, continual.json")
    p.add_argument("--split", default="IID", help="the generated test split (default IID)")
    p.add_argument("--problems", type=int, default=100, help="generated test problems (default 100)")
    args = p.parse_args(argv)
    try:
        results = evaluate_runs(args.runs, args.split, args.problems)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"continual_report: {e}", file=sys.stderr)
        return 2
    paths = write(args.out, results)
    print(tables(results))
    print(f"\nwrote {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
