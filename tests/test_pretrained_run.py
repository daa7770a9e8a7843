"""A run with model.init starts from the pretrained weights and, with a frozen base, keeps them exactly."""
import numpy as np
import pytest

from iclm_jax import hf
from iclm_jax.data.tokenizer import acre_word_tokenizer
from iclm_jax.train import restore_run
from iclm_jax.train.loop import train
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
    run = restore_run.load(str(tmp_path / "run"))
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
