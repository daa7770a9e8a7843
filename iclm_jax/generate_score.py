"""Generation-based scoring of answers: greedy decoding with the KV cache, scored against the ideals.

``iclm-eval --score=generate`` (``eval_main.py``). The teacher-forced exact match of ``evaluate.py`` asks
whether the argmax is the target at every answer token *given the right answer so far*; here the model
writes its own answer (``generate.decode``, greedy, up to EOS or ``max_new_tokens``) and the decoded text
is compared with the ideal, as the official ICLM evaluation does (Strong-AI-Lab/modular-lm, ``run.py``:
``model.generate`` then ``tokenizer.batch_decode(..., skip_special_tokens=True)``).

Metrics of one generation ``g`` against its ideal ``y`` (``run.py``'s ``METRICS``, called as
``metric(prediction, label)``):

* ``exact_match``: ``g.lower() == y.lower()`` (official ``accuracy``), here after ``normalise`` (lower
  case, whitespace runs collapsed and stripped: the ideals of this package start with a space, see
  ``render``, and a decoded generation may or may not).
* ``partial_match``: official ``partial_accuracy``, ``re.search(r'\\b({g})\\b', y)``: the *generation*
  occurs as whole words inside the *ideal* (that direction, as the official code has it). Two fixes:
  the generation is matched literally (the official code uses it as a regular expression unescaped),
  and an empty generation never matches (officially ``\\b()\\b`` matches any ideal with a word
  character). On one-word ideals (ACRE) it equals ``exact_match``; it differs on longer ideals.
* ``last_word``: the generation's last word is the ideal's last word (normalised; an empty generation never
  matches). On one-word ideals (ACRE) it equals ``exact_match``; on RAVEN's worked answers (``data.worked_answer``:
  the missing panel written out, then its letter) it is the letter the model chose after *its own* panel, so a
  right letter after a wrong panel counts, which ``exact_match`` (and the teacher-forced score) cannot credit.
* F1 (the official code has none): on ACRE labels, ``binary_f1`` of the positive class "on" (label 2)
  over the queries whose label is off or on (label 0 or 2; "undetermined" queries are left out): a query
  is predicted positive when its normalised generation is the "on" answer of its rendering
  (``positive_answers``); otherwise (sets without labels) the mean SQuAD token F1 (``token_f1``).

Prompts (``query_prompts``): one per query, the tokens the model sees before that query's answer in its
row (``pipeline.tokenize_example``): ``[bos] prompt`` of an unpacked row, ``[bos] prefix query_j`` of a
packed one (query j's segment attends to the prefix and itself only, at the same positions). The router
runs once per prompt, so for a packed row it reads the prefix and that one query, where the
teacher-forced row's router reads the prefix and every query: on packed rows the routed module (and
so the answers) may differ between the two scores; on unpacked rows they see the same inputs.
"""
from __future__ import annotations

import dataclasses
import os
import re
import string
from collections import Counter
from typing import Callable, Sequence

import numpy as np
from flax import nnx

from iclm_jax import generate
from iclm_jax.data import render, sources
from iclm_jax.data.acre import QUERY_TYPES
from iclm_jax.data.tokenizer import Tokenizer
from iclm_jax.fields import csv, typed

POSITIVE_LABEL, NEGATIVE_LABEL = 2, 0       # ACRE "on" / "off": the binary part of the labels
EXTRA_NEW_TOKENS = 4   # default max_new_tokens = longest ideal (tokens) + this (its EOS and 3 more)
PAD_MULTIPLE = 16      # generate's prompt-width bucket: one compilation per bucket
_PUNCTUATION = frozenset(string.punctuation)


# ---------------------------------------------------------------------------- the metrics
def normalise(text: str) -> str:
    """Lower case, whitespace runs as one space, stripped (exact and partial match compare these)."""
    return " ".join(text.lower().split())


def exact_match(generation: str, ideal: str) -> bool:
    """The normalised generation is the normalised ideal (official ``accuracy``)."""
    return normalise(generation) == normalise(ideal)


def partial_match(generation: str, ideal: str) -> bool:
    """The normalised generation occurs, as whole words, inside the normalised ideal (official
    ``partial_accuracy``, matched literally; an empty generation never matches)."""
    g, y = normalise(generation), normalise(ideal)
    return bool(g) and re.search(rf"(?<!\w){re.escape(g)}(?!\w)", y) is not None


def last_word_match(generation: str, ideal: str) -> bool:
    """The normalised generation's last word is the normalised ideal's last word (an empty generation, or an
    empty ideal, never matches)."""
    g, y = normalise(generation).split(), normalise(ideal).split()
    return bool(g) and bool(y) and g[-1] == y[-1]


