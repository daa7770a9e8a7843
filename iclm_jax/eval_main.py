"""``iclm-eval --workdir RUN --data FILE [--data FILE ...] [--score teacher|generate|both] [--out FILE]``:
evaluate a trained run on ACRE release-format JSON files or evals-style JSONL files and print the accuracy
tables: teacher-forced exact match (``evaluate.py``, the default) and/or exact / partial match and F1 of
greedy generations (``generate_score.py``); ``--out`` also writes every number as JSON.

``--intervene=SPEC`` evaluates under interventions on the modules instead (``intervene.py``: ``route=M``,
``swap``, ``ablate=M|invariant``, ``invariant-only``, ``specific-only``, ``all``) and prints their tables;
``--report DIR`` also writes ``report.md`` and a PNG there (``intervention_report.py``)."""
from __future__ import annotations

import argparse
import os
import sys

from iclm_jax import generate_score, intervene, intervention_report
from iclm_jax.data.acre import QUERY_TYPES
from iclm_jax.data.render import DOMAINS
from iclm_jax.evaluate import independence_table, modules_table, results_table, views_table
from iclm_jax.report import format_table, write_json
from iclm_jax.train.run import load_run

SCORES = ("teacher", "generate", "both")


class _Parser(argparse.ArgumentParser):
    """A refused command line is one line on stderr and exit status 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message}\n")


def _batch_size(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n}: expected an integer >= 1 (0 = the run's eval.batch_size)")
    return n


def _fraction(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = float("nan")
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a fraction in [0, 1]")
    return x


def _new_tokens(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer >= 1 (0 = the longest ideal answer + "
                                         f"{generate_score.EXTRA_NEW_TOKENS})")
    return n


def _interventions(text: str) -> list:
    try:
        return intervene.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def generation_table(scores: dict[str, dict], teacher: dict[str, dict] | None = None) -> str:
    """One row per (eval set, group): overall, per query type, per domain (groups without queries left
    out); exact / partial match and F1 of the greedy generations, and with ``teacher`` (``summarise``
    results) the teacher-forced exact match of the same queries beside them."""
    header = (["eval set / group", "queries", "exact", "partial", "last word", "F1", "F1 of"]
              + (["teacher exact"] if teacher else []))
    kinds = {"binary": "on vs off", "token": "tokens"}
    rows = []
    for name, s in scores.items():
        for group in ["all", *QUERY_TYPES, *(f"domain_{d}" for d in DOMAINS)]:
            g = s["groups"].get(group)
            if g is None:
                continue
            row = [f"{name}: {group.replace('_', ' ') if group.startswith('domain_') else group}", g["queries"],
                   g["exact"], g["partial"], g["last_word"], g["f1"], kinds[g["f1_kind"]]]
            if teacher:
                row.append(teacher.get(name, {}).get(group, float("nan")))
            rows.append(row)
    n = sorted({s["max_new_tokens"] for s in scores.values()})
    return format_table(header, rows, "Generated answers (greedy, up to EOS or "
                        f"{'/'.join(map(str, n))} new tokens): exact / partial match, last word (RAVEN worked "
                        "answers: the letter after the model's own panel), F1")


def run_eval(argv=None) -> int:
    """Console script ``iclm-eval``."""
    p = _Parser(prog="iclm-eval",
                description="evaluate a trained run on ACRE release JSON or evals JSONL files")
    p.add_argument("--workdir", required=True, help="a trained run directory")
    p.add_argument("--data", required=True, action="append",
                   help="ACRE release JSON or evals JSONL (repeatable)")
    p.add_argument("--batch_size", type=_batch_size, default=0,
                   help="rows per eval batch (default: the run's eval.batch_size; rounded up to the batch split)")
    p.add_argument("--max_unk", type=_fraction, default=None,
                   help="accept a file with up to this fraction of <unk> tokens (default: the run's data.max_unk)")
    p.add_argument("--score", choices=SCORES, default="teacher",
                   help="teacher: teacher-forced exact match (default); generate: greedy generations scored "
                        "by exact / partial match and F1; both: both, the teacher-forced one beside")
    p.add_argument("--max_new_tokens", type=_new_tokens, default=0,
                   help="generation length limit (default: the file's longest ideal answer in tokens + "
                        f"{generate_score.EXTRA_NEW_TOKENS})")
    p.add_argument("--out", default="",
                   help="also write the results (every table's numbers, per eval file) to this JSON file")
    p.add_argument("--intervene", type=_interventions, default=None,
                   help="evaluate under interventions on the modules, comma-separated: route=M, swap, ablate=M, "
                        "ablate=invariant, invariant-only, specific-only, none, all (iclm_jax/intervene.py); "
                        "prints the intervention tables instead of the usual ones")
    p.add_argument("--report", default="",
                   help="with --intervene: write report.md and interventions.png into this directory")
    args = p.parse_args(argv)
    if args.report and args.intervene is None:
        p.error("--report needs --intervene")
    if args.report and os.path.exists(args.report) and not os.path.isdir(args.report):
        p.error(f"--report {args.report}: not a directory")
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else ""
    if args.out and (os.path.isdir(args.out) or not os.path.isdir(out_dir)):
        why = "is a directory" if os.path.isdir(args.out) else f"its directory {out_dir} does not exist"
        print(f"iclm-eval: --out {args.out}: {why}", file=sys.stderr)
        return 2
    try:
        run = load_run(args.workdir)
    except (FileNotFoundError, ValueError) as e:
        print(f"iclm-eval: {e}", file=sys.stderr)
        return 2
    if args.intervene is not None:
        return _run_interventions(run, args)
    results, refs, scores = {}, {}, {}
    for path in args.data:
        try:
            if args.score != "generate":
                name, res, ref = run.evaluate_file(path, batch_size=args.batch_size or None, max_unk=args.max_unk)
                results[name], refs[name] = res, ref
            if args.score != "teacher":
                name, scores[name] = generate_score.score_file(
                    run, path, max_new_tokens=args.max_new_tokens or None, batch_size=args.batch_size or None,
                    max_unk=args.max_unk)
        except (FileNotFoundError, ValueError) as e:
            print(f"iclm-eval: {e}", file=sys.stderr)
            return 2
    if args.out:
        write_json(args.out, {"workdir": os.path.abspath(args.workdir), "step": run.step, "data": args.data,
                               "score": args.score, "teacher": results, "reference": refs, "generate": scores})
        print(f"iclm-eval: wrote {args.out}", file=sys.stderr)
    if args.score == "generate":
        print(generation_table(scores))
        return 0
    print(results_table(results, refs))
    print()
    print(modules_table(results, run.num_modules))
    if any("views" in r for r in results.values()):
        print()
        print(views_table(results))
        print()
        print(independence_table(results))
    if args.score == "both":
        print()
        print(generation_table(scores, results))
    return 0


def _run_interventions(run, args) -> int:
    """``--intervene``: every file under every intervention; the tables, and the report and JSON if asked."""
    try:
        results = intervene.evaluate_files(run, args.data, args.intervene, score=args.score,
                                           batch_size=args.batch_size or None, max_unk=args.max_unk,
                                           max_new_tokens=args.max_new_tokens or None)
    except (FileNotFoundError, ValueError) as e:
        print(f"iclm-eval: {e}", file=sys.stderr)
        return 2
    print(intervention_report.tables(results))
    if args.report:
        paths = intervention_report.write(args.report, results, workdir=os.path.abspath(args.workdir),
                                          step=run.step)
        print(f"iclm-eval: wrote {', '.join(paths)}", file=sys.stderr)
    if args.out:
        write_json(args.out, {"workdir": os.path.abspath(args.workdir), "step": run.step, "data": args.data,
                               "score": args.score, "interventions": results})
        print(f"iclm-eval: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_eval())
