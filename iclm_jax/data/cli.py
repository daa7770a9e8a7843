"""The ACRE data command line (``python -m iclm_jax.data.acre``)::

    python -m iclm_jax.data.acre generate --split Comp --part train --n 10000 --seed 0 --out F.json
    python -m iclm_jax.data.acre check F.json [G.json ...]    # exit 1 on a bad format or label
    python -m iclm_jax.data.acre stats F.json                  # query type x label table
    python -m iclm_jax.data.acre render F.json --style text --out F.jsonl [--packed]
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from iclm_jax.data.acre import (
    PARTS,
    SPLITS,
    AcreFormatError,
    _disagreements,
    format_stats,
    load_problems,
    save_problems,
)
from iclm_jax.data.acre_generate import generate_problems
from iclm_jax.data.jsonl import write_jsonl
from iclm_jax.data.render import DOMAINS, render_problem


def _run_generate(args: argparse.Namespace) -> int:
    problems = generate_problems(args.split, args.part, args.n, args.seed)
    save_problems(problems, args.out)
    print(f"wrote {len(problems)} {args.split}/{args.part} problems (seed {args.seed}) "
          f"to {args.out}")
    print(format_stats(problems))
    return 0


def _run_check(args: argparse.Namespace) -> int:
    return check_files(args.files, load_problems, AcreFormatError, lambda e: print(f"FORMAT ERROR {e}"),
                       _disagreements,
                       lambda ps: f"OK, {len(ps)} problems, {4 * len(ps)} queries, every label agrees with the rule")


def check_files(paths, load, format_error: type, report_format_error, problem_lines, ok_text) -> int:
    """``check``: each file is read with ``load`` (a ``format_error`` goes to ``report_format_error``), then
    ``problem_lines(i, problem)`` (the disagreements of problem i, each a line) are printed as ``path: line``,
    and a count, or ``path: ok_text(problems)``. Exit status 1 if any file is bad."""
    status = 0
    for path in paths:
        try:
            problems = load(path)
        except format_error as e:
            report_format_error(e)
            status = 1
            continue
        bad = [problem_lines(i, p) for i, p in enumerate(problems)]
        for line in (line for lines in bad for line in lines):
            print(f"{path}: {line}")
        n_bad = sum(map(bool, bad))
        if n_bad:
            status = 1
            print(f"{path}: {sum(map(len, bad))} disagreement(s) in {n_bad} of {len(problems)} problems")
        else:
            print(f"{path}: {ok_text(problems)}")
    return status


def _run_stats(args: argparse.Namespace) -> int:
    print(format_stats(load_problems(args.file)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The data command line; each subcommand sets ``func(args) -> exit status`` as its default."""
    parser, sub = problem_parser(
        "python -m iclm_jax.data.acre", "ACRE blicket problems: generate, check, stats, render",
        "--split", SPLITS, PARTS, {
            "generate": (_run_generate, "generate problems in the release format"),
            "check": (_run_check, "validate files and re-derive every label (exit 1 if bad)"),
            "stats": (_run_stats, "query type x label table of a file")})
    add_render_command(sub)
    return parser


def problem_parser(prog: str, description: str, split_flag: str, splits, parts, commands: dict):
    """(parser, subparsers) with the subcommands every task's data command line has: ``generate SPLIT_FLAG
    --part --n --seed --out``, ``check FILE...`` and ``stats FILE``; ``commands`` maps each name to (func,
    help). Each subcommand sets ``func(args) -> exit status`` as its default (``run`` calls it)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help=commands["generate"][1])
    g.add_argument(split_flag, choices=splits, required=True)
    g.add_argument("--part", choices=parts, required=True)
    g.add_argument("--n", type=int, required=True, help="number of problems")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True, help="output .json path")
    g.set_defaults(func=commands["generate"][0])
    c = sub.add_parser("check", help=commands["check"][1])
    c.add_argument("files", nargs="+", metavar="FILE")
    c.set_defaults(func=commands["check"][0])
    s = sub.add_parser("stats", help=commands["stats"][1])
    s.add_argument("file", metavar="FILE")
    s.set_defaults(func=commands["stats"][0])
    return parser, sub


def run(parser: argparse.ArgumentParser, argv, errors: tuple) -> int:
    """Parse ``argv`` and run its subcommand; one of ``errors`` is one line ``error: ...`` and exit 1."""
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv, (AcreFormatError, OSError))


def _run_render(args: argparse.Namespace) -> int:
    problems = load_problems(args.file)
    examples = []
    for problem in problems:
        out = render_problem(problem, args.style, args.packed)
        examples.extend([out] if args.packed else out)
    write_jsonl(examples, args.out)
    print(f"wrote {len(examples)} {'packed ' if args.packed else ''}{args.style} records "
          f"from {len(problems)} problems to {args.out}")
    return 0


def add_render_command(subparsers) -> argparse.ArgumentParser:
    """Add ``render FILE --style text|symbolic --out X.jsonl [--packed]`` to argparse subparsers.

    Sets ``func`` (returns an exit status) as the subcommand's default.
    """
    p = subparsers.add_parser("render", help="render an ACRE release-format file to JSONL")
    p.add_argument("file", metavar="FILE", help="ACRE release-format JSON file")
    p.add_argument("--style", choices=DOMAINS, required=True, help="rendering (domain)")
    p.add_argument("--out", required=True, help="output .jsonl path")
    p.add_argument("--packed", action="store_true",
                   help="one record per problem (its 4 queries share the contexts)")
    p.set_defaults(func=_run_render)
    return p
