"""KV cache of the exported custom transformers ICLM (``modeling_iclm.py``): ``generate()`` with the
cache gives the tokens of ``use_cache=False`` and of our JAX decoding, a cached step's logits equal a
full recompute's, and the router runs once per ``generate()`` call."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from iclm_jax.generate import decode
from iclm_jax.hf.export_custom import write_custom_model
from tests.helpers import random_batch
from tests.test_hf_export_custom import CASES, _build

NEW = 16          # new tokens per generate() call
ATOL = 1e-5       # float32: a cached step against a full recompute of the same position


@pytest.fixture(scope="module", params=sorted(CASES))
def run(request, tmp_path_factory):
    """(case, JAX model, tokenizer, exported model loaded back, prompts) for one tiny trained-like run.

    The batch is test_hf_export_custom's; prompts 0 and 1 (10 and 7 tokens) are routed to different
    modules in every case (checked where it matters)."""
    batch = random_batch(b=4, length=12, seed=5)
    batch["inputs"] = batch["inputs"] % 90 + 3 * (batch["segments"] > 0)   # ACRE ids, no pad
    model, tok = _build(request.param, batch)
    lengths = [int(n) - 2 for n in batch["segments"].sum(1)]              # 10, 7, 10, 7
    prompts = [batch["inputs"][i, :n].tolist() for i, n in enumerate(lengths)]
    out = tmp_path_factory.mktemp(request.param)
    write_custom_model(model, tok, str(out))
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    return request.param, model, tok, hf, prompts


def _left_pad(prompts):
    """-> input_ids, attention_mask [B, W], left-padded (transformers' convention for generate)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def _generate(hf, tok, ids, mask, use_cache: bool):
    kw = {} if mask is None else {"attention_mask": mask}
    return hf.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_id,
                       eos_token_id=tok.eos_id, use_cache=use_cache, return_dict_in_generate=True,
                       output_logits=True, **kw)


def _batches(prompts):
    """Batch 1 (no attention_mask at all) and a left-padded batch of 2 prompts of different lengths."""
    one = torch.as_tensor([prompts[0]], dtype=torch.long)
    ids, mask = _left_pad(prompts[:2])
    assert mask.sum(1).tolist() == [10, 7]
    return {"batch1": (one, None), "batch2_left_padded": (ids, mask)}


def test_cached_generate_equals_uncached(run):
    case, model, tok, hf, prompts = run
    for name, (ids, mask) in _batches(prompts).items():
        cached = _generate(hf, tok, ids, mask, use_cache=True)
        full = _generate(hf, tok, ids, mask, use_cache=False)
        torch.testing.assert_close(cached.sequences, full.sequences, rtol=0, atol=0, msg=name)
        # the cached run did use the cache: one DynamicCache, both passes' layers, every token but the last
        cache = cached.cache
        assert isinstance(cache, DynamicCache) and full.get("cache") is None, name
        passes = 1 + int(model.cfg.invariant)
        assert len(cache.layers) == passes * model.cfg.base.n_layers, name
        assert cache.get_seq_length() == cached.sequences.shape[1] - 1, name
        with torch.no_grad():                             # the route kept with it: the prompt's
            route = hf(ids, attention_mask=mask).route
        torch.testing.assert_close(cache.iclm_route, route, rtol=0, atol=0, msg=name)
        # the logits each token was chosen from: the same up to float32 rounding
        lc, lf = torch.stack(cached.logits, 1), torch.stack(full.logits, 1)
        torch.testing.assert_close(lc, lf, rtol=0, atol=ATOL, msg=name)


def test_cached_generate_matches_jax(run):
    """Token for token the same as ``iclm_jax.generate.decode`` (KV-cached JAX greedy decoding)."""
    case, model, tok, hf, prompts = run
    for name, (ids, mask) in _batches(prompts).items():
        rows = prompts[:ids.shape[0]]
        ref = decode(model, rows, max_new_tokens=NEW, eos_id=tok.eos_id, pad_id=tok.pad_id)
        if ids.shape[0] == 2:
            assert ref.module[0] != ref.module[1], f"test setup: one module for both prompts {ref.module}"
        out = _generate(hf, tok, ids, mask, use_cache=True)
        np.testing.assert_array_equal(out.cache.iclm_route.numpy(), ref.module, err_msg=name)
        new = out.sequences[:, ids.shape[1]:].numpy()
        assert 1 <= new.shape[1] <= NEW
        np.testing.assert_array_equal(new, ref.tokens[:, :new.shape[1]], err_msg=name)
        if new.shape[1] < NEW:                            # stopped early: every row emitted EOS
            assert (ref.tokens[:, new.shape[1]:] == tok.pad_id).all(), name


def test_cached_step_logits_equal_full_recompute(run):
    """Prefill + 6 one-token steps over a left-padded batch of 2: each step's logits equal the last
    position of a forward over the whole sequence without cache; the prefill equals it everywhere."""
    case, model, tok, hf, prompts = run
    ids, mask = _left_pad(prompts[:2])
    real = mask.bool()
    with torch.no_grad():
        pre = hf(ids, attention_mask=mask, use_cache=True)
        ref = hf(ids, attention_mask=mask)
        assert ref.get("cache") is None
        torch.testing.assert_close(pre.logits[real], ref.logits[real], rtol=0, atol=ATOL)
        torch.testing.assert_close(pre.route, ref.route, rtol=0, atol=0)
        cache, route = pre.cache, pre.route
        seq, att = ids, mask
        nxt = pre.logits[:, -1].argmax(-1, keepdim=True)
        for step in range(6):
            seq = torch.cat([seq, nxt], 1)
            att = torch.cat([att, torch.ones_like(nxt)], 1)
            kw = {"past_key_values": cache} if step == 3 else {"cache": cache}   # both names work
            out = hf(nxt, attention_mask=att, use_cache=True, **kw)
            assert out.cache is cache and cache.get_seq_length() == seq.shape[1]
            torch.testing.assert_close(out.route, route, rtol=0, atol=0)      # the prompt's route kept
            full = hf(seq, attention_mask=att)
            assert out.logits.shape == (2, 1, full.logits.shape[-1])
            torch.testing.assert_close(out.logits[:, 0], full.logits[:, -1], rtol=0, atol=ATOL,
                                       msg=f"step {step}")
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)


def test_router_runs_once_per_generate(run, monkeypatch):
    case, model, tok, hf, prompts = run
    calls = []
    route_fn = hf.route
    monkeypatch.setattr(hf, "route", lambda *a: calls.append(a[2].shape) or route_fn(*a))
    ids, mask = _left_pad(prompts[:2])
    for use_cache in (True, False):
        for _ in range(2):
            calls.clear()
            out = _generate(hf, tok, ids, mask, use_cache)
            assert out.sequences.shape[1] > ids.shape[1] + 1, "test setup: a single new token"
            assert calls == [ids.shape], (use_cache, calls)   # once, on the whole prompt


def test_cache_misuse_is_refused(run):
    case, model, tok, hf, prompts = run
    ids, mask = _left_pad(prompts[:2])
    with torch.no_grad():
        cache = hf(ids, attention_mask=mask, use_cache=True).cache
        nxt = ids[:, -1:]
        with pytest.raises(ValueError, match="attention_mask"):
            hf(nxt, attention_mask=mask[:, -1:], cache=cache)      # the mask must cover the cached tokens
        del cache.iclm_route
        with pytest.raises(ValueError, match="no route"):
            hf(nxt, attention_mask=torch.cat([mask, mask[:, -1:]], 1), cache=cache)
