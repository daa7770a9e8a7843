"""Import of pretrained Llama weights: logit parity with transformers (HF dirs and GGUF)."""
import dataclasses
import importlib.util
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import iclm_jax  # noqa: F401  (eager sharding off before any construction)
from iclm_jax import sharding
from iclm_jax.hf import (
    WeightMismatchError,
    config_from_hf,
    load_gguf,
    load_hf_weights,
    load_into,
    load_pretrained,
    read_safetensors,
    resolve,
    smollm2_gguf_path,
)
from iclm_jax.hf.import_gguf import unpermute
from iclm_jax.hf.import_hf import hf_to_ours
from iclm_jax.model.iclm import ICLM, ICLMConfig
from iclm_jax.model.lora import LoRAParam
from iclm_jax.model.transformer import Transformer

VOCAB, D, LAYERS, HEADS, MLP = 64, 32, 2, 4, 48
REPO = pathlib.Path(__file__).resolve().parent.parent
# vocab, width, layers, heads, kv heads, head_dim, mlp width, rope theta
SMOLLM2_SIZES = (49152, 576, 30, 9, 3, 64, 1536, 1e5)


def random_llama(tie: bool, kv_heads: int, theta: float, head_dim: int | None,
                 eps: float = 1e-5) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=eps, tie_word_embeddings=tie, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": theta}, attn_implementation="eager")
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to ones; randomise so the norm weights are checked too
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight")
                    else 0.2 * torch.randn_like(p))
    return hf


@nnx.jit
def logits(model, inputs):
    pos = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    return model.logits(model(inputs, pos, jnp.ones_like(inputs)))


def imported(cfg, weights, lora=None) -> Transformer:
    """Built abstractly (no random init), then filled from ``weights``."""
    model = nnx.eval_shape(lambda: Transformer(cfg, lora, rngs=nnx.Rngs(0)))
    load_into(model, weights)
    return model


def torch_array(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy()


def lora_values(state) -> dict:
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.filter_state(state, LoRAParam))}


def torch_logits(hf, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(ids)).logits.numpy()


# (tie, kv heads, rope theta, head_dim: explicit 16 != hidden/heads = 8, or None = hidden/heads)
CASES = [(False, 2, 10000.0, 16), (True, 2, 500000.0, 16), (True, HEADS, 10000.0, None),
         (False, HEADS, 1234.5, None)]


@pytest.mark.parametrize("tie,kv_heads,theta,head_dim", CASES)
def test_hf_directory_logits_match_transformers(tmp_path, tie, kv_heads, theta, head_dim):
    hf = random_llama(tie, kv_heads, theta, head_dim, eps=1e-6 if tie else 1e-5)
    hf.save_pretrained(tmp_path)
    cfg, weights = load_hf_weights(str(tmp_path))
    assert (cfg.tie_embeddings, cfg.n_kv_heads, cfg.rope_theta) == (tie, kv_heads, theta)
    assert cfg.head_dim == (head_dim or D // HEADS) and cfg.norm_eps == (1e-6 if tie else 1e-5)
    assert ("lm_head" in weights) != tie
    assert all(w.dtype == np.float32 for w in weights.values())
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(2, 11))
    got = np.asarray(logits(imported(cfg, weights), jnp.asarray(ids)))
    np.testing.assert_allclose(got, torch_logits(hf, ids), atol=1e-4, rtol=0)


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
    """Released checkpoints are bfloat16, which safetensors.numpy cannot read: our reader can."""
    hf = random_llama(False, 2, 10000.0, 16).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    hf = hf.to(torch.float32)          # bfloat16 values are exact in float32
    raw = read_safetensors(str(tmp_path / "model.safetensors"))
    assert raw["model.embed_tokens.weight"].dtype.name == "bfloat16"
    _, weights = load_hf_weights(str(tmp_path))
    assert weights["embedding"].dtype == np.float32
    np.testing.assert_array_equal(weights["layers.1.q.kernel"],
                                  torch_array(hf.model.layers[1].self_attn.q_proj.weight).T)
    np.testing.assert_array_equal(weights["embedding"], torch_array(hf.model.embed_tokens.weight))


def test_sharded_checkpoint_loads_identically(tmp_path):
    hf = random_llama(False, 2, 10000.0, 16)
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "many", max_shard_size="20KB")
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "many" / "model.safetensors").exists()
    cfg1, one = load_hf_weights(str(tmp_path / "one"))
    cfg2, many = load_hf_weights(str(tmp_path / "many"))
    assert cfg1 == cfg2 and sorted(one) == sorted(many)
    for name in one:
        np.testing.assert_array_equal(one[name], many[name], err_msg=name)


P = jax.sharding.PartitionSpec


