"""Small builders shared by the model/train tests (tiny sizes, float32)."""
from __future__ import annotations

import os
import socket

import jax.numpy as jnp
import numpy as np
from flax import nnx

import iclm_jax  # noqa: F401  (disables eager sharding)
from iclm_jax.model.iclm import ICLM, ICLMConfig
from iclm_jax.model.lora import LoRAParam
from iclm_jax.model.transformer import TransformerConfig
from tests.xla_env import xla_flags

VOCAB = 37


def tiny_base(**kw) -> TransformerConfig:
    args = dict(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, mlp_dim=32)
    args.update(kw)
    return TransformerConfig(**args)


def tiny_iclm(seed: int = 0, base_kw=None, **kw) -> ICLM:
    cfg = ICLMConfig(base=tiny_base(**(base_kw or {})), **kw)
    return ICLM(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1, router=seed + 2))


def random_batch(b: int = 4, length: int = 12, seed: int = 0, num_slots: int = 1, domains=None) -> dict:
    """Unpacked rows: a random prompt, 2 answer targets at the end, right padding on odd rows."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(1, VOCAB, size=(b, length)).astype(np.int32)
    segments = np.ones((b, length), np.int32)
    for i in range(1, b, 2):
        segments[i, -3:] = 0
    inputs = inputs * (segments > 0)
    targets = np.zeros_like(inputs)
    targets[:, :-1] = inputs[:, 1:]
    targets = targets * (np.roll(segments, -1, axis=1) > 0) * (segments > 0)
    loss_mask = np.zeros((b, length), np.float32)
    answer_slot = np.full((b, length), -1, np.int32)
    prompt_mask = (segments > 0).astype(np.float32)
    for i in range(b):
        n = int(segments[i].sum())
        loss_mask[i, n - 3:n - 1] = 1
        answer_slot[i, n - 3:n - 1] = 0
        prompt_mask[i, n - 2:n] = 0
    positions = np.tile(np.arange(length, dtype=np.int32), (b, 1))
    domain = np.asarray(domains if domains is not None else np.arange(b) % 2, np.int32)
    return dict(inputs=inputs, targets=targets, positions=positions, segments=segments, loss_mask=loss_mask,
                answer_slot=answer_slot, prompt_mask=prompt_mask, domain=domain,
                query_type=np.zeros((b, num_slots), np.int32), query_label=np.zeros((b, num_slots), np.int32))


def nonzero_lora_b(model, seed: int = 0, scale: float = 0.1):
    """Give every LoRA B a random value: fresh adapters are B = 0, which hides routing effects. A model
    with stacked layers (``model.scan_layers``) gets the same values as the unrolled one of its config."""
    rng = np.random.default_rng(seed)
    bs = [v for path, v in nnx.iter_graph(model) if isinstance(v, LoRAParam) and path[-1] == "lora_b"]
    if bs and (bs[0].get_metadata().get("out_sharding") or ("",))[0] == "layers":
        vals = [np.empty(v.shape, np.float32) for v in bs]
        for i in range(bs[0].shape[0]):       # the unrolled order: layer by layer
            for val in vals:
                val[i] = rng.normal(size=val.shape[1:]) * scale
        for v, val in zip(bs, vals):
            v[...] = jnp.asarray(val)
        return model
    for v in bs:
        v[...] = jnp.asarray(rng.normal(size=v.shape) * scale, jnp.float32)
    return model


def one_device_env(devices: int = 1) -> dict:
    """The environment of a test's subprocess: ``devices`` CPU devices (one unless a test builds a mesh) and the
    suite's persistent compilation cache, so that the many runs of one tiny config compile it once."""
    cache = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
    return dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
                JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def free_port() -> int:
    """A localhost TCP port nobody listens on (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_recipe_config(steps: int, **data):
    """``experiments/configs/acre.py:cpu,baseline,symbolic`` (the CPU learning recipe) shrunk for a test:
    ``steps`` steps, validation every steps/3, 100 validation and 20 IID test problems."""
    from tests.test_step import acre_cfg
    c = acre_cfg.get_config("cpu,baseline,symbolic")
    c.train.steps, c.train.warmup_steps, c.train.log_every = steps, steps // 10, steps // 3
    c.train.time_limit_s = 0.0
    c.eval.every, c.checkpoint.every = steps // 3, 0
    c.data.val_problems, c.data.eval_problems, c.data.eval_splits = 100, 20, "IID"
    c.data.train_problems = 200            # the stream's finite head: references and row lengths
    # the mesh stays data=-1: every (fake) device of the test process
    for k, v in data.items():
        c.data[k] = v
    return c


def write_random_run(work, config, lora_scale: float = 0.5):
    """A run directory as ``iclm-train`` leaves it (config, data.json, tokenizer, a checkpoint at step 1),
    holding ``config``'s random model with nonzero adapters (so the modules differ), without training
    steps. Returns the run's data (``sources.build``) and the model saved."""
    import json

    from iclm_jax import checkpoint
    from iclm_jax.data import sources
    from iclm_jax.train.run import Run
    data = sources.build(config.data, config.seed)
    data.tokenizer.save(str(work / "tokenizer"))
    (work / "data.json").write_text(json.dumps({"max_len": data.max_len, "num_slots": data.num_slots}))
    (work / "config.json").write_text(config.to_json_best_effort(indent=2))
    run = Run(config, str(work), data)
    ts = nnx.merge(run.graphdef, run.state)
    nonzero_lora_b(ts.model, scale=lora_scale)
    mngr = checkpoint.manager(str(work))
    checkpoint.save(mngr, 1, nnx.state(ts), {"step": 1})
    mngr.wait_until_finished()
    mngr.close()
    return data, ts.model
