"""Interventions on a trained ICLM's modules at inference (``iclm-eval --intervene=SPEC``).

Specs, comma-separated (``parse``; ``expand`` checks them against a run and expands ``all``):

* ``none``: the model as trained. Always evaluated: the reference of every other row.
* ``route=M``: do(route = M). Every input goes to specific module M (0..K-1), whatever the router says.
* ``swap``: each input goes to a module other than its domain's *own* module (defined below).
* ``ablate=M``: specific module M's adapter is zeroed (LoRA A and B of slot M in every layer). Rows the
  router sends to M then use the bare base as their specific stream; nothing else changes (the router
  does not read slot M).
* ``ablate=invariant``: the invariant module's adapter is zeroed, so the invariant stream is the bare
  base. With ``router.source=invariant`` the router then reads the bare base's states too and may route
  rows differently; the report's "rows per module" column shows any such change.
* ``invariant-only`` / ``specific-only``: the aggregator reads one stream only. For the concat head
  (logits = invariant half + specific half) the other half's input is zeroed (its ``scale`` entries),
  so its term is removed from the trained head. For the ``logits`` / ``probs`` aggregators,
  ``invariant_weight`` becomes 1 or 0.
* ``all``: ``none``, every ``route=M``, ``swap``, every ``ablate=M``, ``ablate=invariant``,
  ``invariant-only`` and ``specific-only``.

An intervention that means nothing for a run (``swap`` with K = 1; the invariant ones without an
invariant module) is kept as a row of "-" (``not_applicable`` says why). A module number out of
range is an error.

**Own module and swap.** A domain's own module is the module the unintervened router sends most of
its rows to (the lowest module on a tie), counted over every evaluated set together (teacher-forced
rows, or generation prompts for ``--score=generate``). This is what the router does on the evaluated data,
which stands in for "during training": a run keeps no per-domain routing table. ``swap`` sends domain d to the
own module of the next labelled domain, cyclically in domain-id order, whose own module differs from
d's. If no domain has a different own module (the router sends everything to one module), d goes to
``(own(d) + 1) mod K``; rows without a domain go there too. With K = 2 that is always the other module.
With K = 1 there is nothing to swap to.

Python API: ``evaluate_files(run, paths, spec)`` evaluates a ``LoadedRun`` (``train.run.load_run``)
under each intervention. ``intervene_model(model, iv)`` gives the intervened ``ICLM`` and
``logits(model, batch, iv)`` its logits on one batch. The report is ``intervention_report.py``.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iclm_jax import generate_score, partitioning, sharding
from iclm_jax.data.render import DOMAINS
from iclm_jax.model.iclm import ICLM
from iclm_jax.model.lora import LoRAParam
from iclm_jax.train.step import make_steps, make_view_steps

INVARIANT = "invariant"
ONLY = ("invariant-only", "specific-only")
_PLAIN = ("none", "swap", "all") + ONLY
USAGE = "route=M, swap, ablate=M, ablate=invariant, invariant-only, specific-only, none, all"
UNLABELLED = "unlabelled"        # the domain key of rows without a domain (-1)


@dataclasses.dataclass(frozen=True)
class Intervention:
    kind: str                        # none | route | swap | ablate | invariant-only | specific-only | all
    target: int | str | None = None  # route: module M; ablate: module M or "invariant"

    @property
    def name(self) -> str:
        return self.kind if self.target is None else f"{self.kind}={self.target}"


NONE = Intervention("none")


# ---------------------------------------------------------------------------- specs
def parse(text: str) -> list[Intervention]:
    """The interventions of a comma-separated spec. A bad entry raises ValueError naming it."""
    out = []
    for item in text.split(","):
        spec = item.strip()
        key, eq, value = spec.partition("=")
        if key in _PLAIN and not eq:
            out.append(Intervention(key))
        elif key in ("route", "ablate") and eq:
            if value.isascii() and value.isdigit():
                out.append(Intervention(key, int(value)))
            elif key == "ablate" and value == INVARIANT:
                out.append(Intervention(key, INVARIANT))
            else:
                want = "a module number M" + (" or 'invariant'" if key == "ablate" else "")
                raise ValueError(f"{spec!r}: expected {key}=M with {want}")
        else:
            raise ValueError(f"{spec!r}: unknown intervention; expected a comma-separated list of {USAGE}")
    return out


def expand(interventions, num_modules: int, invariant: bool) -> list[Intervention]:
    """``none`` first, then the others in order (``all`` expanded, duplicates dropped). A module number
    outside 0..K-1 raises ValueError naming the spec."""
    out = [NONE]
    for iv in interventions:
        if iv.kind == "all":
            items = ([Intervention("route", m) for m in range(num_modules)] + [Intervention("swap")]
                     + [Intervention("ablate", m) for m in range(num_modules)]
                     + [Intervention("ablate", INVARIANT)] + [Intervention(k) for k in ONLY])
        else:
            if isinstance(iv.target, int) and not 0 <= iv.target < num_modules:
                raise ValueError(f"--intervene {iv.name}: this run has {num_modules} specific module(s), "
                                 f"M in 0..{num_modules - 1}")
            items = [iv]
        out += [x for x in items if x not in out]
    return out


def not_applicable(iv: Intervention, num_modules: int, invariant: bool) -> str:
    """Why ``iv`` means nothing for this run ("" when it does)."""
    if iv.kind == "swap" and num_modules < 2:
        return "one specific module: nothing to swap to"
    if not invariant and (iv.kind in ONLY or iv.target == INVARIANT):
        return "no invariant module"
    return ""


# ---------------------------------------------------------------------------- own modules and swap
def own_modules(module: np.ndarray, domain: np.ndarray, num_modules: int) -> dict[int, int]:
    """Each domain id's own module: the module most of its rows went to (lowest on a tie); -1 = rows
    without a domain."""
    module, domain = np.asarray(module), np.asarray(domain)
    return {int(d): int(np.argmax(np.bincount(module[domain == d], minlength=num_modules)))
            for d in sorted(set(domain.tolist()))}


def swap_modules(own: dict[int, int], num_modules: int) -> dict[int, int] | None:
    """Domain id -> its swap module (see the module docstring); None with one module."""
    if num_modules < 2:
        return None
    labelled = sorted(d for d in own if d >= 0)
    out = {}
    for i, d in enumerate(labelled):
        others = (own[labelled[(i + j) % len(labelled)]] for j in range(1, len(labelled)))
        out[d] = next((m for m in others if m != own[d]), (own[d] + 1) % num_modules)
    if -1 in own:
        out[-1] = (own[-1] + 1) % num_modules
    return out


def route_index(iv: Intervention, domain, swap: dict[int, int] | None) -> np.ndarray | None:
    """int32 [B]: the specific module each row is forced to (None: the router decides). A domain missing
    from ``swap`` gets module 0; only padding rows can have one."""
    domain = np.asarray(domain).reshape(-1)
    if iv.kind == "route":
        return np.full(domain.shape, iv.target, np.int32)
    if iv.kind == "swap":
        if swap is None:
            raise ValueError("--intervene swap: no swap table (intervene.swap_modules of the own modules)")
        return np.asarray([swap.get(int(d), 0) for d in domain], np.int32)
    return None


# ---------------------------------------------------------------------------- the surgery
def module_axis(variable) -> int:
    """The adapter axis of a LoRA weight: the dim its logical names call "module" (wherever it is:
    [M, in, r], or [L, M, in, r] with stacked layers)."""
    names = partitioning.names_of(variable)
    if not names or "module" not in names:
        raise ValueError(f"a LoRA weight of shape {variable.shape} has no 'module' axis (names {names})")
    return names.index("module")


def zero_adapter_(model: ICLM, slot: int) -> None:
    """In place: LoRA A and B of adapter ``slot`` are zero in every layer and projection."""
    for _, v in nnx.iter_graph(model):
        if isinstance(v, LoRAParam):
            x, axis = v[...], module_axis(v)
            shape = [1] * x.ndim
            shape[axis] = x.shape[axis]
            keep = (jnp.arange(x.shape[axis]) != slot).reshape(shape)
            v[...] = jnp.where(keep, x, jnp.zeros((), x.dtype))


def keep_only_(model: ICLM, stream: str) -> None:
    """In place: the aggregator reads only ``stream`` ("invariant" | "specific"). Concat: the other half
    of the head's scale is zero, so that half contributes nothing; logits/probs: invariant_weight 1 or 0
    (a static attribute: the graphdef changes)."""
    agg = model.aggregator
    if agg.kind == "concat":
        s = agg.scale[...]
        first = jnp.arange(s.shape[0]) < s.shape[0] // 2        # the invariant half comes first
        agg.scale[...] = jnp.where(first == (stream == INVARIANT), s, jnp.zeros((), s.dtype))
    else:
        agg.invariant_weight = 1.0 if stream == INVARIANT else 0.0


def _model(obj) -> ICLM:
    return obj if isinstance(obj, ICLM) else obj.model


def check(iv: Intervention, cfg) -> None:
    """Raise ValueError naming ``iv`` when it cannot be applied to a model of ``cfg`` (an ICLMConfig)."""
    if isinstance(iv.target, int) and not 0 <= iv.target < cfg.num_modules:
        raise ValueError(f"--intervene {iv.name}: this run has {cfg.num_modules} specific module(s), "
                         f"M in 0..{cfg.num_modules - 1}")
    why = not_applicable(iv, cfg.num_modules, cfg.invariant)
    if why or iv.kind == "all":
        raise ValueError(f"--intervene {iv.name}: {why or 'expand it first (expand)'}")


def apply(graphdef, state, iv: Intervention, *, state_sharding=None):
    """(graphdef, state) of an ICLM, or of a TrainState holding one, with ``iv``'s surgery. Routing
    interventions change nothing here (see ``route_index``). The state keeps ``state_sharding``."""
    if iv.kind not in ("ablate",) + ONLY:
        return graphdef, state
    check(iv, _model(nnx.merge(graphdef, state)).cfg)
    stream = iv.kind.split("-")[0]
    if iv.kind in ONLY and _model(nnx.merge(graphdef, state)).aggregator.kind != "concat":
        obj = nnx.merge(graphdef, state)
        keep_only_(_model(obj), stream)
        return nnx.split(obj)[0], state

    def surgery(s):
        obj = nnx.merge(graphdef, s)
        model = _model(obj)
        if iv.kind == "ablate":
            zero_adapter_(model, model.cfg.invariant_slot if iv.target == INVARIANT else iv.target)
        else:
            keep_only_(model, stream)
        return nnx.state(obj)

    fn = jax.jit(surgery) if state_sharding is None else jax.jit(surgery, out_shardings=state_sharding)
    return graphdef, fn(state)


def intervene_model(model: ICLM, iv: Intervention) -> ICLM:
    """A copy of ``model`` with ``iv``'s surgery (routing interventions: an unchanged copy)."""
    graphdef, state = apply(*nnx.split(model), iv)
    return nnx.merge(graphdef, state)


