"""Continual learning of a new domain: ``--config.continual.from_run=RUN`` (README "Continual learning").

A trained run (``RUN``, K specific modules) is continued on this config's data, a new domain, in one of two
modes (``continual.mode``):

``grow``      the model gets K + 1 specific modules. RUN's modules keep slots ``0..K-1``; slot K is a fresh
              adapter (LoRA B = 0: it starts as the bare base); the invariant adapter (and the router's own,
              ``router.source=adapter``) move one slot up. The router gets code K, seeded by k-means++ on the
              new domain's routed embeddings beside RUN's codes, then Lloyd steps that move it alone
              (``codebook.extend_codes``). Training changes adapter slot K and code K only (and the invariant
              adapter with ``continual.train_invariant``). RUN's specific adapters, the router's adapter, the
              aggregator, the router's projection, RUN's codes with their statistics and the running mean stay
              bit-identical (``trainable``; ``Router.freeze_codes``). An old-domain row that the router still
              sends to an old module therefore gets exactly RUN's output. Its only way to change is a new
              nearest code; the forgetting report counts those rows.
``finetune``  the baseline: RUN's model as it is (K modules), every parameter RUN trained except the base,
              nothing else frozen. From a single-module RUN (``acre.py:baseline``) it fine-tunes one shared
              LoRA on the new domain.

In both modes the base is frozen (``model.train_base=False``) and the model's parameters are copied from
RUN's latest checkpoint. The optimiser, the MINE critic and the data position start fresh, as with
``init_from``. ``prepare`` sets ``model.num_modules`` (RUN's K, + 1 to grow) and ``model.train_base`` in the
config, so ``config.json`` describes the model and the continual run resumes, exports and evaluates like
any other. The model's other fields must match RUN's (``ARCHITECTURE``); each difference is named.

Domain ids come from the rendering (``render.DOMAINS``: symbolic 0, text 1), not from a run's
``data.styles``. A text-only continual run's rows carry domain 1, as they would in a run on both, so
reports and routing tables line up old and new domains. ``router.mode=oracle`` routes domain d to module
d mod (K + 1). Growing it needs the new domain's id to be K; ``start`` checks this on the data.
"""
from __future__ import annotations

import copy
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from iclm_jax import checkpoint, partitioning, sharding
from iclm_jax.config_check import ConfigError
from iclm_jax.data import pipeline
from iclm_jax.model.codebook import extend_codes
from iclm_jax.model.layer_stack import plain_path
from iclm_jax.model.lora import LoRAParam
from iclm_jax.train import build
from iclm_jax.train.resume import differences
from iclm_jax.train.step import at

# Config fields that must be RUN's (the model's function and the token ids). model.num_modules and
# model.train_base are set by ``prepare``; the compute-only fields (remat, scan_layers, attention) and the
# pretrained source (model.init: the base comes from RUN) may differ; the rest are training choices.
ARCHITECTURE = ("model.*", "lora.*", "router.source", "router.update", "router.mode", "router.proj_dim",
                "router.center", "router.normalize", "router.temperature", "data.tokenizer", "data.task")
SET_BY_PREPARE = ("model.num_modules", "model.train_base")
MAY_DIFFER = SET_BY_PREPARE + ("model.remat", "model.scan_layers", "model.attention", "model.init")
SEED_ROWS = 512     # new-domain training rows whose routed embeddings seed the new code


def settings(config) -> build.ContinualConfig:
    return build.continual_config(config)


def grows(config) -> bool:
    s = settings(config)
    return bool(s.from_run) and s.mode == "grow"


