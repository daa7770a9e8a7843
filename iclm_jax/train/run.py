"""A built run (mesh, data, jitted steps, sharded state) and the ways to fill its state: fresh, from
another run, from a pretrained base, or restored from a finished run's workdir for evaluation."""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from iclm_jax import checkpoint, evaluate, hf, independence, sharding
from iclm_jax.config_check import ConfigError
from iclm_jax.data import sources, tasks
from iclm_jax.data.reference import fit_majority_answer, score_majority_answer
from iclm_jax.data.tokenizer import load_tokenizer
from iclm_jax.fields import csv, typed
from iclm_jax.padding import round_up
from iclm_jax.train import build, continual
from iclm_jax.train.step import make_steps, make_view_steps


class Run:
    """A built run: mesh, data, jitted steps and the current (sharded) state."""

    def __init__(self, config, workdir: str, data: sources.RunData):
        self.config, self.workdir, self.data = config, workdir, data
        self.mesh = sharding.make_mesh(dict(config.mesh))
        self.rules = sharding.rules_from_config(config.get("rules"))
        vocab = data.tokenizer.vocab_size

        def init():
            return nnx.state(build.train_state(config, vocab))

        # Built abstractly, then created directly in its shardings by a jitted init: no full copy on
        # one device, and it works when the mesh spans several processes.
        ts = nnx.eval_shape(lambda: build.train_state(config, vocab))
        self.num_modules = ts.model.cfg.num_modules
        self.model_cfg = ts.model.cfg
        self.view_steps = None      # make_view_steps, built when per-module views are first evaluated
        self.loss_cfg = build.loss_config(config)
        self.state_sharding = sharding.state_shardings(nnx.state(ts), self.mesh, self.rules)
        self.graphdef, _, self.train_step, self.eval_step = make_steps(
            ts, self.loss_cfg, num_domains=config.data.num_domains, num_slots=data.num_slots,
            skip_nonfinite=config.train.nonfinite == "skip",
            state_sharding=self.state_sharding, batch_sharding=sharding.batch_sharding(self.mesh, self.rules),
            rules=self.rules, trainable=continual.trainable(ts.model, config))
        self.state = jax.jit(init, out_shardings=self.state_sharding)()

    def evaluate(self, examples, views: bool = False) -> dict:
        """``evaluate.summarise`` of ``examples``; with ``views`` (and more than one module or an invariant
        one) also ``"views"``: accuracy of the model as routed, routed by domain (each domain to the module
        the router sends most of it to), and of each module alone (its adapter on the base head)."""
        res = self.run_set(self.eval_step, examples)
        out = evaluate.summarise(res, self.num_modules)
        cfg = self.model_cfg
        if views and (self.num_modules > 1 or cfg.invariant):
            out["views"] = self._views(examples, res, out)
        return out

    def run_set(self, step, examples, route_index=None, state=None) -> dict:
        """``evaluate.run_eval_set`` of ``step`` over ``examples`` with this run's data settings, on the run's
        state (or ``state``: e.g. an intervention's surgery)."""
        state = self.state if state is None else state
        return evaluate.run_eval_set(step, state, examples, tok=self.data.tokenizer, mesh=self.mesh,
                                     rules=self.rules, max_len=self.data.max_len, num_slots=self.data.num_slots,
                                     batch_size=self.config.eval.batch_size, route_index=route_index,
                                     length_bucket=self.config.data.get("length_bucket", 0))

    def _views(self, examples, res: dict, model: dict) -> dict:
        if self.view_steps is None:
            self.view_steps = make_view_steps(
                self.graphdef, self.loss_cfg, num_slots=self.data.num_slots, state_sharding=self.state_sharding,
                batch_sharding=sharding.batch_sharding(self.mesh, self.rules), rules=self.rules)
        keys = ["all"] + [k for k in model if k.startswith("domain_")]
        pick = lambda r: {k: r[k] for k in keys}          # noqa: E731
        views = {"model (router)": pick(model)}
        cfg = self.model_cfg
        if self.num_modules > 1:
            table = evaluate.domain_modules(res, self.num_modules)
            by_domain = lambda b: np.vectorize(lambda d: table.get(int(d), table[-1]))(b["domain"])  # noqa: E731
            views["routed by domain"] = pick(evaluate.summarise(
                self.run_set(self.view_steps["forced"], examples, by_domain), self.num_modules))
        slots = [(f"specific {m} alone", m) for m in range(self.num_modules)]
        if cfg.invariant:
            slots.append(("invariant alone", cfg.invariant_slot))
        alone = {}
        for name, slot in slots:
            const = lambda b, s=slot: np.full(b["domain"].shape, s)   # noqa: E731
            alone[slot] = self.run_set(self.view_steps["alone"], examples, const)
            views[name] = pick(evaluate.summarise(alone[slot], self.num_modules))
        real = res["present"].any(1)
        inv = res["pooled_inv"][real] if "pooled_inv" in res else None
        specs = {m: alone[m]["pooled_spec"][real] for m in range(self.num_modules)}
        model["independence"] = independence.analyse(res["module"][real], res["domain"][real], self.num_modules,
                                                     inv, res["pooled_spec"][real], specs)
        if inv is not None:
            model["independence"].update(independence.held_out_mi(inv, res["pooled_spec"][real], self._critic()))
        reps = ({"invariant": inv} if inv is not None else {}) | {"routed specific": res["pooled_spec"][real]}
        reps |= {f"specific {m} alone": z for m, z in specs.items()} if self.num_modules > 1 else {}
        # What the adapters add: every module shares the base, whose pooled state dominates theirs.
        base = self.run_set(self.view_steps["alone"], examples,
                         lambda b: np.full(b["domain"].shape, -1))["pooled_spec"][real]
        delta_sim = independence.similarity({k: v - base for k, v in reps.items()})
        model["independence"].update(independence.delta_scalars(delta_sim))
        model["matrices"] = {"routing": independence.routing_counts(res["module"][real], res["domain"][real],
                                                                    self.num_modules),
                             "similarity": independence.similarity(reps), "delta_similarity": delta_sim}
        return views

    def _critic(self):
        """The trained MINE critic (None without one)."""
        return getattr(nnx.merge(self.graphdef, self.state), "critic", None)

    def derive_heads(self) -> None:
        """``ICLM.derive_heads`` on the placed state, in its shardings: after the base was replaced, the
        heads derived from it (the concat head) become what the new base gives at construction."""
        def derive(state):
            ts = nnx.merge(self.graphdef, state)
            ts.model.derive_heads()
            return nnx.state(ts)
        self.state = jax.jit(derive, out_shardings=self.state_sharding, donate_argnums=0)(self.state)

    def state_bytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(checkpoint.to_storable(self.state)))


