"""A run with model.init starts from the pretrained weights and, with a frozen base, keeps them exactly."""
import numpy as np
import pytest

from iclm_jax import hf
from iclm_jax.data.tokenizer import acre_word_tokenizer
from iclm_jax.train.loop import train
from iclm_jax.train.run import load_run
from tests.test_step import acre_cfg


def _tiny_hf_llama(path, vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, rope_theta=10000.0,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    LlamaForCausalLM(cfg).save_pretrained(path)


def _config(init: str):
    c = acre_cfg.get_config()
    c.model.update(d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32,
                   init=init, train_base=False)
    c.lora.rank = 2
    c.mi.critic_hidden = 16
    c.train.update(steps=3, warmup_steps=1, batch_size=8, log_every=1)
    c.eval.batch_size = 8
    c.data.update(train_problems=8, eval_problems=2, eval_splits="IID")
    return c


@pytest.mark.slow
def test_frozen_pretrained_base_is_loaded_and_kept(tmp_path):
    vocab = acre_word_tokenizer().vocab_size
    _tiny_hf_llama(tmp_path / "llama", vocab)
    train(_config(str(tmp_path / "llama")), str(tmp_path / "run"), quiet=True)
    _, want = hf.load_pretrained(str(tmp_path / "llama"))
    run = load_run(str(tmp_path / "run"))
    base = run.state["model"]["base"]
    assert run.step == 3
    np.testing.assert_array_equal(np.asarray(base["embedding"][...]), want["embedding"])
    np.testing.assert_array_equal(np.asarray(base["layers"][1]["down"]["kernel"][...]),
                                  want["layers.1.down.kernel"])
    lora_b = np.asarray(base["layers"][0]["q"]["lora_b"][...])
    assert np.abs(lora_b).sum() > 0            # the adapters did train


def test_pretrained_sizes_must_fit_the_config(tmp_path):
    from iclm_jax.config_check import ConfigError
    vocab = acre_word_tokenizer().vocab_size
    _tiny_hf_llama(tmp_path / "llama", vocab)
    c = _config(str(tmp_path / "llama"))
    c.model.mlp_dim = 48
    with pytest.raises(ConfigError, match="model.mlp_dim: .* has 32, config has 48"):
        train(c, str(tmp_path / "run"), quiet=True)


def _tiny_hf_llama_random_norms(path, vocab: int):
    """A tiny Llama whose final-norm weight is far from 1 (HF inits norms to ones), so a concat head
    that ignored it would show; returns the torch model (the reference)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, rope_theta=10000.0,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.8 + 0.4 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def _step0_logits(run, ids: np.ndarray) -> np.ndarray:
    """The ICLM's aggregated logits on unpacked rows ``ids`` [B, L], from the run's placed state."""
    import jax.numpy as jnp
    from flax import nnx
    b, n = ids.shape
    ones = jnp.ones((b, n), jnp.int32)
    batch = dict(inputs=jnp.asarray(ids, jnp.int32), positions=jnp.broadcast_to(jnp.arange(n), (b, n)),
                 segments=ones, prompt_mask=ones.astype(jnp.float32), domain=jnp.zeros((b,), jnp.int32))
    return np.asarray(nnx.merge(run.graphdef, run.state).model(batch).logits)


def _run_of(config, workdir):
    from iclm_jax.data import sources
    from iclm_jax.train.run import Run
    return Run(config, str(workdir), sources.build(config.data, config.seed))


@pytest.mark.slow
def test_heads_derived_from_a_pretrained_base_start_at_its_logits(tmp_path):
    """At step 0 (zero LoRA B, concat head = mean of the modules' base heads) the ICLM is the pretrained
    model alone: after model.init, and after init_from a run that loaded it. Reference: transformers."""
    import torch

    from iclm_jax import checkpoint
    from iclm_jax.train.run import start_fresh
    vocab = acre_word_tokenizer().vocab_size
    hf_model = _tiny_hf_llama_random_norms(tmp_path / "llama", vocab)
    ids = np.random.default_rng(0).integers(1, vocab, size=(3, 11))
    with torch.no_grad():
        want = hf_model(input_ids=torch.from_numpy(ids)).logits.numpy()

    config = _config(str(tmp_path / "llama"))
    config.model.train_base = True          # the head must follow the base whether or not it trains
    run = _run_of(config, tmp_path / "a")
    assert "pretrained base" in start_fresh(run, config)
    np.testing.assert_allclose(_step0_logits(run, ids), want, atol=1e-4, rtol=0)   # import parity
    mngr = checkpoint.manager(str(tmp_path / "a"))
    checkpoint.save(mngr, 0, run.state, {"step": 0})
    mngr.wait_until_finished()
    mngr.close()

    other = _config("")
    other.model.train_base = True
    other.init_from = str(tmp_path / "a")
    run_b = _run_of(other, tmp_path / "b")
    assert "initialised parameters" in start_fresh(run_b, other)
    np.testing.assert_allclose(_step0_logits(run_b, ids), want, atol=1e-4, rtol=0)
