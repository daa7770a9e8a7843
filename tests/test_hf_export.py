"""Export to Hugging Face formats: merged modules and PEFT adapters match the JAX model's logits."""
import errno
import json
import os
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import iclm_jax  # noqa: F401  (eager sharding off before any construction)
from iclm_jax import export as export_cli
from iclm_jax.data import acre_generate, render
from iclm_jax.data.pipeline import tokenize_example
from iclm_jax.data.tokenizer import Tokenizer, acre_word_tokenizer
from iclm_jax.hf import export as ex
from iclm_jax.hf import load_hf_weights
from iclm_jax.hf.weights import base_params
from iclm_jax.model.lora import LoRAParam
from tests.helpers import tiny_iclm

TOL = 1e-4


def _trained_ish(model, seed=0):
    """Random nonzero LoRA B (fresh adapters are B=0, identical to the base) and norm weights."""
    rng = np.random.default_rng(seed)
    for path, v in nnx.iter_graph(model):
        if isinstance(v, LoRAParam) and path[-1] == "lora_b":
            v[...] = jnp.asarray(rng.normal(size=v.shape) * 0.1, jnp.float32)
        elif isinstance(v, nnx.Param) and path[-1] == "weight":      # RMSNorm weights
            v[...] = jnp.asarray(1 + 0.3 * rng.normal(size=v.shape), jnp.float32)
    return model


def _batch(vocab, b=2, length=10, seed=0):
    inputs = np.random.default_rng(seed).integers(1, vocab, size=(b, length)).astype(np.int32)
    return dict(inputs=inputs, positions=np.tile(np.arange(length, dtype=np.int32), (b, 1)),
                segments=np.ones_like(inputs), prompt_mask=np.ones(inputs.shape, np.float32))


def _torch_logits(hf, batch) -> np.ndarray:
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(batch["inputs"]).long()).logits.float().numpy()


@pytest.fixture(scope="module")
def tok():
    return acre_word_tokenizer()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok):
    """K=2 specific + invariant + router adapter, untied, a rank-4 LoRA on every projection."""
    model = _trained_ish(tiny_iclm(num_modules=2, router_source="adapter", lora_rank=4,
                                   lora_alpha=8.0, base_kw=dict(vocab_size=tok.vocab_size)))
    out = str(tmp_path_factory.mktemp("export") / "out")
    ex.export_model(model, tok, out)
    return model, out


def test_layout(exported):
    model, out = exported
    names = ["invariant", "router", "specific_0", "specific_1"]
    assert sorted(os.listdir(os.path.join(out, "modules"))) == names
    assert sorted(os.listdir(os.path.join(out, "adapters"))) == names
    assert ex.module_names(model.cfg) == {"specific_0": 0, "specific_1": 1, "invariant": 2,
                                          "router": 3}
    with open(os.path.join(out, "adapters", "invariant", "adapter_config.json")) as f:
        acfg = json.load(f)
    assert acfg["base_model_name_or_path"] == "../../base"    # test_moved_export_loads_its_own_base
    assert (acfg["r"], acfg["lora_alpha"]) == (4, 8.0)
    assert acfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"]
    assert not [f for f in os.listdir(os.path.dirname(out)) if f.startswith(".")]  # no temp left


def test_merged_modules_match_module_logits(exported, tok):
    """(1) each modules/<name> loads with no custom code and gives that module's JAX logits."""
    model, out = exported
    batch = _batch(tok.vocab_size)
    for name, slot in ex.module_names(model.cfg).items():
        hf = AutoModelForCausalLM.from_pretrained(os.path.join(out, "modules", name)).eval()
        ours = np.asarray(model.module_logits(batch, slot))
        np.testing.assert_allclose(_torch_logits(hf, batch), ours, atol=TOL, rtol=0, err_msg=name)
    # modules really differ (a wrong slot or unmerged LoRA would not be caught otherwise)
    a, b = (np.asarray(model.module_logits(batch, s)) for s in (0, 1))
    assert np.abs(a - b).max() > 100 * TOL


def test_peft_adapters_match_module_logits(exported, tok):
    """(2) base + PEFT adapter gives the same logits as the JAX module alone."""
    model, out = exported
    batch = _batch(tok.vocab_size, seed=1)
    for name, slot in ex.module_names(model.cfg).items():
        base = AutoModelForCausalLM.from_pretrained(os.path.join(out, "base"))
        hf = PeftModel.from_pretrained(base, os.path.join(out, "adapters", name)).eval()
        ours = np.asarray(model.module_logits(batch, slot))
        np.testing.assert_allclose(_torch_logits(hf, batch), ours, atol=TOL, rtol=0, err_msg=name)


