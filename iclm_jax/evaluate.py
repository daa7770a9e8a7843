"""Accuracy tables: overall, per ACRE query type, per routed module, and router purity.

The ``iclm-eval`` command line that prints them for a trained run is ``eval_main.py``.
"""
from __future__ import annotations

from collections import defaultdict

import jax
import numpy as np
from jax.experimental import multihost_utils

from iclm_jax import sharding
from iclm_jax.data import pipeline
from iclm_jax.data.acre import QUERY_TYPES
from iclm_jax.data.render import DOMAINS
from iclm_jax.model.codebook import purity
from iclm_jax.report import format_table


def run_eval_set(eval_step, state, examples, *, tok, mesh, max_len: int, num_slots: int,
                 batch_size: int, rules=sharding.DEFAULT_RULES, route_index=None, length_bucket: int = 0) -> dict:
    """Run the jitted eval step over every example once; gather per-query results on the host.
    ``length_bucket > 0`` pads each batch to a multiple of it that holds its longest row (as training does,
    ``data.length_bucket``) instead of ``max_len``: the same results on fewer positions.
    ``route_index(batch) -> int32 [rows]``: the module (or slot) for each row of a host batch, passed to
    the step as ``batch["route_index"]`` (the ``"forced"`` and ``"alone"`` views of ``step._eval_step``)."""
    ds = pipeline.make_dataset(examples, tok, max_len=max_len, batch_size=batch_size, num_slots=num_slots,
                               seed=0, shuffle=False, repeat=False, pad_last_batch=True,
                               rows=sharding.process_rows(mesh, batch_size, rules), length_bucket=length_bucket)
    rows = defaultdict(list)
    for batch in ds:
        if route_index is not None:
            batch = {**batch, "route_index": np.asarray(route_index(batch), np.int32)}
        placed = sharding.put_batch(batch, mesh, rules)
        out = eval_step(state, placed)
        if jax.process_count() > 1:
            # Gather the placed (global) labels, not the host blocks: their rows line up with the
            # outputs' whatever order the mesh gives the processes' blocks.
            out = multihost_utils.process_allgather(out, tiled=True)
            batch = multihost_utils.process_allgather(
                {k: placed[k] for k in ("query_type", "domain")}, tiled=True)
        out = jax.tree.map(np.asarray, out)
        rows["correct"].append(out["correct"])
        rows["present"].append(out["present"])
        rows["module"].append(out["module"])
        rows["query_type"].append(np.asarray(batch["query_type"]))
        rows["domain"].append(np.asarray(batch["domain"]))
        rows["answer_ce_sum"].append(np.reshape(out["answer_ce_sum"], (1,)).astype(np.float64))
        rows["answer_tokens"].append(np.reshape(out["answer_tokens"], (1,)).astype(np.float64))
        rows["mi"].append(np.reshape(out["mi"], (1,)).astype(np.float64))
        for k in ("pooled_inv", "pooled_spec"):
            if k in out:
                rows[k].append(np.asarray(out[k], np.float32))
    return {k: np.concatenate(v) for k, v in rows.items()}


def summarise(res: dict, num_modules: int) -> dict:
    """Accuracy overall / per type / per domain / per module, and purity of modules vs domains."""
    correct, present = res["correct"], res["present"]
    real = present.any(1)
    out: dict = {"all": _acc(correct, present)}
    if "answer_ce_sum" in res:      # mean CE over the set's answer content targets (EOS excluded)
        n = float(np.sum(res["answer_tokens"]))
        out["answer_ce"] = float(np.sum(res["answer_ce_sum"]) / n) if n else float("nan")
    if "mi" in res:                 # the configured MI estimate on held-out rows, mean over eval batches
        out["mi"] = float(np.mean(res["mi"]))
    qt = res["query_type"]
    for t, name in enumerate(QUERY_TYPES):
        out[name] = _acc(correct, present & (qt == t))
    for dom, name in enumerate(DOMAINS):
        out[f"domain_{name}"] = _acc(correct, present & (res["domain"] == dom)[:, None])
    for m in range(num_modules):
        sel = (res["module"] == m) & real
        out[f"module_{m}"] = _acc(correct, present & sel[:, None])
        out[f"module_{m}_rows"] = int(sel.sum())
    module, domain = res["module"][real], res["domain"][real]
    # With fewer than two labelled domains every routing is trivially "pure": no number (NaN, "-").
    out["purity"] = (purity(module, domain, int(module.max(initial=0)) + 1, int(domain.max(initial=0)) + 1)
                     if len(set(domain[domain >= 0].tolist())) >= 2 else float("nan"))
    return out