def read_config(run_dir: str) -> dict:
    """RUN's stored ``config.json`` (ConfigError naming the file if it is missing or unreadable)."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"continual.from_run={run_dir!r}: {path} is not a readable run config ({e})") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        raise ConfigError(f"continual.from_run={run_dir!r}: {path} is not a run config (no model group)")
    return stored


def prepare(config) -> tuple[ml_collections.ConfigDict, list[str]]:
    """The continual run's config (a copy: ``model.num_modules`` and ``model.train_base`` set from RUN) and the
    notes saying what was set; ``config`` itself when ``continual.from_run`` is empty. ConfigError lists every
    ``ARCHITECTURE`` field that differs from RUN's, or says why RUN cannot grow."""
    s = settings(config)
    if not s.from_run:
        return config, []
    stored = read_config(s.from_run)
    diffs = architecture_diffs(stored, json.loads(config.to_json_best_effort()))
    if diffs:
        raise ConfigError(f"continual.from_run={s.from_run!r}: this config's model differs from the run's:\n  "
                          + "\n  ".join(diffs) + "\nuse the run's model settings (the same config variant)")
    k = int(stored["model"]["num_modules"])
    mode = stored.get("router", {}).get("mode", "hard")
    if s.mode == "grow" and k < 2 and mode != "oracle":
        raise ConfigError(f"continual.from_run={s.from_run!r}: its model has one module and no router "
                          f"(model.num_modules=1, router.mode={mode!r}): continual.mode=grow needs a router to "
                          "route the new domain; use continual.mode=finetune")
    out = copy.deepcopy(config)
    k_new = k + 1 if s.mode == "grow" else k
    notes = []
    if out.model.num_modules != k_new:
        why = f"the run's {k} + 1 new module" if s.mode == "grow" else "the run's"
        notes.append(f"continual.mode={s.mode}: model.num_modules={k_new} ({why}; the config had "
                     f"{out.model.num_modules})")
        out.model.num_modules = k_new
    if out.model.train_base:
        notes.append(f"continual.mode={s.mode}: model.train_base=False (the base stays the run's)")
        out.model.train_base = False
    return out, notes


def architecture_diffs(stored: dict, current: dict) -> list[str]:
    """``"field: the run has A, this config has B"`` for every ``ARCHITECTURE`` field that differs (a field a
    stored config predates counts as its default)."""
    def compared(field):
        return field not in MAY_DIFFER and any(field == p or p.endswith(".*") and field.startswith(p[:-1])
                                               for p in ARCHITECTURE)
    return differences(stored, current, compared, ("the run has", "this config has"))


# ---------------------------------------------------------------------------------------------- freezing
def trainable(model, config) -> dict | None:
    """What a grow step may change (``step.make_steps``' ``trainable``): plain key path below the model ->
    a bool array broadcasting to that parameter. LoRA stacks: the new slot (and the invariant's with
    ``continual.train_invariant``) along their ``module`` axis; a gradient-trained codebook: the new code along
    ``codes``; every other parameter: nothing. None outside grow mode (nothing frozen but the base, which the
    optimiser does not hold)."""
    if not grows(config):
        return None
    cfg = model.cfg
    new = cfg.num_modules - 1
    slots = [new] + ([cfg.invariant_slot] if settings(config).train_invariant and cfg.invariant else [])
    out = {}
    for path, var in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param),
                                                         is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names, shape = partitioning.names_of(var) or (), var.shape
        if isinstance(var, LoRAParam):
            keep = _along(shape, names.index("module"), slots)
        elif "codes" in names:
            keep = _along(shape, names.index("codes"), [new])
        else:
            keep = np.zeros((), bool)
        out[plain_path(path)] = keep
    return out


def _along(shape, axis: int, indices) -> np.ndarray:
    """A bool array, True at ``indices`` of ``axis`` and shaped to broadcast to ``shape``."""
    vec = np.isin(np.arange(shape[axis]), indices)
    return vec.reshape([shape[axis] if i == axis else 1 for i in range(len(shape))])