def test_moved_export_loads_its_own_base(exported, tok, tmp_path, monkeypatch):
    """An export moved elsewhere (the original gone) loads its adapters on its own base."""
    model, _ = exported
    orig = ex.export_model(model, tok, str(tmp_path / "orig"), custom=False)
    moved = tmp_path / "elsewhere" / "export"
    moved.parent.mkdir()
    os.rename(orig, moved)
    assert not os.path.exists(orig)
    batch = _batch(tok.vocab_size, seed=3)
    name, slot = "specific_1", 1
    adir = moved / "adapters" / name
    ours = np.asarray(model.module_logits(batch, slot))
    # the documented way, from any directory: load the base, then the adapter onto it
    base = AutoModelForCausalLM.from_pretrained(str(moved / "base"))
    hf = PeftModel.from_pretrained(base, str(adir)).eval()
    np.testing.assert_allclose(_torch_logits(hf, batch), ours, atol=TOL, rtol=0)
    # AutoPeftModel reads base_model_name_or_path itself, against the current directory: it finds
    # the moved base when started inside the adapter directory
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")            # peft would ask the Hub for a tokenizer
    monkeypatch.chdir(adir)
    hf = AutoPeftModelForCausalLM.from_pretrained(str(adir)).eval()
    np.testing.assert_allclose(_torch_logits(hf, batch), ours, atol=TOL, rtol=0)


def _training_prompt_ids(tok) -> tuple[str, list[int]]:
    """A rendered ACRE prompt and the input ids the pipeline trains on for it ([bos] prompt)."""
    example = render.render_problem(acre_generate.generate_problems("IID", "train", 1, seed=4)[0], "text",
                                    packed=False)[0]
    row = tokenize_example(example, tok, 512, 1)
    return example.prompt, row["inputs"][:int(row["prompt_mask"].sum())].tolist()


def test_autotokenizer_gives_the_training_ids(exported, tok):
    """AutoTokenizer(prompt) == the pipeline's ids (BOS first) in every exported directory, all of
    which hold the same tokenizer files."""
    _, out = exported
    prompt, train_ids = _training_prompt_ids(tok)
    assert train_ids[0] == tok.bos_id and len(train_ids) > 20
    dirs = [out, os.path.join(out, "base"), os.path.join(out, "modules", "invariant")]
    for d in dirs:
        hf_tok = AutoTokenizer.from_pretrained(d)
        assert hf_tok(prompt)["input_ids"] == train_ids, d
        assert hf_tok(prompt, add_special_tokens=False)["input_ids"] == train_ids[1:], d
        assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == \
            (tok.bos_id, tok.eos_id, tok.pad_id), d
        assert hf_tok.unk_token == "<unk>", d
    for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        texts = {open(os.path.join(d, name)).read() for d in dirs}
        assert len(texts) == 1, name


def test_tokenizer_without_bos_adds_nothing(tmp_path, tok):
    """A tokenizer with no BOS (SmolLM2's): training rows start with the prompt, and so does
    AutoTokenizer's encoding."""
    no_bos = Tokenizer(tok.tk, pad_id=tok.pad_id, eos_id=tok.eos_id, bos_id=None)
    ex.save_tokenizer(no_bos, str(tmp_path))
    prompt, train_ids = _training_prompt_ids(no_bos)
    assert train_ids == tok.encode(prompt)
    assert AutoTokenizer.from_pretrained(str(tmp_path))(prompt)["input_ids"] == train_ids


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_base_is_bit_exact(tmp_path, tok, tie):
    """import(export(x)) == x exactly; tied and untied; tiny shard limit forces an index."""
    model = _trained_ish(tiny_iclm(num_modules=2, base_kw=dict(vocab_size=tok.vocab_size,
                                                               tie_embeddings=tie)))
    out = ex.export_model(model, tok, str(tmp_path / "out"), shard_bytes=4096, custom=False)
    base_dir = os.path.join(out, "base")
    assert os.path.isfile(os.path.join(base_dir, "model.safetensors.index.json"))
    cfg, weights = load_hf_weights(base_dir)
    assert cfg == model.base.cfg
    ours = {k: np.asarray(v.get_value()) for k, v in base_params(model.base).items()}
    assert sorted(weights) == sorted(ours)
    for k in ours:
        assert weights[k].dtype == np.float32 and np.array_equal(weights[k], ours[k]), k
    if tie:   # a tied, sharded module dir also loads and matches
        hf = AutoModelForCausalLM.from_pretrained(os.path.join(out, "modules", "invariant"))
        batch = _batch(tok.vocab_size)
        np.testing.assert_allclose(_torch_logits(hf.eval(), batch),
                                   np.asarray(model.module_logits(batch, 2)), atol=TOL, rtol=0)


