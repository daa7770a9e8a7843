"""Continual learning (``continual.from_run``, train/continual.py): a grown run keeps the old modules, codes and
the old domain's outputs bit-identical to the run it grew from, and its new code routes the new domain; a grown
run killed with SIGKILL resumes bit-identically; it exports; the baseline fine-tunes without growing; the
forgetting report's numbers are the runs' own evaluations; bad input is one line naming the field."""
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iclm_jax import continual_report
from iclm_jax.checkpoint import to_storable
from iclm_jax.config_check import ConfigError, validate
from iclm_jax.data import pipeline, sources, tasks
from iclm_jax.model.codebook import extend_codes
from iclm_jax.model.layer_stack import plain_path
from iclm_jax.model.router import Router, RouterConfig
from iclm_jax.train import continual, resume
from iclm_jax.train.loop import train
from iclm_jax.train.run import load_run
from tests.helpers import one_device_env
from tests.test_faults import _losses
from tests.test_step import acre_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K_OLD, STEPS, PROBLEMS = 2, 8, 4
TINY = ["--config.model.d_model=16", "--config.model.n_layers=1", "--config.model.n_heads=2",
        "--config.model.n_kv_heads=1", "--config.model.head_dim=8", "--config.model.mlp_dim=32",
        "--config.lora.rank=2", "--config.mi.critic_hidden=16", "--config.train.warmup_steps=2",
        "--config.train.log_every=1", "--config.train.batch_size=8", "--config.eval.batch_size=8",
        "--config.data.train_problems=24", f"--config.data.eval_problems={PROBLEMS}",
        "--config.data.eval_splits=IID", "--quiet"]
PER_CODE = ("codebook", "counts", "ema_sums", "removal_cost", "split_gain")


def _tiny_config(styles: str, steps: int):
    """TINY as a config, for runs in this process (its 8 fake devices: batches of 8)."""
    c = acre_cfg.get_config()
    for flag in TINY[:-1]:
        key, value = flag[len("--config."):].split("=")
        group, field = key.split(".")
        c[group][field] = type(c[group][field])(value)
    c.data.styles, c.train.steps = styles, steps
    return c


def _grow_cmd(workdir, old, *extra):
    """A continual run on old's checkpoint, on one device: text, STEPS steps, a checkpoint a step."""
    return [sys.executable, "-m", "iclm_jax.main", f"--workdir={workdir}", *TINY, "--config.mesh.data=1",
            "--config.data.styles=text", f"--config.train.steps={STEPS}", "--config.checkpoint.every=1",
            f"--config.continual.from_run={old}", *extra]


def _env():
    return one_device_env()


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """The run learned from: an ICLM (K = 2) on the symbolic rendering only."""
    work = str(tmp_path_factory.mktemp("old") / "run")
    train(_tiny_config("symbolic", 6), work, quiet=True)
    return work