def answer_prior_loss(train_examples, eval_examples, tok) -> float:
    """``answer_ce`` of the best prompt-blind predictor: the loss counterpart of the majority row.

    It predicts each answer content token from the training answers' token frequencies given the
    example's rendering domain (the answer words differ per domain, and any model sees the domain)
    and the answer tokens before it (teacher forcing, as ``answer_ce``), ignoring the rest of the
    prompt; averaged over the eval answers' content tokens (EOS excluded). On ACRE it is the entropy
    of the training label frequencies. Tokens never seen after a prefix get probability 1/vocab.
    """
    counts: dict[tuple, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    cache: dict[str, tuple] = {}

    def answers(examples):
        for ex in examples:
            for a in ([a for _, a in ex.queries] if hasattr(ex, "queries") else [ex.answer]):
                if a not in cache:
                    cache[a] = tuple(tok.encode(a))
                yield ex.domain, cache[a]

    for dom, ids in answers(train_examples):
        for i, t in enumerate(ids):
            counts[(dom, ids[:i])][t] += 1
    floor = 1.0 / max(tok.vocab_size, 1)
    total, n = 0.0, 0
    for dom, ids in answers(eval_examples):
        for i, t in enumerate(ids):
            c = counts.get((dom, ids[:i]), {})
            seen = sum(c.values())
            total -= np.log(max(c.get(t, 0) / seen, floor) if seen else floor)
            n += 1
    return total / n if n else float("nan")


def _acc(correct, mask) -> float:
    n = mask.sum()
    return float((correct & mask).sum() / n) if n else float("nan")


def domain_modules(res: dict, num_modules: int) -> dict[int, int]:
    """Each labelled domain's module: the one the router sent most of its rows to (-1: the module most
    rows went to, for rows without a domain). The "oracle" routing of ``views``."""
    real = res["present"].any(1)
    module, domain = res["module"][real], res["domain"][real]
    counts = np.bincount(module, minlength=num_modules)
    out = {-1: int(np.argmax(counts)) if counts.any() else 0}
    for d in sorted(set(domain[domain >= 0].tolist())):
        out[int(d)] = int(np.argmax(np.bincount(module[domain == d], minlength=num_modules)))
    return out


def views_table(results: dict[str, dict]) -> str:
    """Each eval set's accuracy under each view (``Run.evaluate(..., views=True)``): the model as routed,
    routed by domain, and each module alone; overall and per rendering domain."""
    cols = ["all"] + [f"domain_{d}" for d in DOMAINS]
    rows = [[f"{name}: {view}"] + [v.get(c, float("nan")) for c in cols]
            for name, r in results.items() for view, v in r.get("views", {}).items()]
    return format_table(["eval set / view"] + ["all"] + list(DOMAINS), rows,
                        "Per-module accuracy: the model as routed, routed by domain, each module alone")


def independence_table(results: dict[str, dict]) -> str:
    """The ``independence`` numbers of each eval set (see ``independence.py``): router NMI vs the domain
    and codebook use; |Pearson| and linear CKA between invariant and specific, and between specific
    modules, pooled over the prompt."""
    keys = list(dict.fromkeys(k for r in results.values() for k in r.get("independence", {})))
    def fmt(v):     # plug-in MI values are often ~1e-4: significant digits there
        return "-" if not np.isfinite(v) else f"{v:.3f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    rows = [[name] + [fmt(r["independence"][k]) if k in r.get("independence", {}) else "-" for k in keys]
            for name, r in results.items() if "independence" in r]
    return format_table(["eval set"] + keys, rows, "Independence of the modules (pooled prompt states)")


def results_table(results: dict[str, dict], reference: dict[str, dict] | None = None) -> str:
    """One row per (eval set, predictor): overall and per query type accuracy (the type columns only where
    some set has typed queries: a RAVEN problem or an untyped JSONL record has none)."""
    cols = ["all"] + list(QUERY_TYPES)
    rows = []
    for name, r in results.items():
        rows.append([f"{name}: model"] + [r.get(c, float("nan")) for c in cols])
        for ref_name, ref in (reference or {}).get(name, {}).items():
            rows.append([f"{name}: {ref_name}"] + [ref.get(c, float("nan")) for c in cols])
    keep = [0] + [j for j in range(1, len(cols)) if any(_finite(row[1 + j]) for row in rows)]
    return format_table(["eval set / predictor"] + [cols[j] for j in keep], [[row[0]] + [row[1 + j] for j in keep]
                                                                             for row in rows],
                        "Answer accuracy (exact match)")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and bool(np.isfinite(x))


def modules_table(results: dict[str, dict], num_modules: int) -> str:
    """Accuracy per rendering domain and per routed module, rows per module, router purity ("-" with
    one module, or one domain: nothing is routed, or every routing is trivially "pure")."""
    doms = [f"domain_{d}" for d in DOMAINS]
    mods = [f"module_{m}" for m in range(num_modules)]
    rows = [[name] + [r[c] for c in doms + mods] + [" / ".join(str(r[f"{c}_rows"]) for c in mods),
                                                     r["purity"] if num_modules > 1 else float("nan")]
            for name, r in results.items()]
    header = (["eval set"] + [f"acc {d}" for d in DOMAINS] + [f"acc m{m}" for m in range(num_modules)]
              + ["rows per module", "purity"])
    return format_table(header, rows, "Per-domain and per-module accuracy, router purity (vs domain)")
