"""Config files load, every variant validates, and bad values are refused naming the field."""
import dataclasses
from types import SimpleNamespace

import jax.numpy as jnp
import optax
import pytest

from iclm_jax.config_check import ConfigError, validate, validate_loaded
from iclm_jax.data.sources import DataConfig
from iclm_jax.losses import LossConfig
from iclm_jax.model.mi import MIConfig
from iclm_jax.model.router import RouterConfig
from iclm_jax.model.transformer import TransformerConfig
from iclm_jax.train import build
from iclm_jax.train.build import CheckpointConfig, EvalConfig, LoopConfig
from iclm_jax.train.optim import OptimConfig, make_optimizer
from tests.test_step import acre_cfg


@pytest.mark.parametrize("arg", ["demo", "iclm", "no_mi", "baseline", "no_invariant", "plugin", "oracle", "paper",
                                 "baseline,text", "symbolic", "cpu", "cpu,baseline,symbolic", "cpu,short",
                                 "cpu,baseline,symbolic,short"])
def test_variants_validate(arg):
    validate(acre_cfg.get_config(arg), num_devices=1)


@pytest.mark.parametrize("arg", ["", "baseline", "cpu", "cpu,baseline,symbolic"])
def test_smollm2_variants_validate(arg):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parent.parent / "experiments" / "configs" / "smollm2.py"
    spec = importlib.util.spec_from_file_location("smollm2_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    validate(c, num_devices=1)
    assert c.model.canon == 0 and c.model.init == "smollm2"


BAD = [
    ("model.num_modules", 0), ("lora.rank", 0), ("lora.rank", 10_000), ("router.source", "oracle"),
    ("router.mode", "top2"), ("router.update", "sgd"), ("model.aggregator", "sum"),
    ("mi.estimator", "infonce"), ("mi.weight", -1.0), ("router.weight", -0.5), ("loss.aux_weight", -1.0),
    ("model.n_kv_heads", 3), ("train.warmup_steps", -1), ("train.batch_size", 0), ("train.lr", 0.0),
    ("data.styles", "image"), ("data.eval_splits", "OOD"), ("data.tokenizer", "/nonexistent/tok"),
    ("model.dtype", "int8"), ("lora.targets", "q,ffn"), ("lora.dropout", 1.0), ("train.grad_accum", 0),
    ("model.invariant_weight", 2.0), ("router.ema_decay", 1.0), ("train.nonfinite", "ignore"),
    ("checkpoint.best_metric", "OOD/all"), ("checkpoint.keep", 0), ("data.train_split", "Val"),
    ("data.max_len", -1), ("data.train_file", "/nonexistent.json"), ("model.rope_theta", 0.0),
    ("mi.apply_to", "some"), ("mi.pool", "tokens"), ("mi.reduce", "max"), ("mi.critic_lr", 0.0),
    ("router.temperature", 0.0), ("train.adam_eps", 0.0),
    ("rules.embed", "fsdp,model"), ("mesh.slices", 0), ("model.canon", -1),
    # numeric ranges (the harden issue's accepted-and-run cases)
    ("train.final_lr_fraction", -5.0), ("train.b1", 2.0), ("train.b2", -1.0), ("eval.every", -1),
    ("train.time_limit_s", -1.0), ("mi.clip", -1.0), ("mi.critic_hidden", 0), ("mi.critic_depth", 0),
    ("data.num_domains", 0), ("router.dead_threshold", 5.0), ("lora.alpha", 1e30), ("mi.weight", 1e30),
    ("data.eval_problems", -5), ("train.lr", float("inf")), ("train.weight_decay", 2.0), ("model.norm_eps", 0.0),
    ("loss.context_weight", 1e9), ("router.commitment", -1.0), ("mi.critic_lr", 3.0),
    ("data.max_len", 10_000_000),                    # memory: one layer's attention scores alone need PiB
    ("data.extra_query_kinds", "attributes"),        # ACRE offers one kind of extra query: none to name
    ("data.worked_answer", True),                    # ACRE's answers have no working to write out
]


@pytest.mark.parametrize("field,value", BAD)
def test_bad_value_names_the_field(field, value):
    c = acre_cfg.get_config()
    group, name = field.split(".")
    c[group][name] = value
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(c, num_devices=1)


def test_mesh_and_batch_divisibility():
    c = acre_cfg.get_config()
    c.mesh = {"data": 3}
    with pytest.raises(ConfigError, match="mesh"):
        validate(c, num_devices=8)
    c.mesh = {"data": -1}
    c.train.batch_size = 12
    with pytest.raises(ConfigError, match="train.batch_size"):
        validate(c, num_devices=8)
    c.mesh = {"dat": 8}
    with pytest.raises(ConfigError, match="mesh"):
        validate(c, num_devices=8)


def test_slices_and_module_axis():
    c = acre_cfg.get_config()
    c.mesh.update(data=2, fsdp=2, slices=2)           # 2 slices of data 2 x fsdp 2: batch split 8 ways
    validate(c, num_devices=8)
    with pytest.raises(ConfigError, match=r"mesh=.*devices per slice 8"):
        validate(c, num_devices=16)
    c.train.batch_size = 12
    with pytest.raises(ConfigError, match=r"train.batch_size=12.*batch split \(rules.batch\) 8"):
        validate(c, num_devices=8)
    c = acre_cfg.get_config()                          # K 2 + invariant = 3 adapters: not over module=2
    c.mesh.update(data=4, module=2)
    with pytest.raises(ConfigError, match=r"mesh.module=2.*adapter stack \(3 = model.num_modules 2"):
        validate(c, num_devices=8)
    c.model.num_modules = 3
    validate(c, num_devices=8)


def test_all_errors_reported_together():
    c = acre_cfg.get_config()
    c.model.num_modules = 0
    c.train.lr = -1.0
    with pytest.raises(ConfigError) as e:
        validate(c, num_devices=1)
    assert "model.num_modules" in str(e.value) and "train.lr" in str(e.value)


def test_a_pretrained_base_refuses_a_canon_layer():
    c = acre_cfg.get_config("cpu")
    c.model.init = "smollm2"
    with pytest.raises(ConfigError, match=r"model\.canon=4: expected 0 with model\.init='smollm2'"):
        validate(c, num_devices=1)


def test_init_from_must_be_a_run_directory(tmp_path):
    c = acre_cfg.get_config()
    c.init_from = str(tmp_path)
    with pytest.raises(ConfigError, match="init_from"):
        validate(c, num_devices=1)


def test_warmup_longer_than_the_run_is_scaled_to_a_tenth_of_it():
    """--config.train.steps=20 alone must run: the config's warmup (25) becomes 20 // 10 = 2 steps."""
    config = acre_cfg.get_config()
    config.train.steps = 20
    validate(config, num_devices=1)
    # With a constant gradient, Adam's bias-corrected step is exactly lr_t per element (eps aside), so
    # the parameter moves by the schedule's value: 0 at step 0, lr/2 at step 1, lr from step 2 on.
    params = {"w": jnp.zeros((2,))}
    tx = make_optimizer(OptimConfig(lr=1.0, steps=20, warmup_steps=25, grad_clip=0.0, weight_decay=0.0,
                                  adam_eps=1e-12))
    state, moves = tx.init(params), []
    for _ in range(3):
        updates, state = tx.update({"w": jnp.ones((2,))}, state, params)
        new = optax.apply_updates(params, updates)
        moves.append(float(params["w"][0] - new["w"][0]))
        params = new
    assert moves == pytest.approx([0.0, 0.5, 1.0], abs=1e-6)


def test_typed_groups_match_the_config_and_fill_what_older_configs_lack():
    """build.typed reads each dataclass's fields from its group (other consumers' fields ignored) and
    keeps the defaults for fields a stored config predates."""
    config = acre_cfg.get_config("paper")
    r, mi, opt = build.router_config(config), build.mi_config(config), build.optim_config(config)
    for typed_cfg, group in ((r, config.router), (mi, config.mi), (opt, config.train)):
        for f in dataclasses.fields(typed_cfg):
            if f.name in group:
                assert getattr(typed_cfg, f.name) == group[f.name], f.name
    assert r.update == "gradient" and mi.apply_to == "all"          # the paper variant's choices
    assert mi.pool == "answer" and mi.reduce == "sum" and build.model_config(config, 50).mi_pool == "answer"
    loss = build.loss_config(config)
    assert loss.mi == mi and loss.routing_weight == config.router.weight
    assert build.model_config(config, 50).router == r
    old = acre_cfg.get_config()                                     # a run stored before these fields
    for group, name in ((old.router, "center"), (old.mi, "clip"), (old.train, "adam_eps"),
                        (old.model, "scan_layers"), (old.model, "attention"), (old.loss, "logit_chunk")):
        del group[name]
    assert build.router_config(old).center is RouterConfig.center is False
    assert build.mi_config(old).clip == MIConfig.clip
    assert build.optim_config(old).adam_eps == 1e-8
    assert build.model_config(old, 50).base.scan_layers is False
    assert build.model_config(old, 50).base.attention == "materialised"
    assert build.loss_config(old).logit_chunk == 64


@pytest.mark.parametrize("arg", ["demo", "cpu"])
def test_every_typed_field_is_in_its_config_group(arg):
    """A dataclass field missing from its group would silently take its default: every field of every
    typed group is set by the config file (and every train field is read by one of its two readers)."""
    config = acre_cfg.get_config(arg)
    pairs = [(RouterConfig, "router"), (MIConfig, "mi"), (OptimConfig, "train"), (LoopConfig, "train"),
             (EvalConfig, "eval"), (CheckpointConfig, "checkpoint"), (DataConfig, "data"),
             (LossConfig, "loss"), (TransformerConfig, "model")]
    for cls, group in pairs:
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in config[group]]
        allowed = {LossConfig: {"routing_weight", "mi"}, TransformerConfig: set(),
                   RouterConfig: {"eps"}}.get(cls, set())
        assert set(missing) <= allowed, (cls.__name__, missing)
    train_fields = {f.name for c in (OptimConfig, LoopConfig) for f in dataclasses.fields(c)}
    assert set(config.train) == train_fields
    assert set(config.data) == {f.name for f in dataclasses.fields(DataConfig)}