def start_fresh(run: Run, config) -> str:
    """A new run's starting parameters: a run to learn a new domain from (``continual.from_run``), another run's
    (``init_from``), else a pretrained base (``model.init``, with the heads derived from it), else the random
    init. Returns what it did."""
    if continual.settings(config).from_run:
        return continual.start(run, config)
    if config.init_from:
        run.state = _init_from(run, config.init_from)
        return f"initialised parameters from {config.init_from}"
    if config.model.get("init"):
        _load_pretrained_base(run, config)
        return f"loaded the pretrained base {config.model.init}"
    return ""


def _init_from(run: Run, other: str):
    """Parameters (model only) of another run's latest checkpoint; optimiser etc. start fresh."""
    mngr = checkpoint.manager(other)
    try:
        restored, _, _, _ = checkpoint.restore(mngr, checkpoint.abstract_of(run.state), fallback=False)
    except checkpoint.CorruptCheckpoint as e:
        raise ConfigError(f"init_from={other!r}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"init_from={other!r}: its state does not fit this config ({e})")
    finally:
        mngr.close()
    cur = nnx.to_pure_dict(run.state)
    cur["model"] = nnx.to_pure_dict(restored)["model"]
    state = run.state
    nnx.replace_by_pure_dict(state, cur)
    return state


def _load_pretrained_base(run: Run, config) -> None:
    """Pretrained weights (``model.init``: smollm2 | HF dir | .gguf) into the sharded base, in place."""
    pcfg, weights = hf.load_pretrained(config.model.init, lazy=True)
    m = config.model
    ours = build.model_config(config, run.data.tokenizer.vocab_size).base
    diffs = [f"model.{f}: {config.model.init} has {getattr(pcfg, f)!r}, config has {getattr(ours, f)!r}"
             for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
                       "tie_embeddings", "rope_theta")
             if getattr(pcfg, f) != getattr(ours, f)]
    if diffs:
        raise ConfigError(f"model.init={m.init!r} does not fit the config:\n  "
                                       + "\n  ".join(diffs))
    base = run.state["model"]["base"]
    hf.load_into(base, weights)
    run.state["model"]["base"] = base
    run.derive_heads()