@pytest.fixture(scope="module")
def continued(old_run, tmp_path_factory):
    """old_run continued on the text rendering, both modes at once, each in a process of its own on one device
    (uninterrupted, a checkpoint a step: the kill -9 test's reference; a second training in one process can
    abort inside XLA, see test_faults' SIGTERM test)."""
    works = {mode: str(tmp_path_factory.mktemp(mode) / "run") for mode in ("grow", "finetune")}
    procs = {mode: subprocess.Popen(_grow_cmd(w, old_run, f"--config.continual.mode={mode}"), cwd=REPO, env=_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mode, w in works.items()}
    errs = {mode: p.communicate(timeout=900)[1] for mode, p in procs.items()}
    for mode, p in procs.items():
        assert p.returncode == 0, errs[mode][-3000:]
    assert f"model.num_modules={K_OLD + 1}" in errs["grow"] and "k-means++" in errs["grow"]
    return works


@pytest.fixture(scope="module")
def grown(continued):
    return continued["grow"]


@pytest.fixture(scope="module")
def finetuned(continued):
    return continued["finetune"]


def _model(workdir) -> dict:
    return to_storable(load_run(workdir).state)["model"]


def _leaves(tree: dict) -> dict:
    return {plain_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_grow_keeps_every_old_parameter_bit_identical(old_run, grown):
    """Against the checkpoint grown from: RUN's adapters in slots 0..K-1 and (moved up one) the invariant's,
    the base, the aggregator, the router's codes with their statistics and its running mean; the new slot
    trained (its LoRA B is no longer the zero init)."""
    old, new = _leaves(_model(old_run)), _leaves(_model(grown))
    assert set(old) == set(new)
    checked = 0
    for path, x in new.items():
        y = old[path]
        if path[-1] in ("lora_a", "lora_b"):          # [M, ...]: K specific, invariant
            np.testing.assert_array_equal(x[:K_OLD], y[:K_OLD], err_msg=str(path))
            np.testing.assert_array_equal(x[K_OLD + 1:], y[K_OLD:], err_msg=str(path))
            if path[-1] == "lora_b":
                assert np.abs(x[K_OLD]).max() > 0, path
        elif path[0] == "router" and path[-1] in PER_CODE:
            np.testing.assert_array_equal(x[:K_OLD], y[:K_OLD], err_msg=str(path))
        elif path[0] == "router" and path[-1] in ("usage", "count"):
            continue                                  # a monitor of recent routing; the RNG stream's counter
        else:
            np.testing.assert_array_equal(x, y, err_msg=str(path))
        checked += 1
    assert checked > 20
    cfg = json.load(open(os.path.join(grown, "config.json")))
    assert cfg["model"]["num_modules"] == K_OLD + 1 and cfg["model"]["train_base"] is False


def _batches(run, style: str):
    """The IID test problems of the runs' final evaluation, in one rendering."""
    task = tasks.get("acre")
    examples = task.render(task.generate("IID", "test", PROBLEMS, run.config.seed + 1000), [style], True, "full",
                           False)
    max_len = max(sources.row_length(e, run.data.tokenizer) for e in examples)
    return list(pipeline.make_dataset(examples, run.data.tokenizer, max_len=max_len, batch_size=8,
                                      num_slots=run.data.num_slots, seed=0, shuffle=False, repeat=False,
                                      pad_last_batch=True))


def test_old_domain_outputs_are_bit_identical_and_new_domain_goes_to_the_new_module(old_run, grown):
    """The old domain's rows: routed as before and the same logits, bit for bit. The new domain's rows: all
    routed to the new module."""
    before, after = load_run(old_run), load_run(grown)
    m0 = nnx.merge(before.graphdef, before.state).model
    m1 = nnx.merge(after.graphdef, after.state).model
    for batch in _batches(before, "symbolic"):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        a, b = m0(batch), m1(batch)
        real = np.asarray(batch["segments"]).any(1)
        np.testing.assert_array_equal(np.asarray(a.route.index)[real], np.asarray(b.route.index)[real])
        assert np.asarray(b.route.index)[real].max() < K_OLD
        np.testing.assert_array_equal(np.asarray(a.logits)[real], np.asarray(b.logits)[real])
    for batch in _batches(before, "text"):
        out = m1({k: jnp.asarray(v) for k, v in batch.items()})
        real = np.asarray(batch["segments"]).any(1)
        assert (np.asarray(out.route.index)[real] == K_OLD).all()


def test_extend_codes_seeds_on_the_rows_the_old_codes_serve_worst():
    """Hand computation: one old code on cluster A; the new code lands on cluster B and becomes its mean
    (every B row is nearer to it than to the old code), whichever B row k-means++ drew."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 3)) * 0.1
    b = rng.normal(size=(40, 3)) * 0.1 + np.array([5.0, 0, 0])
    x = np.concatenate([a, b]).astype(np.float32)
    old = a.mean(0, keepdims=True).astype(np.float32)
    for seed in range(3):
        new = np.asarray(extend_codes(jax.random.key(seed), x, old, 1))
        np.testing.assert_allclose(new[0], b.mean(0), rtol=0, atol=1e-5)
    mask = np.r_[np.ones(40), np.ones(20), np.zeros(20)]          # masked rows do not count
    new = np.asarray(extend_codes(jax.random.key(0), x, old, 1, mask=jnp.asarray(mask)))
    np.testing.assert_allclose(new[0], b[:20].mean(0), rtol=0, atol=1e-5)


def test_frozen_codes_keep_rows_and_mean_and_the_free_code_follows_the_ema():
    """Router.freeze_codes(2) over 3 codes, one train step on rows nearest the free code: the frozen rows,
    their statistics and the running mean are bit-identical; the free code is the EMA update computed here
    (N ← γN + (1−γ)n, m ← γm + (1−γ)Σz, code = m / Ñ with the Laplace smoothing)."""
    cfg = RouterConfig(center=True, normalize=False, ema_decay=0.9, relocate=True)
    r = Router(4, 3, cfg, rngs=nnx.Rngs(0))
    codes = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], np.float32)
    r.codebook[...], r.ema_sums[...] = jnp.asarray(codes * 2), jnp.asarray(codes * 2)
    r.counts[...] = jnp.asarray([2.0, 2.0, 2.0])
    r.mean[...] = jnp.asarray([0.1, 0.1, 0.1, 0.1])
    r.initialized[...] = jnp.array(True)
    r.freeze_codes(2)
    before = {k: np.asarray(getattr(r, k)[...]) for k in PER_CODE + ("mean",)}
    e = np.array([[0.1, 0.1, 1.1, 0.1], [0.1, 0.1, 0.9, 0.3]], np.float32)   # near code 2 after centring
    out = r(jnp.asarray(e), train=True)
    assert np.asarray(out.index).tolist() == [2, 2]
    for k, v in before.items():
        got = np.asarray(getattr(r, k)[...])
        np.testing.assert_array_equal(got if k == "mean" else got[:2], v if k == "mean" else v[:2], err_msg=k)
    z = e - before["mean"]                            # centred on the stored mean, not the batch's
    n = 0.9 * 2.0 + 0.1 * 2
    m = 0.9 * before["ema_sums"][2] + 0.1 * z.sum(0)
    counts = np.array([0.9 * 2.0, 0.9 * 2.0, n])      # the frozen counts as the step's smoothing sees them
    smoothed = (n + cfg.eps) / (counts.sum() + 3 * cfg.eps) * counts.sum()
    np.testing.assert_allclose(np.asarray(r.codebook[...])[2], m / smoothed, rtol=1e-6, atol=0)
    assert int(r.relocations[...]) == 0
    with pytest.raises(ValueError, match="freeze_codes"):
        r.freeze_codes(3)


@pytest.mark.slow
def test_killed_grow_run_resumes_bit_identically(old_run, grown, tmp_path):
    """SIGKILL mid-run, the same command again: the same losses and final state as the uninterrupted run."""
    work = str(tmp_path / "run")
    cmd = _grow_cmd(work, old_run, "--config.continual.mode=grow")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while len(_losses(work) if os.path.exists(os.path.join(work, "metrics.jsonl")) else {}) < 3:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() - t0 < 600
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from step" in r.stderr and "k-means++" not in r.stderr
    assert _losses(work) == _losses(grown)
    a, b = load_run(work), load_run(grown)
    assert a.step == b.step == STEPS
    la, lb = _leaves(to_storable(a.state)), _leaves(to_storable(b.state))
    assert set(la) == set(lb)
    for path, x in la.items():
        np.testing.assert_array_equal(x, lb[path], err_msg=str(path))


def test_grown_run_exports_its_new_module(grown, tmp_path):
    """iclm-export of the grown run: specific_0..2 and the invariant at its new slot; the merged new module
    gives the JAX model's logits of that slot (the exporter's tolerance)."""
    import torch
    from transformers import AutoModelForCausalLM

    from iclm_jax import export as export_cli
    from iclm_jax.hf import export as ex
    out = str(tmp_path / "out")
    assert export_cli.main(["--workdir", grown, "--out", out]) == 0
    run = load_run(grown)
    model = nnx.merge(run.graphdef, run.state).model
    assert ex.module_names(model.cfg) == {"specific_0": 0, "specific_1": 1, "specific_2": 2, "invariant": 3}
    inputs = np.random.default_rng(0).integers(1, run.data.tokenizer.vocab_size, size=(2, 10)).astype(np.int32)
    batch = dict(inputs=inputs, positions=np.tile(np.arange(10, dtype=np.int32), (2, 1)),
                 segments=np.ones_like(inputs), prompt_mask=np.ones(inputs.shape, np.float32))
    for name in ("specific_2", "invariant"):
        hf = AutoModelForCausalLM.from_pretrained(os.path.join(out, "modules", name)).eval()
        with torch.no_grad():
            theirs = hf(input_ids=torch.from_numpy(inputs).long()).logits.float().numpy()
        np.testing.assert_allclose(theirs, np.asarray(model.module_logits(batch, ex.module_names(model.cfg)[name])),
                                   atol=1e-4, rtol=0, err_msg=name)


def test_finetune_keeps_the_shape_and_the_base_and_trains_the_adapters(old_run, finetuned):
    old, new = _leaves(_model(old_run)), _leaves(_model(finetuned))
    assert {p: x.shape for p, x in old.items()} == {p: x.shape for p, x in new.items()}
    lora = [p for p in new if p[-1] == "lora_b"]
    assert all(np.abs(new[p] - old[p]).max() > 0 for p in lora)      # every adapter stack trained
    for path, x in new.items():
        if path[0] == "base" and path[-1] not in ("lora_a", "lora_b"):
            np.testing.assert_array_equal(x, old[path], err_msg=str(path))
    assert json.load(open(os.path.join(finetuned, "config.json")))["model"]["num_modules"] == K_OLD


def test_report_numbers_are_the_runs_own_evaluations(old_run, grown, finetuned, tmp_path):
    """``python -m iclm_jax.continual_report``, in a process of its own (a long-lived test process that has
    trained and loaded runs and torch can abort inside XLA, as in test_faults' SIGTERM test): on the runs'
    own IID test problems (the report's default split and seed) its accuracy of before on symbolic and of each
    run on text is the run's own final evaluation (summary.json); the grown run's routing counts put every
    text row on the new module."""
    out = str(tmp_path / "report")
    r = subprocess.run([sys.executable, "-m", "iclm_jax.continual_report", grown, finetuned, "--out", out,
                        "--problems", str(PROBLEMS)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "old rows routed as before" in r.stdout
    res = json.load(open(os.path.join(out, "continual.json")))
    before, grow, fine = res["runs"]
    assert (res["old_domains"], res["new_domains"]) == (["symbolic"], ["text"])
    summary = lambda w: json.load(open(os.path.join(w, "summary.json")))["eval"]["IID"]   # noqa: E731
    assert before["accuracy"]["symbolic"] == summary(old_run)["domain_symbolic"]
    assert grow["accuracy"]["text"] == summary(grown)["domain_text"]
    assert fine["accuracy"]["text"] == summary(finetuned)["domain_text"]
    assert grow["accuracy"]["symbolic"] == before["accuracy"]["symbolic"] and grow["old_rows_kept"] == 1.0
    assert [row[1] for row in grow["routing"]] == [0, 0, summary(grown)[f"module_{K_OLD}_rows"]]
    assert grow["new_rows_to_new_module"] == 1.0
    refs = json.load(open(os.path.join(old_run, "summary.json")))["reference"]["IID"]   # the same problems
    assert res["references"] == {k: refs[k]["all"] for k in ("majority", "object_count")}
    assert "*object_count predictor*" in r.stdout
    text = open(os.path.join(out, "report.md")).read()
    assert "forgetting" in text and "continual.png" in text and os.path.getsize(os.path.join(out, "continual.png"))


def test_refusals_name_the_field(old_run, tmp_path):
    c = _tiny_config("text", 2)
    c.continual.from_run = old_run
    c.model.d_model = 32
    with pytest.raises(ConfigError, match=r"model\.d_model: the run has 16, this config has 32"):
        continual.prepare(c)
    c = _tiny_config("text", 2)
    c.continual.mode = "grow2"
    with pytest.raises(ConfigError, match=r"continual\.mode='grow2'"):
        validate(c)
    c.continual.mode, c.continual.from_run = "grow", str(tmp_path)
    with pytest.raises(ConfigError, match=r"continual\.from_run="):
        validate(c)
    c.continual.from_run, c.init_from = old_run, old_run
    with pytest.raises(ConfigError, match=r"init_from=.*with continual\.from_run"):
        validate(c)
    single = tmp_path / "single"                      # a run with one module and no router cannot grow
    (single / "checkpoints").mkdir(parents=True)
    stored = json.load(open(os.path.join(old_run, "config.json")))
    stored["model"]["num_modules"] = 1
    (single / "config.json").write_text(json.dumps(stored))
    c = _tiny_config("text", 2)
    c.continual.from_run = str(single)
    with pytest.raises(ConfigError, match="continual.mode=finetune"):
        continual.prepare(c)
    c.continual.mode = "finetune"
    prepared, notes = continual.prepare(c)
    assert prepared.model.num_modules == 1 and c.model.num_modules == K_OLD and notes


def test_oracle_grow_needs_the_new_domain_on_the_new_module():
    run = SimpleNamespace(model_cfg=SimpleNamespace(router=SimpleNamespace(mode="oracle")),
                          data=SimpleNamespace(train_sample=[SimpleNamespace(domain=1)]))
    continual._check_oracle_domains(run, SimpleNamespace(data=SimpleNamespace(styles="text")), 1)   # 1 mod 2 = 1
    with pytest.raises(ConfigError, match="must have domain 2"):
        continual._check_oracle_domains(run, SimpleNamespace(data=SimpleNamespace(styles="text")), 2)


def test_off_by_default_and_older_configs_resume():
    """No continual.from_run: the config is returned as it is and nothing is frozen; a stored config without
    the continual group (older runs) resumes under today's."""
    c = acre_cfg.get_config()
    assert continual.prepare(c) == (c, [])
    assert continual.trainable(None, c) is None
    stored = json.loads(c.to_json_best_effort())
    del stored["continual"]
    assert resume.mismatch(stored, json.loads(c.to_json_best_effort())) == []


def test_report_refuses_a_run_that_is_not_continual(old_run, capsys):
    assert continual_report.main([old_run, "--out", os.path.join(old_run, "r")]) == 2
    assert "not a continual run" in capsys.readouterr().err


@pytest.mark.parametrize("scan_layers", [False, True])
def test_trainable_finds_the_module_axis_by_name(scan_layers):
    """The grow mask of a K = 3 model: LoRA stacks trainable at the new slot 2 (and the invariant's, slot 3,
    with train_invariant), never at the router adapter's (4), along the ``module`` axis wherever it is (the
    second axis of stacked blocks); a gradient codebook at code 2 only; every other parameter frozen."""
    from iclm_jax.train import build
    c = _tiny_config("text", 2)
    c.model.num_modules, c.model.scan_layers = 3, scan_layers
    c.router.source, c.router.update = "adapter", "gradient"
    c.continual.from_run, c.continual.train_invariant = "runs/x", True
    model = nnx.eval_shape(lambda: build.train_state(c, 50)).model
    mask = continual.trainable(model, c)
    assert model.router.frozen_codes == 2
    lora = [p for p in mask if p[-1] in ("lora_a", "lora_b")]
    assert lora and all(np.array_equal(mask[p].reshape(-1), [False, False, True, True, False]) for p in lora)
    assert all(mask[p].shape[int(scan_layers)] == 5 and mask[p].ndim == (4 if scan_layers else 3) for p in lora)
    assert mask[("router", "codebook")].reshape(-1).tolist() == [False, False, True]
    others = [p for p in mask if p not in lora and p != ("router", "codebook")]
    assert others and all(not mask[p].any() for p in others)
    c.continual.mode = "finetune"
    assert continual.trainable(model, c) is None