def test_refuses_non_empty_out_without_force(tmp_path, tok):
    model = tiny_iclm(num_modules=1, invariant=False, router_source="base",
                      base_kw=dict(vocab_size=tok.vocab_size))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ex.OutputError, match="--force"):
        ex.export_model(model, tok, str(out), custom=False)
    assert os.listdir(out) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    ex.export_model(model, tok, str(out), force=True, custom=False)
    assert sorted(os.listdir(out)) == ["adapters", "base", "modules"]
    assert sorted(os.listdir(out / "modules")) == ["specific_0"]
    assert sorted(os.listdir(tmp_path)) == ["out"]            # no temp or old dir left behind


def test_canon_layer_is_refused_by_name_and_nothing_written(tmp_path, tok):
    model = tiny_iclm(num_modules=1, invariant=False, router_source="base",
                      base_kw=dict(vocab_size=tok.vocab_size, canon=4))
    with pytest.raises(ex.NotExportable, match=r"model\.canon=4: .*no transformers Llama counterpart"):
        ex.export_model(model, tok, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_error_leaves_no_partial_out(tmp_path, tok, monkeypatch):
    """A failure mid-export leaves neither DIR nor the temporary directory (and keeps an old DIR)."""
    model = tiny_iclm(num_modules=2, base_kw=dict(vocab_size=tok.vocab_size))
    real = ex.save_llama
    calls = []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*a, **kw)

    monkeypatch.setattr(ex, "save_llama", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        ex.export_model(model, tok, str(tmp_path / "out"), custom=False)
    assert os.listdir(tmp_path) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "f").write_text("x")
    calls.clear()
    with pytest.raises(RuntimeError, match="disk full"):
        ex.export_model(model, tok, str(tmp_path / "old"), force=True, custom=False)
    assert sorted(os.listdir(tmp_path)) == ["old"]
    assert os.listdir(tmp_path / "old") == ["f"]


def test_cli_refuses_missing_workdir(tmp_path, capsys):
    assert export_cli.main(["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_exports_a_trained_run(tmp_path):
    """``main`` on a real (3-step) run: the merged invariant module matches the restored model."""
    from iclm_jax.train.loop import train
    from iclm_jax.train.run import load_run
    from tests.test_step import acre_cfg
    c = acre_cfg.get_config()
    c.model.update(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32)
    c.lora.rank = 2
    c.mi.critic_hidden = 16
    c.train.update(steps=3, warmup_steps=1, batch_size=8, log_every=1)
    c.eval.batch_size = 8
    c.data.update(train_problems=8, eval_problems=2, eval_splits="IID")
    work, out = str(tmp_path / "run"), str(tmp_path / "out")
    train(c, work, quiet=True)
    assert export_cli.main(["--workdir", work, "--out", out]) == 0
    assert export_cli.main(["--workdir", work, "--out", out]) == 2          # non-empty, no --force
    assert export_cli.main(["--workdir", work, "--out", out, "--force"]) == 0
    run = load_run(work)
    model = nnx.merge(run.graphdef, run.state).model
    batch = _batch(run.data.tokenizer.vocab_size, seed=2)
    for name, slot in ex.module_names(model.cfg).items():
        hf = AutoModelForCausalLM.from_pretrained(os.path.join(out, "modules", name)).eval()
        np.testing.assert_allclose(_torch_logits(hf, batch), np.asarray(model.module_logits(batch, slot)),
                                   atol=TOL, rtol=0, err_msg=name)


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A directory that refuses new entries: mode 555, plus the immutable attribute for root (whom
    modes do not bind). Where neither holds (root without CAP_LINUX_IMMUTABLE), creating an entry in
    it fails as the kernel would refuse it (EACCES from the export's probe, ``tempfile.mkdtemp``)."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    immutable = os.geteuid() == 0 and shutil.which("chattr") is not None and subprocess.run(
        ["chattr", "+i", str(d)], capture_output=True).returncode == 0
    try:
        (d / "probe").mkdir()
    except OSError:
        pass
    else:
        (d / "probe").rmdir()
        real = ex.tempfile.mkdtemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and os.path.samefile(dir, d):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(d))
            return real(*args, dir=dir, **kwargs)
        monkeypatch.setattr(ex.tempfile, "mkdtemp", refuse)
    try:
        yield d
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(d)], check=True)
        d.chmod(0o755)


