"""Validate a whole run config before anything is built or compiled.

Each rule names the field and what it allows, so a bad sweep entry fails in a second with one clear line
instead of minutes later inside XLA. All violations are reported together. One function per config
group; the allowed values are imported from the code that defines them. ``validate_loaded`` holds the
checks that need the loaded data.
"""
from __future__ import annotations

import os

import jax
from jax.sharding import AbstractMesh

from iclm_jax.data import tasks
from iclm_jax.data.render import DOMAINS as STYLES
from iclm_jax.data.render import FORMS
from iclm_jax.data.tokenizer import NAMED as TOKENIZERS
from iclm_jax.fields import csv
from iclm_jax.model.aggregator import AGGREGATORS
from iclm_jax.model.iclm import ROUTER_SOURCES
from iclm_jax.model.lora import LORA_TARGETS
from iclm_jax.model.mi import APPLY_TO, ESTIMATORS, POOLS, REDUCE
from iclm_jax.model.router import MODES, UPDATES
from iclm_jax.model.transformer import ATTENTION
from iclm_jax.model.transformer import REMAT_POLICIES as REMAT
from iclm_jax.sharding import DEFAULT_RULES, MESH_AXES, data_ways, resolve_axes, rules_from_config
from iclm_jax.train.build import CONTINUAL_MODES, DTYPES
from iclm_jax.train.step import NONFINITE


class ConfigError(ValueError):
    """One or more invalid config fields; the message lists each with its allowed values."""


WEIGHT_MAX = 1e3      # loss weights beyond this only make one term drown the rest (and overflow in bfloat16)


class _Errors(list):
    def need(self, cond: bool, field: str, value, allowed: str) -> None:
        if not cond:
            self.append(f"{field}={value!r}: expected {allowed}")


def validate(c, *, num_devices: int | None = None) -> None:
    """Raise ``ConfigError`` listing every invalid field of config ``c``."""
    errs = _Errors()
    for check in (_model, _lora, _router, _mi, _loss, _data, _train, _checkpoint, _continual):
        check(c, errs)
    _mesh(c, errs, jax.device_count() if num_devices is None else num_devices)
    if not errs:
        _memory(c, errs, c.data.max_len)      # 0 = automatic: checked once the data gives the length
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))


def memory_floor(batch: int, max_len: int, n_heads: int) -> int:
    """Bytes a step needs at least, whatever the model: its int32/float32 batch arrays (9 per row
    position, double-buffered by the input pipeline) and one layer's float32 attention scores."""
    return batch * max_len * 9 * 4 * 2 + batch * n_heads * max_len * max_len * 4