def _squad_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, split on whitespace."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(generation: str, ideal: str) -> float:
    """SQuAD token F1 of the bags of normalised words; 1.0 when both are empty, 0.0 when one is."""
    g, y = _squad_tokens(generation), _squad_tokens(ideal)
    if not g or not y:
        return float(g == y)
    common = sum((Counter(g) & Counter(y)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(g), common / len(y)
    return 2 * precision * recall / (precision + recall)


def binary_f1(predicted: Sequence[bool], gold: Sequence[bool]) -> float:
    """F1 of the positive class: 2TP / (2TP + FP + FN); NaN when undefined (no positive gold label
    and no positive prediction, or no queries)."""
    p, g = np.asarray(predicted, bool), np.asarray(gold, bool)
    if p.shape != g.shape:
        raise ValueError(f"binary_f1: {p.shape[0]} predictions for {g.shape[0]} labels")
    tp, fp, fn = int((p & g).sum()), int((p & ~g).sum()), int((~p & g).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")


def positive_answers(domain: int) -> frozenset[str]:
    """The normalised answers that say "on" in rendering ``domain`` (any form; -1: any rendering)."""
    styles = render.DOMAINS if domain < 0 else (render.DOMAINS[domain],)
    return frozenset(normalise(render.answer_text(POSITIVE_LABEL, s, f)) for s in styles for f in render.FORMS)


# ---------------------------------------------------------------------------- queries and records
@dataclasses.dataclass(frozen=True)
class QueryPrompt:
    """One query: the tokens before its answer, its ideal answer text, and how to break it down."""
    tokens: tuple[int, ...]
    ideal: str
    domain: int = -1
    query_type: int = -1
    label: int = -1


def query_prompts(examples, tok: Tokenizer) -> list[QueryPrompt]:
    """One ``QueryPrompt`` per query of ``examples`` (rows of ``render.Example`` / ``PackedExample``), in
    order: the ids the model sees before that query's answer (see the module docstring)."""
    bos = [] if tok.bos_id is None else [tok.bos_id]
    out = []
    for ex in examples:
        if isinstance(ex, render.PackedExample):
            prefix = bos + tok.encode(ex.prefix)
            for (q, a), t, lab in zip(ex.queries, ex.query_types, ex.labels):
                out.append(QueryPrompt(tuple(prefix + tok.encode(q)), a, ex.domain, t, lab))
        else:
            out.append(QueryPrompt(tuple(bos + tok.encode(ex.prompt)), ex.answer, ex.domain, ex.query_type,
                                   ex.label))
    return out


def score_records(records: Sequence[dict]) -> dict[str, dict]:
    """Metrics per group of query records (dicts with ``generation``, ``ideal``, ``domain``,
    ``query_type``, ``label``): ``"all"``, each ACRE query type, ``"domain_<name>"``; a group without
    queries is left out. Each group: ``queries``, ``exact``, ``partial``, ``last_word``, ``f1`` and ``f1_kind``
    (``"binary"`` when any query has an ACRE label, i.e. a query type and a label, else ``"token"``: RAVEN's
    label is its target letter's index), ``f1_binary``, ``f1_token``."""
    groups = {"all": list(records)}
    for t, name in enumerate(QUERY_TYPES):
        groups[name] = [r for r in records if r["query_type"] == t]
    for d, name in enumerate(render.DOMAINS):
        groups[f"domain_{name}"] = [r for r in records if r["domain"] == d]
    return {name: _score_group(rs) for name, rs in groups.items() if rs}


def _score_group(rs: list[dict]) -> dict:
    # ACRE labels only: an ACRE query has a query type (RAVEN's label is the target letter's index, no type)
    binary = [r for r in rs if r["query_type"] >= 0 and r["label"] in (POSITIVE_LABEL, NEGATIVE_LABEL)]
    f1_binary = binary_f1([normalise(r["generation"]) in positive_answers(r["domain"]) for r in binary],
                          [r["label"] == POSITIVE_LABEL for r in binary])
    f1_token = float(np.mean([token_f1(r["generation"], r["ideal"]) for r in rs]))
    labelled = any(r["query_type"] >= 0 and r["label"] >= 0 for r in rs)
    return {"queries": len(rs),
            "exact": float(np.mean([exact_match(r["generation"], r["ideal"]) for r in rs])),
            "partial": float(np.mean([partial_match(r["generation"], r["ideal"]) for r in rs])),
            "last_word": float(np.mean([last_word_match(r["generation"], r["ideal"]) for r in rs])),
            "f1": f1_binary if labelled else f1_token, "f1_kind": "binary" if labelled else "token",
            "f1_binary": f1_binary, "f1_token": f1_token}


# ---------------------------------------------------------------------------- running a model
def generate_answers(model, prompts: Sequence[QueryPrompt], tok: Tokenizer, *, max_new_tokens: int,
                     batch_size: int, route: Callable[[np.ndarray], np.ndarray] | None = None
                     ) -> tuple[list[str], np.ndarray]:
    """Greedy continuations of ``prompts`` (KV cache; ``generate.decode``), cut at the first EOS and
    decoded with special tokens dropped -> (texts, routed module per prompt), in ``prompts`` order.
    ``route`` maps a batch's prompt domains [B] to the specific module each is forced to (an
    intervention, ``intervene.py``: the router is not run); None: the router decides.

    Prompts go shortest first in batches of exactly ``batch_size`` (the last one filled with copies), so
    the compilations are one per prompt-width bucket."""
    if not prompts:
        raise ValueError("generate_answers: no prompts")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].tokens))
    texts, modules = [""] * len(prompts), np.zeros(len(prompts), np.int32)
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        fill = idx + [idx[-1]] * (batch_size - len(idx))
        domain = np.asarray([prompts[i].domain for i in fill], np.int32)
        out = generate.decode(model, [list(prompts[i].tokens) for i in fill], max_new_tokens=max_new_tokens,
                              eos_id=tok.eos_id, pad_id=tok.pad_id, domain=domain, pad_multiple=PAD_MULTIPLE,
                              route=None if route is None else route(domain))
        for row, i in enumerate(idx):
            ids = out.tokens[row].tolist()
            if tok.eos_id in ids:
                ids = ids[:ids.index(tok.eos_id)]
            texts[i] = tok.decode(ids)
            modules[i] = out.module[row]
    return texts, modules