def test_lazy_load_into_a_sharded_iclm_state(tmp_path):
    """As a run does it: an ICLM state created sharded by a jitted init receives memory-mapped
    weights in place, each in the sharding it already has; the LoRA weights stay untouched."""
    hf = random_llama(False, 2, 10000.0, 16)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    cfg, lazy = load_hf_weights(str(tmp_path), lazy=True)
    assert isinstance(lazy["layers.0.q.kernel"].base, np.ndarray)   # a view, not a copy
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    icfg = ICLMConfig(base=cfg, num_modules=2, lora_rank=4)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: ICLM(icfg, rngs=nnx.Rngs(0))))
    state = jax.jit(lambda: nnx.state(ICLM(icfg, rngs=nnx.Rngs(0))),
                    out_shardings=sharding.state_shardings(abstract, mesh))()
    lora_before = lora_values(state)
    load_into(state["base"], lazy)
    q = state["base"]["layers"][0]["q"]["kernel"].get_value()
    assert q.sharding.spec == P("fsdp", "tensor") and q.sharding.mesh == mesh
    assert state["base"]["embedding"].get_value().sharding.spec == P("tensor", "fsdp")
    np.testing.assert_array_equal(
        np.asarray(q), torch_array(hf.model.layers[0].self_attn.q_proj.weight).T)
    lora_after = lora_values(state)
    assert lora_before.keys() == lora_after.keys() and len(lora_after) == 2 * 7 * LAYERS
    for k in lora_before:
        np.testing.assert_array_equal(lora_before[k], lora_after[k])
    model = nnx.merge(graphdef, state)
    ids = np.random.default_rng(2).integers(0, VOCAB, size=(2, 9))
    got = np.asarray(logits(model.base, jnp.asarray(ids)))
    np.testing.assert_allclose(got, torch_logits(hf, ids), atol=1e-4, rtol=0)


def test_explicit_shardings_fill_an_abstract_model(tmp_path):
    hf = random_llama(True, 2, 10000.0, 16)
    hf.save_pretrained(tmp_path)
    cfg, weights = load_hf_weights(str(tmp_path), lazy=True)
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    model = nnx.eval_shape(lambda: Transformer(cfg, None, rngs=nnx.Rngs(0)))
    load_into(model, weights, shardings=sharding.state_shardings(nnx.state(model), mesh))
    down = model.layers[1].down.kernel.get_value()
    assert down.sharding.spec == P("tensor", "fsdp") and len(down.addressable_shards) == 8
    np.testing.assert_array_equal(
        np.asarray(down), torch_array(hf.model.layers[1].mlp.down_proj.weight).T)
    assert model.lm_head is None


# ------------------------------------------------------------------------------ refusals

@pytest.fixture(scope="module")
def tiny():
    """(config, {our name: array}) of a random tiny untied GQA Llama, for the refusal tests."""
    hf = random_llama(False, 2, 10000.0, 16)
    weights = {}
    for name, t in hf.state_dict().items():   # the importer's own mapping is tested above
        ours, transpose = hf_to_ours(name)
        weights[ours] = t.numpy().T if transpose else t.numpy()
    cfg = config_from_hf(hf.config.to_dict())
    return cfg, weights


def assert_refused_and_untouched(cfg, weights, *needles):
    model = Transformer(cfg, None, rngs=nnx.Rngs(0))
    before = np.asarray(model.embedding[...])
    with pytest.raises(WeightMismatchError) as err:
        load_into(model, weights)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    np.testing.assert_array_equal(np.asarray(model.embedding[...]), before)   # nothing written
    return str(err.value)


def test_mismatched_shape_refused_by_name(tiny):
    cfg, weights = tiny
    bad = dict(weights, **{"layers.1.k.kernel": np.zeros((D, 64), np.float32),
                           "embedding": np.zeros((VOCAB + 1, D), np.float32)})
    msg = assert_refused_and_untouched(
        cfg, bad, "mismatched layers.1.k.kernel: expected (32, 32), found (32, 64)",
        f"mismatched embedding: expected ({VOCAB}, {D}), found ({VOCAB + 1}, {D})")
    assert "2 tensors" in msg


def test_missing_tensor_refused_by_name(tiny):
    cfg, weights = tiny
    bad = {k: v for k, v in weights.items() if k not in ("lm_head", "layers.0.mlp_norm.weight")}
    assert_refused_and_untouched(
        cfg, bad, f"missing    lm_head: expected ({D}, {VOCAB}), found nothing",
        f"missing    layers.0.mlp_norm.weight: expected ({D},), found nothing")