def logits(model: ICLM, batch: dict, iv: Intervention, swap: dict[int, int] | None = None) -> jax.Array:
    """Float32 [B, L, V] logits of ``model`` under ``iv`` on one batch (``swap``: ``swap_modules``)."""
    check(iv, model.cfg)
    m = intervene_model(model, iv)
    r = route_index(iv, batch["domain"], swap)
    h = m.forward(batch, route_index=None if r is None else jnp.asarray(r))
    return m.heads(h.x_inv, h.x_spec, aux=False)["logits"]


# ---------------------------------------------------------------------------- a run's eval sets
def load_examples(run, path: str, batch_size: int | None = None, max_unk: float | None = None) -> list:
    """The examples of a release JSON or evals JSONL file as ``LoadedRun.evaluate_file`` builds them
    (``LoadedRun.file_examples``)."""
    return run.file_examples(path, batch_size, max_unk)[0]


def _cell(hit: np.ndarray, domain: np.ndarray, module: np.ndarray, num_modules: int) -> dict:
    """Per-query ``hit`` (bool) and ``domain`` -> {"groups": {"all" | domain name: [hits, queries]},
    "routed": rows per module}."""
    groups = {"all": [int(hit.sum()), int(hit.size)]}
    for d, name in enumerate(DOMAINS):
        groups[name] = [int(hit[domain == d].sum()), int((domain == d).sum())]
    return {"groups": groups, "routed": np.bincount(module, minlength=num_modules).tolist()}