@pytest.mark.parametrize("problem", ["parent_is_file", "out_is_file", "non_empty", "unwritable"])
def test_cli_checks_out_before_loading(problem, tmp_path, capsys, monkeypatch, request):
    """Each --out problem: exit 2 and one line naming the path, before the checkpoint is loaded."""
    monkeypatch.setattr(export_cli, "_load_run", lambda workdir: pytest.fail("checkpoint loaded first"))
    out = tmp_path / "out"
    if problem == "parent_is_file":
        (tmp_path / "f").write_text("x")
        out, words = tmp_path / "f" / "sub" / "out", [f"{tmp_path / 'f'} is a file"]
    elif problem == "out_is_file":
        out.write_text("x")
        words = ["exists and is not a directory"]
    elif problem == "non_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        words = ["not empty", "--force"]
    else:
        ro = request.getfixturevalue("read_only_dir")
        out, words = ro / "out", [f"cannot create a directory in {ro}"]
    assert export_cli.main(["--workdir", str(tmp_path / "run"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"iclm-export: --out {out}: "), err
    assert all(w in err for w in words), err


@pytest.mark.parametrize("where", ["same", "inside", "above", "dotdot", "other_run", "holds_other_run"])
@pytest.mark.parametrize("force", [False, True])
def test_cli_never_replaces_a_run(where, force, tmp_path, capsys, monkeypatch):
    """--out equal to, inside or above the workdir, or holding any run: exit 2, nothing touched."""
    monkeypatch.setattr(export_cli, "_load_run", lambda workdir: pytest.fail("checkpoint loaded first"))
    runs = tmp_path / "runs"
    work, other = runs / "e2", runs / "e3"
    for r in (work, other):
        (r / "checkpoints" / "10").mkdir(parents=True)
        (r / "config.json").write_text("{}")
    (tmp_path / "unrelated.txt").write_text("keep me")
    out = {"same": work, "inside": work / "export", "above": runs, "dotdot": other / "run" / "..",
           "other_run": other, "holds_other_run": tmp_path}[where]
    argv = ["--workdir", str(work), "--out", str(out)] + (["--force"] if force else [])
    assert export_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("iclm-export: --out ") and "never replaces a run" in err, err
    for r in (work, other):
        assert (r / "checkpoints" / "10").is_dir() and (r / "config.json").read_text() == "{}"
    assert (tmp_path / "unrelated.txt").read_text() == "keep me"


@pytest.mark.parametrize("where", ["safetensors", "json"])
def test_cli_disk_full_is_one_line(where, tmp_path, capsys, monkeypatch, tok):
    """A full disk while writing (simulated ENOSPC): exit 2, one line, nothing left behind."""
    import safetensors.numpy
    from safetensors import SafetensorError
    model = tiny_iclm(num_modules=2, base_kw=dict(vocab_size=tok.vocab_size))
    monkeypatch.setattr(export_cli, "_load_run", lambda workdir: (model, tok, 16))
    if where == "safetensors":      # what safetensors raises on a full disk: not an OSError
        def full(tensors, path, metadata=None):
            raise SafetensorError(f"Error while serializing: I/O error: No space left on device "
                                  f"(os error 28) at path \"{path}.tmp\"")
        monkeypatch.setattr(safetensors.numpy, "save_file", full)
        file = "base/model.safetensors"
    else:
        def full(path, obj):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        monkeypatch.setattr(ex, "write_json", full)
        file = "base/config.json"
    out = tmp_path / "out"
    assert export_cli.main(["--workdir", str(tmp_path / "run"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"iclm-export: --out {out}: cannot write {file} (No space left on device); "
                   f"nothing was written\n")
    assert os.listdir(tmp_path) == []                 # no DIR, no temporary directory


def test_safetensors_io_error_is_an_oserror(tmp_path):
    """A real I/O error of safetensors (a missing directory) is an OSError naming the file."""
    path = str(tmp_path / "missing" / "model.safetensors")
    with pytest.raises(FileNotFoundError) as e:
        ex.save_weights({"w": np.zeros(3, np.float32)}, str(tmp_path / "missing"))
    assert e.value.filename == path and e.value.errno == errno.ENOENT