# ---------------------------------------------------------------------------------------------- starting
def start(run, config) -> str:
    """Fill ``run.state`` (freshly initialised) from RUN's latest checkpoint: the model copied (``finetune``) or
    grown (``grow``: slots remapped, the new code seeded); returns what it did, in one line."""
    s = settings(config)
    old, step = _restore_model(run, config)
    if s.mode == "finetune":
        _install(run, old)
        return f"continual.mode=finetune: the model of {s.from_run} (step {step}), base frozen"
    k_old = run.model_cfg.num_modules - 1
    _check_oracle_domains(run, config, k_old)
    _install(run, _grow(run, old, k_old))
    seeded = ""
    if run.model_cfg.uses_router:
        rows = _seed_new_code(run, config, k_old)
        seeded = f", code {k_old} seeded by k-means++ on {rows} new-domain rows"
    frozen = "the invariant trains" if settings(config).train_invariant else "the invariant frozen"
    return (f"continual.mode=grow: the {k_old} modules of {s.from_run} (step {step}) frozen, {frozen}; new "
            f"module {k_old}{seeded}")


def _restore_model(run, config) -> tuple[dict, int]:
    """RUN's model (a pure dict, placed on ``run.mesh``) and its step. RUN's train state is rebuilt from its
    stored config, with this run's mesh, rules and compute-only fields, so its checkpoint restores here."""
    s = settings(config)
    old_cfg = ml_collections.ConfigDict(read_config(s.from_run))
    old_cfg.mesh = copy.deepcopy(config.mesh)
    if config.get("rules") is not None:
        old_cfg.rules = copy.deepcopy(config.rules)
    for f in ("remat", "scan_layers", "attention"):
        if f in config.model:
            old_cfg.model[f] = config.model[f]
    vocab = run.data.tokenizer.vocab_size

    def init():
        return nnx.state(build.train_state(old_cfg, vocab))
    shardings = sharding.state_shardings(nnx.state(nnx.eval_shape(lambda: build.train_state(old_cfg, vocab))),
                                         run.mesh, run.rules)
    target = jax.eval_shape(jax.jit(init, out_shardings=shardings))
    mngr = checkpoint.manager(s.from_run)
    try:
        restored, _, step, _ = checkpoint.restore(mngr, target, fallback=False)
    except (checkpoint.CorruptCheckpoint, FileNotFoundError) as e:
        raise ConfigError(f"continual.from_run={s.from_run!r}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"continual.from_run={s.from_run!r}: its checkpoint does not fit its config ({e})") from None
    finally:
        mngr.close()
    return nnx.to_pure_dict(restored)["model"], step


def _install(run, model: dict) -> None:
    cur = nnx.to_pure_dict(run.state)
    cur["model"] = model
    nnx.replace_by_pure_dict(run.state, cur)


def _names(run) -> dict:
    """Plain key path below the model -> logical axis names, of every named variable of the run's model."""
    leaves = jax.tree_util.tree_leaves_with_path(run.state["model"], is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {plain_path(p): partitioning.names_of(v) for p, v in leaves if partitioning.names_of(v)}


def _grow(run, old: dict, k_old: int) -> dict:
    """The grown model: every adapter stack (``module`` axis) gets slot ``k_old`` from the fresh init, the
    slots after it move up one; every per-code router array (``codes`` axis) gets row ``k_old`` from the fresh
    init (``_seed_new_code`` sets it); everything else is RUN's."""
    names = _names(run)
    fresh = nnx.to_pure_dict(run.state)["model"]

    def grow(old, fresh):
        def leaf(path, new):
            was = at(old, plain_path(path))
            axis_names = names.get(plain_path(path), ())
            for axis_name in ("module", "codes"):
                if axis_name in axis_names:
                    ax = axis_names.index(axis_name)
                    cut = functools.partial(jax.lax.slice_in_dim, axis=ax)
                    return jnp.concatenate([cut(was, 0, k_old), cut(new, k_old, k_old + 1),
                                            cut(was, k_old, was.shape[ax])], axis=ax)
            return was
        return jax.tree_util.tree_map_with_path(leaf, fresh)

    out_sharding = jax.tree.map(lambda x: x.sharding, fresh)
    return jax.jit(grow, out_shardings=out_sharding)(old, fresh)


def _check_oracle_domains(run, config, k_old: int) -> None:
    if run.model_cfg.router.mode != "oracle":
        return
    k = k_old + 1
    bad = sorted({e.domain for e in run.data.train_sample if e.domain % k != k_old})
    if bad:
        raise ConfigError(f"continual.mode=grow with router.mode='oracle': the oracle sends domain d to module d mod "
                          f"{k}, so the new domain's rows must have domain {k_old} (module {k_old}, the new one); "
                          f"the training data has domain(s) {bad} (data.styles={config.data.styles!r})")


# Row k_old of each per-code router array once the new code's embedding is known (``_seed_new_code``).
NEW_CODE = {"codebook": lambda code, n: code, "ema_sums": lambda code, n: n * code,
            "counts": lambda code, n: n, "usage": lambda code, n: 0.0,
            "removal_cost": lambda code, n: 0.0, "split_gain": lambda code, n: 0.0}


def _seed_new_code(run, config, k_old: int) -> int:
    """Set code ``k_old`` by ``codebook.extend_codes`` on the routed embeddings of the first ``SEED_ROWS``
    new-domain training rows, beside RUN's codes; its row count N (and EMA sum m = N · code) starts at the batch
    size, what it converges to when every row comes to it. Returns the rows used."""
    z, valid = router_embeddings(run, run.data.train_sample[:SEED_ROWS])
    router = nnx.to_pure_dict(run.state)["model"]["router"]
    old_codes = _host(router["codebook"])[:k_old]
    key = jax.random.fold_in(jax.random.key(config.seed), 7919)
    code = np.asarray(extend_codes(key, z, old_codes, 1, mask=valid))[0]
    n = float(config.train.batch_size)
    names = _names(run)
    per_code = [k for k in router if names.get(("router", k), ())[:1] == ("codes",)]
    unknown = sorted(set(per_code) - set(NEW_CODE))
    if unknown:
        raise NotImplementedError(f"continual: no rule for the new code's row of router arrays {unknown}")

    def seed(model):
        r = dict(model["router"])
        for name in per_code:
            r[name] = r[name].at[k_old].set(jnp.asarray(NEW_CODE[name](code, n), r[name].dtype))
        return {**model, "router": r}

    model = nnx.to_pure_dict(run.state)["model"]
    _install(run, jax.jit(seed, out_shardings=jax.tree.map(lambda x: x.sharding, model))(model))
    return int(np.sum(valid))


def _host(x) -> np.ndarray:
    """A replicated array (the router's: rules.codes is unsplit) on the host, on any number of processes."""
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def router_embeddings(run, examples) -> tuple[np.ndarray, np.ndarray]:
    """(z [N, c], valid [N]) of ``examples``: what the run's router compares with its codes (eval mode: the
    stored running mean), from the embedding ``ICLM.route`` reads for ``router.source``."""
    bs = run.config.eval.batch_size
    ds = pipeline.make_dataset(examples, run.data.tokenizer, max_len=run.data.max_len, batch_size=bs,
                               num_slots=run.data.num_slots, seed=0, shuffle=False, repeat=False,
                               pad_last_batch=True, rows=sharding.process_rows(run.mesh, bs, run.rules))
    embed = jax.jit(functools.partial(_embed, run.graphdef),
                    in_shardings=(run.state_sharding, sharding.batch_sharding(run.mesh, run.rules)))
    zs, vs = [], []
    for batch in ds:
        z, v = embed(run.state, sharding.put_batch(batch, run.mesh, run.rules))
        if jax.process_count() > 1:
            z, v = multihost_utils.process_allgather((z, v), tiled=True)
        zs.append(np.asarray(z))
        vs.append(np.asarray(v))
    return np.concatenate(zs), np.concatenate(vs)


def _embed(graphdef, state, batch):
    model = nnx.merge(graphdef, state).model
    cfg, b = model.cfg, batch["inputs"].shape[0]
    slot = {"invariant": cfg.invariant_slot, "base": -1, "adapter": cfg.router_slot}[cfg.router_source]
    e = model.pooled(model.hidden(batch, jnp.full((b,), slot, jnp.int32), train=False), batch)
    valid = jnp.any(batch["segments"] > 0, axis=1)
    r = model.router
    return r.project(r.standardize(e, valid.astype(jnp.float32), train=False)), valid