def _teacher_cell(res: dict, num_modules: int) -> dict:
    present, real = res["present"], res["present"].any(1)
    domain = np.broadcast_to(res["domain"][:, None], present.shape)[present]
    return _cell(res["correct"][present], domain, res["module"][real], num_modules)


def _domain_key(d: int) -> str:
    return DOMAINS[d] if 0 <= d < len(DOMAINS) else UNLABELLED


def _package(score: str, run, ivs, own, swap, cells) -> dict:
    cfg = run.model_cfg
    return {"score": score, "num_modules": cfg.num_modules, "invariant": cfg.invariant,
            "aggregator": cfg.aggregator if cfg.invariant else None, "router_source": cfg.router_source,
            "interventions": [iv.name for iv in ivs],
            "not_applicable": {iv.name: why for iv in ivs
                               if (why := not_applicable(iv, cfg.num_modules, cfg.invariant))},
            "own": {_domain_key(d): m for d, m in own.items()},
            "swap": None if swap is None else {_domain_key(d): m for d, m in swap.items()},
            "sets": cells}


def teacher_results(run, sets: dict[str, list], ivs: list[Intervention]) -> dict:
    """Teacher-forced exact match of every set under every intervention (``ivs`` expanded, ``none``
    first): the evaluation steps of ``Run.evaluate`` with the surgery's state or a forced route."""
    k, cfg = run.num_modules, run.model_cfg
    batch_sharding = sharding.batch_sharding(run.mesh, run.rules)
    views = {}

    def evaluate(step, state, examples, route=None):
        return run.run_set(step, examples, route, state=state)

    base = {name: evaluate(run.eval_step, run.state, ex) for name, ex in sets.items()}
    real = {name: r["present"].any(1) for name, r in base.items()}
    own = own_modules(np.concatenate([r["module"][real[n]] for n, r in base.items()]),
                      np.concatenate([r["domain"][real[n]] for n, r in base.items()]), k)
    swap = swap_modules(own, k)
    cells = {name: {} for name in sets}
    for iv in ivs:
        if iv == NONE or not_applicable(iv, k, cfg.invariant):
            for name in sets:
                cells[name][iv.name] = _teacher_cell(base[name], k) if iv == NONE else None
            continue
        graphdef, state = apply(run.graphdef, run.state, iv, state_sharding=run.state_sharding)
        route = None
        if iv.kind in ("route", "swap"):
            if not views:
                views.update(make_view_steps(run.graphdef, run.loss_cfg, num_slots=run.data.num_slots,
                                             state_sharding=run.state_sharding, batch_sharding=batch_sharding,
                                             rules=run.rules))
            step = views["forced"]
            route = lambda b, iv=iv: route_index(iv, b["domain"], swap)       # noqa: E731
        elif graphdef is run.graphdef:
            step = run.eval_step
        else:       # a static attribute changed (logits/probs invariant_weight): its own compiled step
            step = make_steps(nnx.merge(graphdef, state), run.loss_cfg, num_domains=run.config.data.num_domains,
                              num_slots=run.data.num_slots, state_sharding=run.state_sharding,
                              batch_sharding=batch_sharding, rules=run.rules)[3]
        for name, examples in sets.items():
            cells[name][iv.name] = _teacher_cell(evaluate(step, state, examples, route), k)
    return _package("teacher", run, ivs, own, swap, cells)