def default_max_new_tokens(prompts: Sequence[QueryPrompt], tok: Tokenizer) -> int:
    """The longest ideal answer in tokens plus ``EXTRA_NEW_TOKENS`` (room for its EOS and a few more)."""
    return max(len(tok.encode(p.ideal)) for p in prompts) + EXTRA_NEW_TOKENS


def score_examples(model, examples, tok: Tokenizer, *, max_new_tokens: int | None = None,
                   batch_size: int = 32, route: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Generate an answer for every query of ``examples`` and score it (``score_records``) -> ``{"groups":
    ..., "records": [per query: ideal, generation, domain, query_type, label, module], "max_new_tokens"}``.
    Ideals are compared as the tokenizer writes them back (``decode(encode(ideal))``: a word-level
    vocabulary decodes with spaces between words and punctuation, as the generations are). ``route``: as
    ``generate_answers``."""
    prompts = query_prompts(examples, tok)
    if not prompts:
        raise ValueError("score_examples: no queries")
    n = default_max_new_tokens(prompts, tok) if max_new_tokens is None else max_new_tokens
    texts, modules = generate_answers(model, prompts, tok, max_new_tokens=n, batch_size=batch_size, route=route)
    records = [dict(ideal=tok.decode(tok.encode(p.ideal)), generation=g, domain=p.domain,
                    query_type=p.query_type, label=p.label, module=int(m))
               for p, g, m in zip(prompts, texts, modules)]
    return {"groups": score_records(records), "records": records, "max_new_tokens": n}


def score_file(run, path: str, *, max_new_tokens: int | None = None, batch_size: int | None = None,
               max_unk: float | None = None) -> tuple[str, dict]:
    """(name, ``score_examples`` metrics) of a LoadedRun (``train.run.load_run``) on a release JSON or evals
    JSONL file, its examples built as ``LoadedRun.evaluate_file`` builds them (the run's styles, packing,
    form; the same refusals: too many queries per row, too many ``<unk>``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path}: no such file")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: expected an integer >= 1")
    d = typed(sources.DataConfig, run.config.data)
    tok = run.data.tokenizer
    examples, _ = sources.file_examples(path, tuple(csv(d.styles)), d.packed, d.form, task=d.task,
                                        worked=d.worked_answer)
    sources.measure(run.data.num_slots, tok, path, examples, d.max_unk if max_unk is None else max_unk,
                    d.tokenizer)
    model = nnx.merge(run.graphdef, run.state).model
    metrics = score_examples(model, examples, tok, max_new_tokens=max_new_tokens,
                             batch_size=batch_size or run.config.eval.batch_size)
    return os.path.basename(path), metrics
