"""From the run config's ``data`` group to examples: train set, eval sets, tokenizer, row length.

ACRE problems are generated (or read from release files), rendered in each configured style (a style is a
domain) and packed one problem per row; evals-style JSONL files are read as they are. A training file is
read on demand (``indexed``, ``rendered``): memory does not grow with its size.
"""
from __future__ import annotations

import dataclasses
import os

from iclm_jax.data import acre, jsonl, render, tasks
from iclm_jax.data import tokenizer as tok_lib
from iclm_jax.data.rendered import RenderedProblems
from iclm_jax.data.stream import AcreStream
from iclm_jax.fields import csv, typed
from iclm_jax.padding import round_up

# data.stream: row lengths are measured on at least this many problems of the stream (see build).
STREAM_LEN_SAMPLE = 2000
VAL_SET = "val"     # name of the generated validation set (data.val_problems) in results and logs


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The ``data`` config group (experiments/configs/acre.py documents each field). Fields with a default
    are those older stored configs lack; the default is what such runs did."""
    train_split: str
    styles: str                   # comma list of renderings = domains
    packed: bool
    train_problems: int
    eval_splits: str
    eval_problems: int
    train_file: str
    eval_files: str
    tokenizer: str
    max_len: int
    num_domains: int
    workers: int
    task: str = "acre"            # tasks.TASKS
    form: str = "full"
    extra_queries: bool = False
    extra_query_kinds: str = ""   # which extra queries, where the task offers several (tasks.Task.query_kinds)
    val_problems: int = 0
    stream: bool = False
    max_unk: float = 1.0          # runs from before the check accepted any file
    length_bucket: int = 0        # training batches padded to a multiple of this (0: to max_len)
    worked_answer: bool = False   # answers write their working first (tasks.Task.worked: RAVEN's panel)


@dataclasses.dataclass
class EvalSet:
    name: str
    examples: list
    problems: list | None      # ACRE problems (for the reference rows), None for JSONL


@dataclasses.dataclass
class RunData:
    tokenizer: tok_lib.Tokenizer
    train_examples: list
    train_problems: list | None
    eval_sets: list[EvalSet]
    max_len: int
    num_slots: int
    # A finite list of training examples (== train_examples unless that is an endless AcreStream:
    # then the renderings of train_problems, its first data.train_problems problems).
    train_sample: list | None = None


def file_examples(path: str, styles, packed: bool, form: str = "full", extra_queries: bool = False,
                  lazy: bool = False, task: str = "acre", worked: bool = False):
    """(examples, problems or None) of a JSONL or problem file (ACRE release format, or ``task``'s own);
    ``lazy``: read on demand (a training file of any size: one validating pass keeps byte ranges, not
    records; see ``indexed``; ACRE files only)."""
    if path.endswith(".jsonl"):
        return (jsonl.index_jsonl(path) if lazy else jsonl.load_jsonl(path)), None
    if lazy and task == "acre":     # rendered on demand too (RenderedProblems renders ACRE problems)
        problems = acre.index_problems(path)
        return RenderedProblems(problems, styles, packed, form, extra_queries, name=path), problems
    problems = tasks.get(task).load(path)
    return tasks.examples(task, problems, styles, packed, form, extra_queries, worked), problems


def measure(num_slots: int, tok: tok_lib.Tokenizer, name: str, examples, max_unk: float = 1.0,
             tokenizer: str = "") -> int:
    """The longest row of ``examples`` in tokens, in one pass that also refuses a row with more queries than
    the training rows' slots (before training, not at the final eval), and a set whose fraction of
    ``<unk>`` tokens exceeds ``max_unk`` (a tokenizer that does not fit the text)."""
    longest = unknown = total = 0
    unk_id = tok.token_to_id("<unk>")
    for e in examples:
        if isinstance(e, render.PackedExample) and len(e.queries) > num_slots:
            raise ValueError(
                f"{e.source or name}: {name} packs {len(e.queries)} queries per row but the training rows "
                f"hold {num_slots}; use one layout everywhere (data.packed=False asks one query per row; "
                "data.eval_splits='' evaluates only data.eval_files)")
        ids = _row_ids(e, tok)
        longest = max(longest, _length(e, ids, tok))
        if unk_id is not None:
            unknown += sum(x.count(unk_id) for x in ids)
            total += sum(map(len, ids))
    if total and unknown / total > max_unk:
        raise ValueError(
            f"{name}: {100 * unknown / total:.0f}% of its tokens are <unk> under data.tokenizer={tokenizer!r} "
            f"(above data.max_unk={max_unk}): it does not know this text; use data.tokenizer=smollm2 (byte-level "
            "BPE, any text) or a directory holding a tokenizer.json that fits, or raise data.max_unk to accept it")
    return longest


def _row_ids(ex, tok: tok_lib.Tokenizer) -> list[list[int]]:
    """The token ids of a row's pieces: prompt and answer, or prefix then each query and answer."""
    if isinstance(ex, render.PackedExample):
        return [tok.encode(ex.prefix)] + [tok.encode(x) for q, a in ex.queries for x in (q, a)]
    return [tok.encode(ex.prompt), tok.encode(ex.answer)]


def row_length(ex, tok: tok_lib.Tokenizer) -> int:
    """Tokens a row needs (inputs exclude the final EOS, so prompt + answer (+ BOS) is an upper bound)."""
    return _length(ex, _row_ids(ex, tok), tok)


def _length(ex, ids: list[list[int]], tok: tok_lib.Tokenizer) -> int:
    bos = 1 if tok.bos_id is not None else 0      # + one EOS per answer
    return sum(map(len, ids)) + bos + (len(ex.queries) if isinstance(ex, render.PackedExample) else 1)


def eval_sets(data: DataConfig, seed: int, only=None) -> list[EvalSet]:
    """The run's eval sets, in order: the generated validation set (``data.val_problems``), one generated
    test set per ``data.eval_splits`` entry, one per ``data.eval_files`` file. The same seeds as every
    build of this config, so a finished run's sets are made again exactly. ``only``: these names only."""
    d = data if isinstance(data, DataConfig) else typed(DataConfig, data)
    styles, task = tuple(csv(d.styles)), tasks.get(d.task)
    wanted = (lambda name: only is None or name in only)    # noqa: E731
    evals = []
    if d.val_problems and wanted(VAL_SET):   # generated validation problems of the training split: select on these
        problems = task.generate(d.train_split, "val", d.val_problems, seed + 999)
        evals.append(EvalSet(VAL_SET, task.render(problems, styles, d.packed, d.form, False, d.worked_answer),
                             problems))
    for i, split in enumerate(csv(d.eval_splits)):
        if wanted(split):
            problems = task.generate(split, "test", d.eval_problems, seed + 1000 + i)
            evals.append(EvalSet(split, task.render(problems, styles, d.packed, d.form, False, d.worked_answer),
                                 problems))
    for path in csv(d.eval_files):
        if wanted(os.path.basename(path)):
            ex, problems = file_examples(path, styles, d.packed, d.form, task=d.task, worked=d.worked_answer)
            evals.append(EvalSet(os.path.basename(path), ex, problems))
    return evals


def build(data: DataConfig, seed: int) -> RunData:
    """The run's data from a ``DataConfig`` (or the config's ``data`` group, read into one)."""
    d = data if isinstance(data, DataConfig) else typed(DataConfig, data)
    styles = tuple(csv(d.styles))
    packed, form = d.packed, d.form
    # training rows only; evaluation asks the task's own queries. Kinds, where named, replace True.
    extra = (tuple(csv(d.extra_query_kinds)) or True) if d.extra_queries else False
    tok = tok_lib.load_tokenizer(d.tokenizer)
    task = tasks.get(d.task)
    generate = task.generate

    def render_all(problems, extra_queries=False):
        return task.render(problems, styles, packed, form, extra_queries, d.worked_answer)

    if d.train_file:
        train_examples, train_problems = file_examples(d.train_file, styles, packed, form, extra, lazy=True,
                                                       task=d.task, worked=d.worked_answer)
    elif d.stream:   # endless fresh problems; a finite head for references and lengths
        train_examples = AcreStream(d.train_split, "train", seed, styles, packed, form=form,
                                    extra_queries=extra)
        head = train_examples.problems(max(d.train_problems, STREAM_LEN_SAMPLE))
        train_problems = head[:d.train_problems]
        measured = train_examples.head(len(head), head)
        train_sample = measured[:d.train_problems * train_examples.per_problem]
    else:
        train_problems = generate(d.train_split, "train", d.train_problems, seed)
        train_examples = render_all(train_problems, extra)
    evals = eval_sets(d, seed)
    any_packed = any(isinstance(e, render.PackedExample) for e in train_examples[:1])
    num_slots = task.max_queries(extra) if any_packed else 1
    stream = isinstance(train_examples, AcreStream)
    if not stream:
        train_sample = measured = train_examples
    longest = max(measure(num_slots, tok, name, ex, d.max_unk, d.tokenizer) for name, ex in
                  [(d.train_file or "the training data", measured)]
                  + [(f"eval set {e.name!r}", e.examples) for e in evals])
    # A stream's rows are measured on a sample: leave room for rarer, longer problems (a text row
    # grows by 8 tokens per object; 2000 problems' longest is within 2 objects of the maximum).
    auto = round_up(longest + longest // 16, 8) + 8 if stream else round_up(longest + 1, 32)
    max_len = d.max_len or auto
    if max_len < longest:   # refuse here, not later inside a grain worker process
        raise ValueError(f"data.max_len={max_len}: the longest example needs {longest} tokens")
    return RunData(tok, train_examples, train_problems, evals, max_len, num_slots, train_sample)