def generate_results(run, sets: dict[str, list], ivs: list[Intervention], *, max_new_tokens: int | None = None,
                     batch_size: int | None = None) -> dict:
    """Exact match of greedy generations (``generate_score.score_examples``: the KV cache; the router runs
    once per prompt, or not at all under a forced route) of every set under every intervention."""
    k, cfg = run.num_modules, run.model_cfg
    tok = run.data.tokenizer

    def score(graphdef, state, examples, route=None) -> dict:
        model = _model(nnx.merge(graphdef, state))
        recs = generate_score.score_examples(model, examples, tok, max_new_tokens=max_new_tokens,
                                             batch_size=batch_size or run.config.eval.batch_size,
                                             route=route)["records"]
        hit = np.asarray([generate_score.exact_match(r["generation"], r["ideal"]) for r in recs], bool)
        return {"hit": hit, "domain": np.asarray([r["domain"] for r in recs]),
                "module": np.asarray([r["module"] for r in recs])}

    base = {name: score(run.graphdef, run.state, ex) for name, ex in sets.items()}
    own = own_modules(np.concatenate([r["module"] for r in base.values()]),
                      np.concatenate([r["domain"] for r in base.values()]), k)
    swap = swap_modules(own, k)
    cells = {name: {} for name in sets}
    for iv in ivs:
        for name, examples in sets.items():
            if iv == NONE:
                r = base[name]
            elif not_applicable(iv, k, cfg.invariant):
                cells[name][iv.name] = None
                continue
            else:
                route = (lambda d, iv=iv: route_index(iv, d, swap)) if iv.kind in ("route", "swap") else None
                r = score(*apply(run.graphdef, run.state, iv, state_sharding=run.state_sharding), examples, route)
            cells[name][iv.name] = _cell(r["hit"], r["domain"], r["module"], k)
    return _package("generate", run, ivs, own, swap, cells)


