"""Reload a finished run (config, tokenizer, latest checkpoint) for evaluation."""
from __future__ import annotations

import json
import os

import jax
import ml_collections

from iclm_jax import checkpoint
from iclm_jax.data import acre, sources
from iclm_jax.data.reference import fit_reference, score_reference
from iclm_jax.data.tokenizer import load_tokenizer
from iclm_jax.train.loop import Run


class LoadedRun(Run):
    def evaluate_file(self, path: str, batch_size: int | None = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data {path}: no such file")
        d = self.config.data
        examples, problems = sources._file_examples(path, tuple(sources._csv(d.styles)), bool(d.packed))
        need = max(sources.row_length(e, self.data.tokenizer) for e in examples) + 1
        if need > self.data.max_len:
            self.data.max_len = -(-need // 32) * 32
        if batch_size:
            self.config.eval.batch_size = batch_size
        res = self.evaluate(examples)
        ref = {}
        if problems is not None:
            train = (acre.load_problems(d.train_file) if d.train_file
                     else acre.generate_problems(d.train_split, "train", d.train_problems, self.config.seed))
            ref = {k: score_reference(p, problems) for k, p in fit_reference(train).items()}
        return os.path.basename(path), res, ref


def load(workdir: str) -> LoadedRun:
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: not a run directory (no config.json)")
    with open(cfg_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    with open(os.path.join(workdir, "data.json")) as f:
        meta = json.load(f)
    tok = load_tokenizer(os.path.join(workdir, "tokenizer"))
    data = sources.RunData(tok, [], None, [], meta["max_len"], meta["num_slots"])
    run = LoadedRun.__new__(LoadedRun)
    Run.__init__(run, config, workdir, data)
    # run.state is already placed with the current shardings: restore into its abstract twin.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            run.state)
    mngr = checkpoint.manager(workdir)
    state, _, step = checkpoint.restore(mngr, abstract)
    mngr.close()
    run.state = state
    run.step = step
    return run



