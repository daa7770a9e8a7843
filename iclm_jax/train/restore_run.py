"""Reload a finished run (config, tokenizer, latest checkpoint) for evaluation."""
from __future__ import annotations

import json
import os

import ml_collections

from iclm_jax import checkpoint, sharding
from iclm_jax.data import acre, acre_generate, sources
from iclm_jax.data.reference import fit_reference, score_reference
from iclm_jax.fields import csv
from iclm_jax.data.tokenizer import load_tokenizer
from iclm_jax.padding import round_up
from iclm_jax.train.loop import Run


class LoadedRun(Run):
    def evaluate_file(self, path: str, batch_size: int | None = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data {path}: no such file")
        d = self.config.data
        examples, problems = sources.file_examples(path, tuple(csv(d.styles)), bool(d.packed),
                                                   d.get("form", "full"))
        need = max(sources.row_length(e, self.data.tokenizer) for e in examples) + 1
        if need > self.data.max_len:
            self.data.max_len = round_up(need, 32)
        if batch_size:
            self.config.eval.batch_size = batch_size
        res = self.evaluate(examples)
        ref = {}
        if problems is not None:
            train = (acre.load_problems(d.train_file) if d.train_file
                     else acre_generate.generate_problems(d.train_split, "train", d.train_problems, self.config.seed))
            ref = {k: score_reference(p, problems) for k, p in fit_reference(train).items()}
        return os.path.basename(path), res, ref


def load(workdir: str, mesh: dict | None = None) -> LoadedRun:
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
    state, _, step, _ = checkpoint.restore(mngr, checkpoint.abstract_of(run.state))
    mngr.close()
    run.state = state
    run.step = step
    return run