def set_names(paths: list[str]) -> list[str]:
    """Each path's shortest trailing part that tells it from the others: "IID/test.json" and
    "Sys/test.json" for two files named test.json. A file given twice is one set."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    names = []
    for p in parts:
        for k in range(1, len(p) + 1):
            name = "/".join(p[-k:])
            if all(q == p or "/".join(q[-k:]) != name for q in parts):
                break
        names.append(name)
    return names


def evaluate_files(run, paths: list[str], spec: str | list[Intervention], *, score: str = "teacher",
                   batch_size: int | None = None, max_unk: float | None = None,
                   max_new_tokens: int | None = None) -> dict[str, dict]:
    """A LoadedRun's eval files under the interventions of ``spec`` -> {"teacher": ..., "generate": ...}
    (per ``score``: teacher | generate | both). Each value has the sets' cells (hits and queries per
    domain, rows per module), the own and swap modules and the run's shape; ``intervention_report``
    renders it."""
    sets = {name: load_examples(run, p, batch_size, max_unk) for name, p in zip(set_names(paths), paths)}
    return evaluate_sets(run, sets, spec, score=score, batch_size=batch_size, max_new_tokens=max_new_tokens)


def evaluate_sets(run, sets: dict[str, list], spec: str | list[Intervention], *, score: str = "teacher",
                  batch_size: int | None = None, max_new_tokens: int | None = None) -> dict[str, dict]:
    """``evaluate_files`` of examples already built: {set name: examples} (e.g. ``LoadedRun.eval_sets``)."""
    ivs = parse(spec) if isinstance(spec, str) else list(spec)
    ivs = expand(ivs, run.num_modules, run.model_cfg.invariant)
    out = {}
    if score != "generate":
        out["teacher"] = teacher_results(run, sets, ivs)
    if score != "teacher":
        out["generate"] = generate_results(run, sets, ivs, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return out
