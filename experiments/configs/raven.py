"""ICLM on RAVEN-style matrices (text + symbolic renderings as the two domains): trained on
center_single, tested i.i.d. on center_single and o.o.d. on distribute_four and
in_center_single_out_center_single, as in the paper.

    get_config()             # "demo": the tiny from-scratch CPU ICLM (K = 2) on the compact renderings
    get_config("baseline")   # any acre.py variant, comma-separated: "baseline,text", "no_mi", "oracle", "k4"
    get_config("full")       # the paper's full renderings (instruction, "Panel 1: a large red circle ...")
    get_config("cpu")        # acre.py's CPU recipe (model, optimiser, context loss) on 20,000 generated problems
    get_config("cpu,queries")   # + packed training rows that also ask the missing panel's type, size, color
    get_config("cpu,match")     # + and each candidate's count of attributes shared with the answer (A: 2)
    get_config("cpu,echo")      # + the same counts, each after its candidate written out again (C t4 s3 c2 a5 |)
    get_config("cpu,worked")    # worked answers: the missing panel written out, then its letter (" t4 s3 c2 C")
    get_config("cpu,worked,lookup")  # + per candidate, its letter given its panel ("answer: t3 s2 c2" -> " C")

One question per problem (8 candidates, answer " A".." H"), so rows are not packed and the acre.py
variants' ACRE-only data settings (packed rows, extra queries, streamed problems) are turned off, except
with "queries": packed rows whose training rows also ask the missing panel's attributes
(raven_render.render_packed; evaluation asks the letter only, the same tokens as an unpacked row). The
problems, rules and balanced candidates: iclm_jax/data/raven.py; the data command line:
`python -m iclm_jax.data.raven generate|check|stats|render`. The CPU recipe on which a model learns the task
is "cpu,worked,lookup" (worked answers + the lookup queries; "cpu" alone is ACRE's recipe on RAVEN data, at
chance): the README's RAVEN section has what each variant measured.
"""
import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location(
    "iclm_acre_config_for_raven", os.path.join(os.path.dirname(os.path.abspath(__file__)), "acre.py"))
_acre = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_acre)

TRAIN = "center_single"
EVAL = "center_single,distribute_four,in_center_single_out_center_single"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = [v.strip() for v in arg.split(",") if v.strip()]
    full = "full" in variants
    ours = ("full", "queries", "match", "echo", "worked", "lookup")
    c = _acre.get_config(",".join(v for v in variants if v not in ours))
    d = c.data
    d.task = "raven"
    d.train_split, d.eval_splits = TRAIN, EVAL
    d.packed = d.extra_queries = any(v in variants for v in ("queries", "match", "echo", "lookup"))
    d.extra_query_kinds = ("attributes,candidates" if "match" in variants else
                           "attributes,echo" if "echo" in variants else "lookup" if "lookup" in variants else "")
    d.worked_answer = "worked" in variants
    d.stream = False
    d.form = "full" if full else "compact"
    d.tokenizer = "raven_word"
    d.train_problems = 20000 if "cpu" in variants else 4000   # per rendering (generation: ~1 ms per problem)
    d.eval_problems = min(d.eval_problems, 300)
    c.eval.batch_size = 16       # distribute_four rows are ~2x center_single's
    return c


def get_sweep(arg: str = ""):
    """The ACRE grid's variants x seeds 0, 1 (python -m iclm_jax.sweep --config=experiments/configs/raven.py)."""
    return [{"variant": v, "seed": s} for v in ("baseline", "iclm", "no_mi", "no_invariant", "oracle")
            for s in (0, 1)]