class LoadedRun(Run):
    def file_examples(self, path: str, batch_size: int | None = None, max_unk: float | None = None):
        """(examples, problems or None) of a release JSON or evals JSONL file, rendered as the run's data
        (styles, packing, form; the same refusals). The run's max_len grows to fit, and ``batch_size``
        (the eval batch) is rounded up to the batch split."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data {path}: no such file")
        d = typed(sources.DataConfig, self.config.data)
        examples, problems = sources.file_examples(path, tuple(csv(d.styles)), d.packed, d.form, task=d.task,
                                                   worked=d.worked_answer)
        self._fit(path, examples, d.max_unk if max_unk is None else max_unk)
        if batch_size:
            self.config.eval.batch_size = round_up(batch_size, sharding.data_ways(self.mesh, self.rules))
        return examples, problems

    def eval_sets(self, only=None) -> list[sources.EvalSet]:
        """The run's own eval sets (``sources.eval_sets``: generated again with the run's seeds, or read
        from its ``data.eval_files``); ``only``: these names. The run's max_len grows to fit."""
        d = typed(sources.DataConfig, self.config.data)
        sets = sources.eval_sets(d, self.config.seed, only)
        for es in sets:
            self._fit(f"eval set {es.name!r}", es.examples, d.max_unk)
        return sets

    def _fit(self, name: str, examples, max_unk: float) -> None:
        """``sources.measure``'s refusals for ``examples``, and the run's max_len grown to hold them."""
        need = sources.measure(self.data.num_slots, self.data.tokenizer, name, examples, max_unk,
                               self.config.data.tokenizer) + 1
        if need > self.data.max_len:
            self.data.max_len = round_up(need, 32)

    def train_problems(self):
        """The run's training problems, which the reference predictors are fitted on (read on demand from
        ``data.train_file``, else generated again as the run generated them)."""
        d = typed(sources.DataConfig, self.config.data)
        task = tasks.get(d.task)
        if d.train_file:
            return task.index(d.train_file)
        return task.generate(d.train_split, "train", d.train_problems, self.config.seed)

    def evaluate_file(self, path: str, batch_size: int | None = None, max_unk: float | None = None):
        """(name, results, reference rows) of a release JSON or evals JSONL file; ``max_unk``: the largest
        accepted fraction of ``<unk>`` tokens (default: the run's ``data.max_unk``)."""
        examples, problems = self.file_examples(path, batch_size, max_unk)
        d = typed(sources.DataConfig, self.config.data)
        res = self.evaluate(examples, views=True)
        ref = {}
        if problems is not None:
            task = tasks.get(d.task)
            ref = {k: task.score_reference(p, problems) for k, p in task.fit_reference(self.train_problems()).items()}
        else:       # evals JSONL: the set's own answer prior (the best a prompt-blind predictor does)
            ref = {"majority answer (this set)": score_majority_answer(fit_majority_answer(examples), examples)}
        return os.path.basename(path), res, ref


def load_run(workdir: str, mesh: dict | None = None) -> LoadedRun:
    """A run restored onto ``mesh`` (default: every local device on the data axis), whatever mesh
    it was trained on: orbax reshards while restoring."""
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: not a run directory (no config.json)")
    with open(cfg_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    with open(os.path.join(workdir, "data.json")) as f:
        meta = json.load(f)
    config.mesh = ml_collections.ConfigDict(mesh or {"data": -1})
    ways = sharding.data_ways(sharding.make_mesh(dict(config.mesh)), sharding.rules_from_config(config.get("rules")))
    config.eval.batch_size = round_up(config.eval.batch_size, ways)
    tok = load_tokenizer(os.path.join(workdir, "tokenizer"))
    data = sources.RunData(tok, [], None, [], meta["max_len"], meta["num_slots"])
    run = LoadedRun(config, workdir, data)
    mngr = checkpoint.manager(workdir)
    try:
        state, _, step, _ = checkpoint.restore(mngr, checkpoint.abstract_of(run.state), fallback=False)
    finally:
        mngr.close()
    run.state = state
    run.step = step
    return run
