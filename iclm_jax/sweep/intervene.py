"""``iclm-sweep intervene WORKDIR``: interventions on the modules of every finished point of a sweep.

Each point with two or more specific modules is restored from its checkpoint and evaluated under the
interventions of ``--spec`` (default ``all``: ``iclm_jax/intervene.py``) on its own eval sets: the test
sets of ``data.eval_splits`` and ``data.eval_files``, generated again with the run's seeds
(``LoadedRun.eval_sets``), not the validation set (``--sets`` names other ones). Each point gets
``<point>/interventions/``: ``report.md``, ``interventions.png`` and ``interventions.json`` (every count;
``collect`` pools them per group). A point with a report is skipped, so a rerun resumes; a point with one
module is skipped with its reason (there is nothing to intervene on). Teacher-forced scoring only: the
greedy-generation score is ``iclm-eval --intervene --score=both`` on one run.
"""
from __future__ import annotations

import json
import os
import re
import time
import traceback

import jax

from iclm_jax import intervene, intervention_report
from iclm_jax.data.sources import VAL_SET
from iclm_jax.report import write_json
from iclm_jax.sweep.launchers import compile_cache_dir
from iclm_jax.train.run import load_run

OUT_DIR = "interventions"
RESULTS = "interventions.json"
SUMMARY = "summary.json"


def results_path(workdir: str, point: dict) -> str:
    return os.path.join(workdir, point["dirname"], OUT_DIR, RESULTS)


def skip_reason(workdir: str, point: dict) -> str | None:
    """Why a point gets no interventions (None: it gets them)."""
    path = os.path.join(workdir, point["dirname"])
    if not os.path.isfile(os.path.join(path, SUMMARY)):
        return "not finished"
    with open(os.path.join(path, "config.json")) as f:
        k = json.load(f)["model"]["num_modules"]
    if k < 2:
        return f"{k} specific module: nothing to route, swap or tell apart"
    return None


def run_point(path: str, spec: str = "all", sets: list[str] | None = None) -> dict:
    """One point's interventions (``intervene.evaluate_sets``, teacher-forced) -> the JSON written to
    ``<path>/interventions/interventions.json``, beside ``report.md`` and ``interventions.png``; its
    ``started_at`` / ``finished_at`` (Unix times) go into the sweep's wall time (``collect``)."""
    started = time.time()
    run = load_run(path)
    chosen = run.eval_sets(only=sets)
    if sets is None:
        chosen = [es for es in chosen if es.name != VAL_SET] or chosen
    missing = sorted(set(sets or ()) - {es.name for es in chosen})
    if missing:
        raise ValueError(f"--sets {','.join(missing)}: not an eval set of {path} "
                         f"(it has: {', '.join(es.name for es in run.eval_sets()) or 'none'})")
    results = intervene.evaluate_sets(run, {es.name: es.examples for es in chosen}, spec)
    out_dir = os.path.join(path, OUT_DIR)
    intervention_report.write(out_dir, results, workdir=os.path.abspath(path), step=run.step)
    record = {"workdir": os.path.abspath(path), "step": run.step, "spec": spec,
              "sets": [es.name for es in chosen], "interventions": results,
              "started_at": started, "finished_at": time.time()}
    write_json(os.path.join(out_dir, RESULTS), record)   # written last: its presence means the point is done
    return record


def run_all(workdir: str, sweep: dict, *, spec: str = "all", sets: list[str] | None = None, only: str = "",
            redo: bool = False) -> list[str]:
    """Every point of ``sweep`` (``sweep.json``) in turn, printing one line each -> the names that failed."""
    pts = [p for p in sweep["points"] if not only or re.search(only, p["name"])]
    if not jax.config.jax_compilation_cache_dir:      # reuse the compiled steps of the points' evaluations
        jax.config.update("jax_compilation_cache_dir", compile_cache_dir(workdir))
    failed = []
    for i, p in enumerate(pts):
        head = f"[{i + 1}/{len(pts)}] {p['name']}"
        why = skip_reason(workdir, p)
        if why:
            print(f"{head}: skipped ({why})", flush=True)
            continue
        if os.path.isfile(results_path(workdir, p)) and not redo:
            print(f"{head}: done before, skipped", flush=True)
            continue
        t0 = time.time()
        try:
            rec = run_point(os.path.join(workdir, p["dirname"]), spec, sets)
        except Exception as e:      # noqa: BLE001 -- one point's failure must not stop the others
            traceback.print_exc()
            print(f"{head}: FAILED ({type(e).__name__}: {e})", flush=True)
            failed.append(p["name"])
            continue
        print(f"{head}: {len(rec['interventions']['teacher']['interventions'])} interventions on "
              f"{', '.join(rec['sets'])} in {time.time() - t0:.0f}s -> "
              f"{os.path.join(workdir, p['dirname'], OUT_DIR, 'report.md')}", flush=True)
    return failed