def test_unexpected_tensor_refused_by_name(tiny):
    cfg, weights = tiny
    bad = dict(weights, **{"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)})
    assert_refused_and_untouched(
        cfg, bad, "unexpected model.layers.0.self_attn.q_proj.bias: expected nothing, found (64,)")


@pytest.mark.parametrize("overrides,needle", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type='gpt2'"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "model_type='qwen2'"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "'llama3'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_config_from_hf_refuses_what_it_cannot_compute(overrides, needle):
    base = dict(LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=MLP,
                            num_hidden_layers=LAYERS, num_attention_heads=HEADS).to_dict())
    config_from_hf(base)   # the unmodified config is fine
    with pytest.raises(ValueError, match="config.json") as err:
        config_from_hf({**base, **overrides})
    assert needle in str(err.value)


SMOLLM2_CONFIG_JSON = {  # HuggingFaceTB/SmolLM2-135M-Instruct config.json (transformers 4.x fields)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "hidden_act": "silu",
    "hidden_size": 576, "intermediate_size": 1536, "model_type": "llama", "num_attention_heads": 9,
    "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True, "vocab_size": 49152,
    "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}


def test_config_from_hf_reads_legacy_fields():
    cfg = config_from_hf(SMOLLM2_CONFIG_JSON, dtype=jnp.bfloat16)
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
            cfg.mlp_dim, cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings, cfg.dtype) == (
        49152, 576, 30, 9, 3, 64, 1536, 1e5, 1e-5, True, jnp.bfloat16)


def test_pickle_checkpoints_refused(tmp_path):
    random_llama(False, 2, 10000.0, 16).config.to_json_file(tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints"):
        load_hf_weights(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model.init='nowhere'"):
        resolve("nowhere")


# ------------------------------------------------------------------------------ GGUF

def llama_cpp_permute(w, n_head, n_head_kv):   # llama.cpp convert_hf_to_gguf.py, verbatim
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(path, hf, arch: str = "llama") -> None:
    """A float32 GGUF of ``hf`` as llama.cpp's converter writes it (names, metadata, q/k permute)."""
    import gguf
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for name, t in hf.state_dict().items():
        t = torch_array(t)
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", t)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", t)
        elif name == "lm_head.weight" and not c.tie_word_embeddings:
            w.add_tensor("output.weight", t)
        elif name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            kind = names[rest.removesuffix(".weight")]
            if kind == "attn_q":
                t = llama_cpp_permute(t, c.num_attention_heads, c.num_attention_heads)
            elif kind == "attn_k":
                t = llama_cpp_permute(t, c.num_attention_heads, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{kind}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tie,kv_heads", [(False, 2), (True, HEADS)])
def test_gguf_written_like_llama_cpp_matches_transformers(tmp_path, tie, kv_heads):
    hf = random_llama(tie, kv_heads, 50000.0, 16)
    write_gguf(tmp_path / "tiny.gguf", hf)
    cfg, weights = load_gguf(str(tmp_path / "tiny.gguf"))
    want = config_from_hf(hf.config.to_dict())   # GGUF stores eps as float32, as transformers reads it
    assert cfg == dataclasses.replace(want, norm_eps=float(np.float32(want.norm_eps)))
    ids = np.random.default_rng(3).integers(0, VOCAB, size=(2, 10))
    got = np.asarray(logits(imported(cfg, weights), jnp.asarray(ids)))
    np.testing.assert_allclose(got, torch_logits(hf, ids), atol=1e-4, rtol=0)


def test_gguf_of_another_architecture_refused(tmp_path):
    write_gguf(tmp_path / "other.gguf", random_llama(True, 2, 10000.0, 16), arch="qwen2")
    with pytest.raises(ValueError, match="general.architecture='qwen2'"):
        load_gguf(str(tmp_path / "other.gguf"))


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).normal(size=(3 * 8, 5))
    np.testing.assert_array_equal(unpermute(llama_cpp_permute(w, 6, 3), 3), w)
    np.testing.assert_array_equal(unpermute(llama_cpp_permute(w, 3, 3), 3), w)
    assert not np.array_equal(llama_cpp_permute(w, 3, 3), w)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_gguf_loading():
    from iclm_jax.data.tokenizer import smollm2_tokenizer
    path = smollm2_gguf_path()
    cfg, weights = load_pretrained("smollm2")
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
            cfg.mlp_dim, cfg.rope_theta, cfg.tie_embeddings) == SMOLLM2_SIZES + (True,)
    assert abs(cfg.norm_eps - 1e-5) < 1e-12
    # the experiment config describes exactly this model
    spec = importlib.util.spec_from_file_location(
        "smollm2_cfg", REPO / "experiments/configs/smollm2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = mod.get_config().model
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim,
            m.rope_theta, m.tie_embeddings, m.train_base) == SMOLLM2_SIZES + (True, False)

    ids = np.array([smollm2_tokenizer().encode("The capital of France is Paris, and")])
    assert ids.shape[1] == 8
    got = np.asarray(logits(imported(cfg, weights), jnp.asarray(ids)))
    del weights
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
        attn_implementation="eager").eval()
    want = torch_logits(hf, ids)
    # Same dequantised Q4_1/Q8_0 data on both sides; only float32 summation order differs.
    # Seen: max |diff| 1.5e-4 on logits of magnitude ~27 (5.7e-6 relative).
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 2e-5, rel
    assert (got.argmax(-1) == want.argmax(-1)).all()
