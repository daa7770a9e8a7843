"""The RAVEN data command line (``python -m iclm_jax.data.raven``)::

    python -m iclm_jax.data.raven generate --configuration center_single --part train --n 10000 \\
        --seed 0 --out F.json
    python -m iclm_jax.data.raven check F.json [G.json ...]   # exit 1 on a bad format or answer
    python -m iclm_jax.data.raven stats F.json                 # rules per attribute, target letters
    python -m iclm_jax.data.raven render F.json --style text [--form compact] --out F.jsonl

Errors are one line ``error: ...`` on stderr and exit status 1. Rendered records carry no ``label``
(the JSONL format's labels are ACRE's 0-2); the answer letter is the record's ``ideal``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from typing import Sequence

from iclm_jax.data.cli import check_files, problem_parser, run
from iclm_jax.data.jsonl import write_jsonl
from iclm_jax.data.raven import (
    CONFIGURATIONS,
    PARTS,
    RULE_NAMES,
    RavenFormatError,
    load_problems,
    save_problems,
)
from iclm_jax.data.raven_generate import disagreements, generate_problems
from iclm_jax.data.raven_render import LETTERS, render_problem
from iclm_jax.data.render import DOMAINS, FORMS


def format_stats(problems: Sequence[dict]) -> str:
    """Configurations, a (component, attribute) x rule table, and the target letter histogram."""
    configs = Counter(p["configuration"] for p in problems)
    rules = Counter((c, attr, rule["name"]) for p in problems for c, comp in enumerate(p["rules"])
                    for attr, rule in comp.items())
    lines = ["configuration: " + ", ".join(f"{c} ({n})" for c, n in sorted(configs.items())),
             f"{'attribute':<14}" + "".join(f"{r:>18}" for r in RULE_NAMES)]
    for c, attr in sorted({(c, a) for c, a, _ in rules}):
        lines.append(f"{f'{c}.{attr}':<14}" + "".join(f"{rules[(c, attr, r)]:>18}" for r in RULE_NAMES))
    targets = Counter(p["target"] for p in problems)
    lines.append("target: " + " ".join(f"{LETTERS[k]}={targets[k]}" for k in range(len(LETTERS))))
    lines.append(f"{len(problems)} problems")
    return "\n".join(lines)


def _run_generate(args: argparse.Namespace) -> int:
    problems = generate_problems(args.configuration, args.part, args.n, args.seed)
    save_problems(problems, args.out)
    print(f"wrote {len(problems)} {args.configuration}/{args.part} problems (seed {args.seed}) to {args.out}")
    print(format_stats(problems))
    return 0


def _run_check(args: argparse.Namespace) -> int:
    return check_files(args.files, load_problems, RavenFormatError, lambda e: print(f"error: {e}", file=sys.stderr),
                       lambda i, p: [f"problem {i}: {line}" for line in disagreements(p)],
                       lambda ps: f"OK, {len(ps)} problems, every answer follows the rules and is unique")


def _run_stats(args: argparse.Namespace) -> int:
    print(format_stats(load_problems(args.file)))
    return 0


def _run_render(args: argparse.Namespace) -> int:
    problems = load_problems(args.file)
    examples = [dataclasses.replace(render_problem(p, args.style, args.form), label=-1) for p in problems]
    write_jsonl(examples, args.out)
    print(f"wrote {len(examples)} {args.style} {args.form} records from {len(problems)} problems "
          f"to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line; each subcommand sets ``func(args) -> exit status`` as its default."""
    parser, sub = problem_parser(
        "python -m iclm_jax.data.raven", "RAVEN progressive matrices: generate, check, stats, render",
        "--configuration", CONFIGURATIONS, PARTS, {
            "generate": (_run_generate, "generate problems (one JSON array)"),
            "check": (_run_check, "validate files and re-derive every answer (exit 1 if bad)"),
            "stats": (_run_stats, "rule counts per attribute and target letters of a file")})
    r = sub.add_parser("render", help="render a problem file to JSONL (one record per problem)")
    r.add_argument("file", metavar="FILE")
    r.add_argument("--style", choices=DOMAINS, required=True, help="rendering (domain)")
    r.add_argument("--form", choices=FORMS, default="full")
    r.add_argument("--out", required=True, help="output .jsonl path")
    r.set_defaults(func=_run_render)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv, (RavenFormatError, OSError, ValueError))
