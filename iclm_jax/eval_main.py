"""``iclm-eval --workdir RUN --data FILE [--data FILE ...]``: evaluate a trained run on ACRE
release-format JSON files or evals-style JSONL files and print the accuracy tables (``evaluate.py``)."""
from __future__ import annotations

import argparse
import sys

from iclm_jax.evaluate import independence_table, modules_table, results_table, views_table
from iclm_jax.train.run import load_run


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


def run_eval(argv=None) -> int:
    """Console script ``iclm-eval``."""
    p = argparse.ArgumentParser(prog="iclm-eval",
                                description="evaluate a trained run on ACRE release JSON or evals JSONL files")
    p.add_argument("--workdir", required=True, help="a trained run directory")
    p.add_argument("--data", required=True, action="append",
                   help="ACRE release JSON or evals JSONL (repeatable)")
    p.add_argument("--batch_size", type=_batch_size, default=0,
                   help="rows per eval batch (default: the run's eval.batch_size; rounded up to the batch split)")
    p.add_argument("--max_unk", type=_fraction, default=None,
                   help="accept a file with up to this fraction of <unk> tokens (default: the run's data.max_unk)")
    args = p.parse_args(argv)
    try:
        run = load_run(args.workdir)
    except (FileNotFoundError, ValueError) as e:
        print(f"iclm-eval: {e}", file=sys.stderr)
        return 2
    results, refs = {}, {}
    for path in args.data:
        try:
            name, res, ref = run.evaluate_file(path, batch_size=args.batch_size or None, max_unk=args.max_unk)
        except (FileNotFoundError, ValueError) as e:
            print(f"iclm-eval: {e}", file=sys.stderr)
            return 2
        results[name], refs[name] = res, ref
    print(results_table(results, refs))
    print()
    print(modules_table(results, run.num_modules))
    if any("views" in r for r in results.values()):
        print()
        print(views_table(results))
        print()
        print(independence_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(run_eval())
