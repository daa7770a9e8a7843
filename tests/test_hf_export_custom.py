"""Parity of the exported custom transformers ICLM (``trust_remote_code``) with the JAX ICLM."""
from __future__ import annotations

import ast
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from iclm_jax.data.tokenizer import acre_word_tokenizer
from iclm_jax.generate import decode
from iclm_jax.hf import export as ex
from iclm_jax.hf.export_custom import write_custom_model
from iclm_jax.model.router import pool_prompt
from tests.helpers import nonzero_lora_b, random_batch, tiny_iclm

CASES = {
    # router on the invariant module, centred + normalised + projected codes, concat head, untied
    "concat": dict(num_modules=3, router={"mode": "hard", "center": True, "normalize": True,
                                          "proj_dim": 8}),
    # router on its own adapter, tied embeddings, log-prob mixture
    "probs_tied": dict(num_modules=2, router_source="adapter", aggregator="probs",
                       invariant_weight=0.3, router={"mode": "hard"}, base_kw={"tie_embeddings": True}),
    # no invariant module: the routed module alone on the base head
    "no_invariant": dict(num_modules=2, invariant=False, router_source="base",
                         router={"mode": "hard", "normalize": True}),
}


def _router_codes(model, batch) -> np.ndarray:
    """The standardised, projected router input z [B, c] of each row (what the codebook is matched to)."""
    cfg, b = model.cfg, batch["inputs"].shape[0]
    slot = {"invariant": cfg.invariant_slot, "base": -1, "adapter": cfg.router_slot}[cfg.router_source]
    x = model.hidden(batch, jnp.full((b,), slot, jnp.int32), train=False)
    e = pool_prompt(model.base.final_norm(x), batch["prompt_mask"])
    r = model.router
    return np.asarray(r.project(r.standardize(e, jnp.ones((b,)), False)))


def _build(case: str, batch):
    kw = dict(CASES[case])
    tok = acre_word_tokenizer()
    base_kw = dict(kw.pop("base_kw", {}), vocab_size=tok.vocab_size)
    model = nonzero_lora_b(tiny_iclm(seed=3, base_kw=base_kw, **kw), scale=0.3)
    r = model.router
    if r.center:
        r.mean[...] = jnp.asarray(np.random.default_rng(1).normal(size=r.mean.shape) * 0.05, jnp.float32)
    # Codes = rows 0..K-1's own embeddings (slightly shrunk), so rows are routed to different modules.
    z = _router_codes(model, batch)
    r.codebook[...] = jnp.asarray(0.9 * z[:model.cfg.num_modules], jnp.float32)
    return model, tok


@pytest.fixture(scope="module")
def batch():
    b = random_batch(b=4, length=12, seed=5)
    b["inputs"] = b["inputs"] % 90 + 3 * (b["segments"] > 0)   # ids inside the ACRE vocabulary, no pad
    return b