def test_validate_loaded_refuses_oracle_routing_without_domain_labels():
    config = acre_cfg.get_config("oracle")
    labeled, unlabeled = SimpleNamespace(domain=1, source=""), SimpleNamespace(domain=-1, source="")
    validate_loaded(config, SimpleNamespace(max_len=64, train_sample=[labeled, labeled], eval_sets=[]))
    with pytest.raises(ConfigError, match="2 training examples have none"):
        validate_loaded(config, SimpleNamespace(max_len=64, train_sample=[unlabeled, labeled, unlabeled], eval_sets=[]))
    hard = acre_cfg.get_config()                                         # hard routing: fine
    validate_loaded(hard, SimpleNamespace(max_len=64, train_sample=[unlabeled], eval_sets=[]))


def test_a_step_that_cannot_fit_in_memory_is_refused_with_the_estimate():
    """train.batch_size=1e9 used to die in a MemoryError inside process_rows; max_len=1e7 to hang."""
    from iclm_jax.config_check import memory_floor
    assert memory_floor(2, 10, 3) == 2 * 10 * 72 + 2 * 3 * 100 * 4
    config = acre_cfg.get_config()
    config.train.batch_size = 1_000_000_000
    with pytest.raises(ConfigError, match=r"train.batch_size=1000000000 x data.max_len=160: a step needs at least "
                                          r"[0-9.]+ GiB per device .* GiB available"):
        validate_loaded(config, SimpleNamespace(max_len=160, train_sample=[], eval_sets=[]))
    validate_loaded(acre_cfg.get_config(), SimpleNamespace(max_len=160, train_sample=[], eval_sets=[]))


def test_validate_loaded_refuses_a_domain_beyond_num_domains():
    """A JSONL record with "domain": 7 would be routed to module 7 mod K by oracle routing."""
    config = acre_cfg.get_config()
    ok = SimpleNamespace(domain=1, source="")
    seven = SimpleNamespace(domain=7, source="data.jsonl:3")
    with pytest.raises(ConfigError, match=r"data.jsonl:3: domain 7 is not below data.num_domains=2"):
        validate_loaded(config, SimpleNamespace(max_len=64, train_sample=[ok, seven], eval_sets=[]))
    evals = [SimpleNamespace(name="IID", examples=[seven])]
    with pytest.raises(ConfigError, match="IID examples"):
        validate_loaded(config, SimpleNamespace(max_len=64, train_sample=[ok], eval_sets=evals))