def _available_bytes() -> int:
    """The device's memory where it reports one (GPU, TPU), else the host's available memory."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _memory(c, errs: _Errors, max_len: int) -> None:
    if max_len <= 0:
        return
    shape = resolve_axes(dict(c.mesh), jax.device_count())
    ways = data_ways(AbstractMesh(tuple(shape.values()), tuple(shape)), rules_from_config(c.get("rules")))
    per_device = -(-max(c.train.batch_size, c.eval.batch_size) // ways)
    need, have = memory_floor(per_device, max_len, c.model.n_heads), _available_bytes()
    if need > have:
        errs.append(f"train.batch_size={c.train.batch_size} x data.max_len={max_len}: a step needs at least "
                    f"{need / 2**30:.1f} GiB per device (batch arrays and one layer's attention scores), "
                    f"{have / 2**30:.1f} GiB available; lower them")


def validate_loaded(c, data) -> None:
    """Checks that need the loaded data (``sources.RunData``)."""
    errs = _Errors()
    _memory(c, errs, data.max_len)
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
    n = c.data.num_domains
    for name, examples in [("training", data.train_sample)] + [(es.name, es.examples) for es in data.eval_sets]:
        bad = next((e for e in examples if e.domain >= n), None)
        if bad is not None:
            raise ConfigError(f"{bad.source or name}: domain {bad.domain} is not below data.num_domains={n} "
                              f"(in the {name} examples); raise data.num_domains or fix the data")
    if c.router.mode == "oracle":
        unlabeled = sum(1 for e in data.train_sample if e.domain < 0)   # a stream: its head
        if unlabeled:
            raise ConfigError(f"router.mode='oracle' needs a domain label on every example; {unlabeled} "
                              "training examples have none (JSONL records need a 'domain' field)")


def _model(c, errs: _Errors) -> None:
    m, need = c.model, errs.need
    for f in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim"):
        need(int(m[f]) >= 1, f"model.{f}", m[f], "an integer >= 1")
    need(m.vocab_size >= 0, "model.vocab_size", m.vocab_size, ">= 0 (0 = from the tokenizer)")
    if m.n_kv_heads >= 1:
        need(m.n_heads % m.n_kv_heads == 0, "model.n_heads", m.n_heads,
             f"a multiple of model.n_kv_heads={m.n_kv_heads}")
    need(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "> 0")
    need(0 < m.norm_eps < 1, "model.norm_eps", m.norm_eps, "in (0, 1)")
    need(m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {tuple(DTYPES)}")
    need(m.get("remat", "none") in REMAT, "model.remat", m.get("remat"), f"one of {REMAT}")
    need(isinstance(m.get("scan_layers", False), bool), "model.scan_layers", m.get("scan_layers"),
         "True or False")
    attention = m.get("attention", "materialised")
    need(attention in ATTENTION, "model.attention", attention, f"one of {ATTENTION}")
    if attention == "cudnn":
        need(jax.default_backend() == "gpu" and m.dtype in ("bfloat16", "float16"), "model.attention", attention,
             f"an NVIDIA GPU and model.dtype bfloat16 or float16 (here: {jax.default_backend()}, {m.dtype})")
    canon = m.get("canon", 0)
    need(isinstance(canon, int) and canon >= 0, "model.canon", canon, "an integer >= 0 (0 = no canon layer)")
    need(m.num_modules >= 1, "model.num_modules", m.num_modules, "an integer >= 1")
    need(m.aggregator in AGGREGATORS, "model.aggregator", m.aggregator, f"one of {AGGREGATORS}")
    need(0.0 <= m.invariant_weight <= 1.0, "model.invariant_weight", m.invariant_weight, "in [0, 1]")
    if m.get("init"):
        ok = m.init == "smollm2" or m.init.endswith(".gguf") and os.path.isfile(m.init) or \
            os.path.isfile(os.path.join(m.init, "config.json"))
        need(ok, "model.init", m.init, "'smollm2', a .gguf file or a Hugging Face dir with config.json")
        need(not canon, "model.canon", canon,
             f"0 with model.init={m.init!r}: a pretrained Llama base has no canon layer")
    if c.init_from:
        need(os.path.isdir(os.path.join(c.init_from, "checkpoints")), "init_from", c.init_from,
             "a run directory holding checkpoints/")


def _lora(c, errs: _Errors) -> None:
    lo, need = c.lora, errs.need
    need(1 <= lo.rank <= c.model.d_model, "lora.rank", lo.rank, f"1 <= rank <= model.d_model={c.model.d_model}")
    need(0 < lo.alpha <= 1e4, "lora.alpha", lo.alpha, "in (0, 10000] (the adapter scale is alpha / rank)")
    need(0.0 <= lo.dropout < 1.0, "lora.dropout", lo.dropout, "in [0, 1)")
    bad = [x for x in csv(lo.targets) if x not in LORA_TARGETS]
    need(not bad and csv(lo.targets), "lora.targets", lo.targets, f"a comma list from {LORA_TARGETS}")


def _router(c, errs: _Errors) -> None:
    r, m, need = c.router, c.model, errs.need
    need(r.source in ROUTER_SOURCES, "router.source", r.source, f"one of {ROUTER_SOURCES}")
    need(r["update"] in UPDATES, "router.update", r["update"], f"one of {UPDATES}")
    need(r.mode in MODES, "router.mode", r.mode, f"one of {MODES}")
    need(0.0 < r.ema_decay < 1.0, "router.ema_decay", r.ema_decay, "in (0, 1)")
    need(r.proj_dim >= 0, "router.proj_dim", r.proj_dim, ">= 0")
    need(r.temperature > 0, "router.temperature", r.temperature, "> 0")
    need(0 <= r.weight <= WEIGHT_MAX, "router.weight", r.weight, f"in [0, {WEIGHT_MAX:g}]")
    need(0 <= r.commitment <= WEIGHT_MAX, "router.commitment", r.commitment, f"in [0, {WEIGHT_MAX:g}]")
    need(0 <= r.dead_threshold < 1, "router.dead_threshold", r.dead_threshold,
         "in [0, 1) (a fraction of a code's fair share of rows)")
    if r.source == "invariant" and not m.invariant and m.num_modules > 1:
        errs.append("router.source='invariant' needs model.invariant=True: use 'base' or 'adapter'")


def _mi(c, errs: _Errors) -> None:
    mi, need = c.mi, errs.need
    need(mi.estimator in ESTIMATORS, "mi.estimator", mi.estimator, f"one of {ESTIMATORS}")
    need(0 <= mi.weight <= WEIGHT_MAX, "mi.weight", mi.weight, f"in [0, {WEIGHT_MAX:g}]")
    need(mi.apply_to in APPLY_TO, "mi.apply_to", mi.apply_to, f"one of {APPLY_TO}")
    need(mi.get("pool", "prompt") in POOLS, "mi.pool", mi.get("pool"), f"one of {POOLS}")
    need(mi.get("reduce", "mean") in REDUCE, "mi.reduce", mi.get("reduce"), f"one of {REDUCE}")
    need(0 < mi.critic_lr <= 1, "mi.critic_lr", mi.critic_lr, "in (0, 1]")
    need(mi.critic_hidden >= 1, "mi.critic_hidden", mi.critic_hidden, "an integer >= 1")
    need(mi.critic_depth >= 1, "mi.critic_depth", mi.critic_depth, "an integer >= 1")
    need(mi.clip > 0, "mi.clip", mi.clip, "> 0 (critic scores are capped at it inside the exponent)")
    need(0.0 < mi.ema_decay < 1.0, "mi.ema_decay", mi.ema_decay, "in (0, 1)")


def _loss(c, errs: _Errors) -> None:
    lo, need = c.loss, errs.need
    need(0 <= lo.aux_weight <= WEIGHT_MAX, "loss.aux_weight", lo.aux_weight, f"in [0, {WEIGHT_MAX:g}]")
    cw = lo.get("context_weight", 0.0)
    need(0 <= cw <= WEIGHT_MAX, "loss.context_weight", cw, f"in [0, {WEIGHT_MAX:g}]")
    chunk = lo.get("logit_chunk", 64)
    need(isinstance(chunk, int) and chunk >= 1, "loss.logit_chunk", chunk, "an int >= 1")


def _data(c, errs: _Errors) -> None:
    d, need = c.data, errs.need
    task = d.get("task", "acre")
    need(task in tasks.TASKS, "data.task", task, f"one of {tuple(tasks.TASKS)}")
    splits = tasks.TASKS[task].splits if task in tasks.TASKS else ()
    bad = [x for x in csv(d.styles) if x not in STYLES]
    need(not bad and csv(d.styles), "data.styles", d.styles, f"a comma list from {STYLES}")
    need(d.train_split in splits, "data.train_split", d.train_split, f"one of {splits} (data.task={task})")
    bad = [x for x in csv(d.eval_splits) if x not in splits]
    need(not bad, "data.eval_splits", d.eval_splits, f"a comma list from {splits} (data.task={task})")
    if task in tasks.TASKS and not tasks.TASKS[task].streams:
        need(not d.get("stream", False), "data.stream", d.get("stream"), "False: streams generate ACRE only")
    need(d.train_problems >= 1 or bool(d.train_file), "data.train_problems", d.train_problems, ">= 1")
    need(d.eval_problems >= 0, "data.eval_problems", d.eval_problems, ">= 0")
    need(d.num_domains >= 1, "data.num_domains", d.num_domains, "an integer >= 1")
    need(d.get("form", "full") in FORMS, "data.form", d.get("form"), f"one of {FORMS}")
    need(d.get("val_problems", 0) >= 0, "data.val_problems", d.get("val_problems"), ">= 0 (0 = none)")
    need(not d.get("extra_queries", False) or bool(d.packed), "data.extra_queries",
         d.get("extra_queries"), "False unless data.packed=True (extra queries share a packed row)")
    kinds = csv(d.get("extra_query_kinds", ""))
    offered = tasks.TASKS[task].query_kinds if task in tasks.TASKS else ()
    need(all(k in offered for k in kinds), "data.extra_query_kinds", d.get("extra_query_kinds"),
         f"a comma list from {offered} (data.task={task})" if offered else f"empty (data.task={task} has one kind)")
    need(not kinds or bool(d.get("extra_queries", False)), "data.extra_query_kinds", d.get("extra_query_kinds"),
         "empty unless data.extra_queries=True")
    worked_ok = tasks.TASKS[task].worked if task in tasks.TASKS else False
    need(isinstance(d.get("worked_answer", False), bool) and (worked_ok or not d.get("worked_answer", False)),
         "data.worked_answer", d.get("worked_answer"),
         "True or False" if worked_ok else f"False (data.task={task}'s answers have no working to write out)")
    need(not (d.get("stream", False) and d.train_file), "data.stream", d.get("stream"),
         "False with data.train_file (a stream generates fresh problems; it reads no file)")
    need(d.max_len >= 0, "data.max_len", d.max_len, ">= 0 (0 = automatic)")
    need(isinstance(d.get("length_bucket", 0), int) and d.get("length_bucket", 0) >= 0, "data.length_bucket",
         d.get("length_bucket"), "an integer >= 0 (0 = pad every training batch to data.max_len)")
    need(d.workers >= 0, "data.workers", d.workers, ">= 0")
    need(0 <= d.get("max_unk", 1.0) <= 1, "data.max_unk", d.get("max_unk"), "in [0, 1]")
    for f in [d.train_file] + csv(d.eval_files):
        if f:
            need(os.path.isfile(f), "data.train_file/eval_files", f, "an existing file")
    if d.tokenizer not in TOKENIZERS:
        need(os.path.isfile(os.path.join(d.tokenizer, "tokenizer.json")) or os.path.isfile(d.tokenizer),
             "data.tokenizer", d.tokenizer, f"one of {TOKENIZERS} or a directory holding tokenizer.json")


def _train(c, errs: _Errors) -> None:
    t, need = c.train, errs.need
    need(t.steps >= 1, "train.steps", t.steps, "an integer >= 1")
    need(t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer >= 1")
    need(0 < t.lr < float("inf"), "train.lr", t.lr, "> 0 and finite")
    need(0 <= t.final_lr_fraction <= 1, "train.final_lr_fraction", t.final_lr_fraction, "in [0, 1]")
    need(0 <= t.b1 < 1, "train.b1", t.b1, "in [0, 1)")
    need(0 <= t.b2 < 1, "train.b2", t.b2, "in [0, 1)")
    need(t.get("time_limit_s", 0.0) >= 0, "train.time_limit_s", t.get("time_limit_s"), ">= 0 (0 = no limit)")
    need(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps,
         ">= 0 (above train.steps: a tenth of the steps is used)")
    need(0 <= t.weight_decay <= 1, "train.weight_decay", t.weight_decay, "in [0, 1]")
    need(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, ">= 0 (0 = off)")
    need(t.get("adam_eps", 1e-8) > 0, "train.adam_eps", t.get("adam_eps"), "> 0")
    need(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "an integer >= 1")
    need(t.log_every >= 1, "train.log_every", t.log_every, "an integer >= 1")
    need(t.nonfinite in NONFINITE, "train.nonfinite", t.nonfinite, f"one of {NONFINITE}")
    need(0 <= t.get("skip_limit", 1.0) <= 1, "train.skip_limit", t.get("skip_limit"), "in [0, 1]")
    need(c.eval.batch_size >= 1, "eval.batch_size", c.eval.batch_size, "an integer >= 1")
    need(c.eval.every >= 0, "eval.every", c.eval.every, ">= 0 (0 = at the end only)")


def _checkpoint(c, errs: _Errors) -> None:
    ck, d, need = c.checkpoint, c.data, errs.need
    if ck.best_metric:
        split, _, key = ck.best_metric.partition("/")
        need(bool(key) and split in csv(d.eval_splits) + [os.path.basename(f) for f in csv(d.eval_files)],
             "checkpoint.best_metric", ck.best_metric, "'<eval set>/<metric>' with an eval set of "
             "data.eval_splits or data.eval_files, e.g. 'IID/all'")
    need(ck.every >= 0, "checkpoint.every", ck.every, ">= 0")
    need(ck.keep >= 1, "checkpoint.keep", ck.keep, ">= 1")


def _continual(c, errs: _Errors) -> None:
    co, need = c.get("continual") or {}, errs.need
    mode, run = co.get("mode", "grow"), co.get("from_run", "")
    need(mode in CONTINUAL_MODES, "continual.mode", mode, f"one of {CONTINUAL_MODES}")
    need(isinstance(co.get("train_invariant", False), bool), "continual.train_invariant",
         co.get("train_invariant"), "True or False")
    if run:
        need(os.path.isdir(os.path.join(run, "checkpoints")) and os.path.isfile(os.path.join(run, "config.json")),
             "continual.from_run", run, "a run directory holding config.json and checkpoints/")
        need(not c.init_from, "init_from", c.init_from, f"'' with continual.from_run={run!r} (the parameters come "
             "from that run)")


def _mesh(c, errs: _Errors, n: int) -> None:
    """The mesh fits ``n`` devices, the rules parse, and the batch and adapter stack split evenly."""
    need, m, t = errs.need, c.model, c.train
    mesh_axes = {k: v for k, v in c.mesh.items() if k != "slices"}
    slices = int(c.mesh.get("slices", 1))
    bad = [k for k in mesh_axes if k not in MESH_AXES]
    need(not bad, "mesh", dict(c.mesh), f"axis names from {MESH_AXES} (and slices)")
    need(slices >= 1 and n % slices == 0, "mesh.slices", slices, f">= 1 and dividing the device count {n}")
    rules = DEFAULT_RULES
    try:
        rules = rules_from_config(c.get("rules"))
    except ValueError as e:
        errs.append(str(e))
    per_slice, where = n, f"the device count {n}"
    if slices > 1 and n % slices == 0:
        per_slice, where = n // slices, f"the devices per slice {n // slices}"   # the sizes are one slice's
    if not bad:
        sizes = [int(v) for v in mesh_axes.values()]
        fills = sizes.count(-1)
        prod = 1
        for s in sizes:
            prod *= s if s > 0 else 1
        need(fills <= 1 and all(s == -1 or s >= 1 for s in sizes), "mesh", dict(c.mesh),
             "sizes >= 1 with at most one -1")
        if fills == 0:
            need(prod == per_slice, "mesh", dict(c.mesh), f"sizes whose product equals {where}")
        else:
            need(per_slice % prod == 0, "mesh", dict(c.mesh), f"fixed sizes dividing {where}")
        shape = resolve_axes(dict(c.mesh), n)
        module_ways = shape.get("module", 1)
        if module_ways > 1 and dict(rules).get("module"):
            adapters = m.num_modules + int(bool(m.invariant)) + int(c.router.source == "adapter")
            need(adapters % module_ways == 0, "mesh.module", module_ways,
                 f"a divisor of the adapter stack ({adapters} = model.num_modules {m.num_modules} + invariant "
                 f"{int(bool(m.invariant))} + router adapter {int(c.router.source == 'adapter')}); "
                 "else the adapters would be replicated, not split")
        if all(v >= 1 for v in shape.values()):
            ways = data_ways(AbstractMesh(tuple(shape.values()), tuple(shape)), rules)
            need(t.batch_size % ways == 0, "train.batch_size", t.batch_size,
                 f"a multiple of the batch split (rules.batch) {ways}")
            need(c.eval.batch_size % ways == 0, "eval.batch_size", c.eval.batch_size,
                 f"a multiple of the batch split (rules.batch) {ways}")