@pytest.mark.parametrize("case,sharded", [(c, False) for c in sorted(CASES)] + [("concat", True)])
def test_custom_model_matches_jax(case, sharded, batch, tmp_path):
    model, tok = _build(case, batch)
    out = model(batch, train=False)
    route = np.asarray(out.route.index)
    assert len(set(route.tolist())) >= 2, f"test setup: every row routed to one module {route}"

    write_custom_model(model, tok, str(tmp_path), shard_bytes=4096 if sharded else None)
    weights = "model.safetensors.index.json" if sharded else "model.safetensors"
    assert {"config.json", "modeling_iclm.py", weights, "tokenizer.json"} <= set(os.listdir(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True, dtype=torch.float32)
    hf.eval()
    real = batch["segments"] > 0
    with torch.no_grad():
        res = hf(torch.as_tensor(batch["inputs"], dtype=torch.long),
                 attention_mask=torch.as_tensor(real, dtype=torch.long),
                 prompt_mask=torch.as_tensor(batch["prompt_mask"]))
    np.testing.assert_array_equal(res.route.numpy(), route)
    ours, theirs = np.asarray(out.logits), res.logits.numpy()
    assert np.abs(ours[real] - theirs[real]).max() < 1e-4
    # input embeddings: our table, and what the first layer reads for these ids
    emb = hf.get_input_embeddings()
    table = np.asarray(model.base.embedding[...])
    np.testing.assert_array_equal(emb.weight.detach().numpy(), table)
    np.testing.assert_array_equal(emb(torch.as_tensor(batch["inputs"], dtype=torch.long)).detach()
                                  .numpy(), table[batch["inputs"]])
    # output embeddings: the untied head when the logits come from it, else None
    head = hf.get_output_embeddings()
    if case == "no_invariant":
        np.testing.assert_array_equal(head.weight.detach().numpy(),
                                      np.asarray(model.base.lm_head[...]).T)
    else:                               # concat: the aggregator makes the logits; probs_tied: tied
        assert head is None


def _forward(hf, batch):
    real = batch["segments"] > 0
    with torch.no_grad():
        return hf(torch.as_tensor(batch["inputs"], dtype=torch.long),
                  attention_mask=torch.as_tensor(real, dtype=torch.long),
                  prompt_mask=torch.as_tensor(batch["prompt_mask"]))


def _rel_err(theirs, ours, real) -> float:
    """max |theirs - ours| over real tokens, relative to the largest |ours| there."""
    return float(np.abs(theirs[real] - ours[real]).max() / np.abs(ours[real]).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_custom_model_half_precision(case, batch, tmp_path):
    """``dtype=torch.bfloat16`` / ``torch.float16`` loads and runs; the routes equal the JAX model's
    and the logits stay within 4x the error transformers' own Llama makes at that dtype.

    Why that tolerance: a half-precision forward rounds weights and activations to the dtype
    (relative 2^-8 for bfloat16, 2^-11 for float16), so no implementation matches float32 closer
    than that rounding carried through the layers. The yardstick is measured, not assumed: each
    exported module run by transformers' LlamaForCausalLM at the same dtype against the JAX module
    (the custom model adds LoRA unmerged, a second pass and the aggregator, hence the 4x). A dtype
    bug (a float32-only mask value in float16, a norm or mixture rounded to bf16, a bf16 routing
    decision) gives NaNs, another route, or errors well above it.
    """
    model, tok = _build(case, batch)
    out = model(batch, train=False)
    ours, route = np.asarray(out.logits), np.asarray(out.route.index)
    real = batch["segments"] > 0
    path = ex.export_model(model, tok, str(tmp_path / "export"))
    for dtype in (torch.bfloat16, torch.float16):
        llama = 0.0
        for name, slot in ex.module_names(model.cfg).items():
            ref = AutoModelForCausalLM.from_pretrained(os.path.join(path, "modules", name),
                                                       dtype=dtype).eval()
            with torch.no_grad():
                logits = ref(torch.as_tensor(batch["inputs"], dtype=torch.long),
                             attention_mask=torch.as_tensor(real, dtype=torch.long)).logits
            llama = max(llama, _rel_err(logits.float().numpy(),
                                        np.asarray(model.module_logits(batch, slot)), real))
        hf = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype).eval()
        assert hf.get_input_embeddings().weight.dtype == dtype
        res = _forward(hf, batch)
        assert res.logits.dtype == torch.float32
        np.testing.assert_array_equal(res.route.numpy(), route, err_msg=str(dtype))
        err = _rel_err(res.logits.numpy(), ours, real)
        assert 0 < llama and err <= 4 * llama, (dtype, err, llama)


@pytest.mark.parametrize("case", ["concat", "no_invariant"])
def test_custom_generate_matches_jax_greedy(case, batch, tmp_path):
    """Greedy generate() of 10 tokens, left-padded prompts of different lengths, equals our decoding."""
    model, tok = _build(case, batch)
    lengths = [int(n) - 2 for n in batch["segments"].sum(1)]      # 10, 7, 10, 7
    prompts = [batch["inputs"][i, :n].tolist() for i, n in enumerate(lengths)]
    ref = decode(model, prompts, max_new_tokens=10, eos_id=tok.eos_id, pad_id=tok.pad_id)
    assert len(set(ref.module.tolist())) >= 2, f"test setup: one module for every prompt {ref.module}"

    write_custom_model(model, tok, str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True, dtype=torch.float32)
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):                       # left padding (transformers' convention)
        ids[i, width - len(p):] = torch.as_tensor(p)
        mask[i, width - len(p):] = 1
    calls = []
    route_fn = hf.route
    hf.route = lambda *a: calls.append(1) or route_fn(*a)   # the router must run once, on the prompt
    gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                      pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
    assert len(calls) == 1
    new = gen[:, width:].numpy()
    assert new.shape[1] <= 10
    expected = ref.tokens[:, :new.shape[1]]
    np.testing.assert_array_equal(new, expected)
    if new.shape[1] < 10:                                # stopped early: every row emitted EOS
        assert (ref.tokens[:, new.shape[1]:] == tok.pad_id).all()


def test_template_imports_only_torch_and_transformers():
    """The copied modeling file must load without iclm_jax installed."""
    from iclm_jax.hf import export_custom
    src = open(export_custom._TEMPLATE).read()
    roots = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "dataclasses", "math", "typing", "torch", "transformers"}, roots


def test_soft_routing_is_refused(tmp_path):
    model = tiny_iclm(num_modules=2, router={"mode": "soft"})
    with pytest.raises(ValueError, match="soft"):
        write_custom_model(model, None, str(tmp_path))
