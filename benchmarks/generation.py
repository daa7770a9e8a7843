"""Section "generation": tokens/s of KV-cached greedy decoding, against full recompute and transformers.

*Cached* is ``iclm_jax.generate.decode`` (whole model, greedy, no EOS stop): one jitted program, the
prompts prefilled once per active module stream, then one ``lax.while_loop`` step per token over the
KV cache. *Recompute* (written here: ``generate.py`` has no cache-free path) is the original code's
way: every new token re-runs the model's whole forward (``ICLM.forward``: every stream, the router on
the prompt, then the heads at the last position only) on prompt + tokens so far, jitted once per
width bucket (the sequence right-padded to a multiple of 16, as ``decode`` pads prompts), argmax
on the device, the token appended on the host. Both produce the same greedy tokens: checked here,
a mismatch raises. *transformers* is ``LlamaForCausalLM.generate`` (default attention, float32,
greedy, EOS disabled so it decodes exactly N tokens) on the same SmolLM2-135M GGUF weights (its own
GGUF loader); ours decodes an ICLM whose base holds those weights with no LoRA targets (one module,
no invariant, no router), i.e. the very same Llama network. Ours vs transformers agreement (same
greedy tokens) is reported, not asserted: float32 summation order differs and greedy paths may split
at near-ties.

tokens/s = new tokens x batch / seconds of one whole call (prefill included; compile excluded by a
dropped warm-up round); median (min-max) over interleaved rounds. Prompts: 32 tokens per row (tiny:
random ids; SmolLM2: windows of one English paragraph), every row a different prompt.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import harness as H

PROMPT_LEN = 32
FULL_NEW_TOKENS = 256
BUCKET = 16
TEXT = ("The history of the city begins with a small settlement on the river, where farmers traded grain "
        "and wool with merchants who came by boat from the coast. Over the following centuries the town "
        "grew into a market centre, built a stone bridge and a cathedral, and its university became known "
        "across the continent for the study of law, medicine and the natural sciences. Today it is a quiet "
        "place of narrow streets, old bookshops and gardens along the water.")


# ------------------------------------------------------------------------------------------- models
def _tiny(variant: str):
    """(untrained ICLM at harness.SHAPES["tiny"] from bench_config("tiny", variant), vocab size)."""
    from iclm_jax.data import tokenizer as tk
    from iclm_jax.model.iclm import ICLM
    from iclm_jax.train import build
    c = H.bench_config("tiny", variant)
    vocab = tk.load_tokenizer(c.data.tokenizer).vocab_size
    model = ICLM(build.model_config(c, vocab), rngs=nnx.Rngs(params=0, dropout=1, router=2))
    return model, vocab


def _smollm2():
    """(ICLM whose base is SmolLM2-135M with no LoRA anywhere: exactly the Llama network, config)."""
    from iclm_jax import hf
    from iclm_jax.model.iclm import ICLM, ICLMConfig
    cfg, weights = hf.load_pretrained("smollm2")
    icfg = ICLMConfig(base=cfg, num_modules=1, invariant=False, lora_targets=())
    model = ICLM(icfg, rngs=nnx.Rngs(params=0, dropout=1, router=2))
    hf.load_into(model.base, weights)
    return model


def _transformers_smollm2():
    import torch
    from transformers import AutoModelForCausalLM

    from iclm_jax.hf import smollm2_gguf_path
    path = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def _prompts(kind: str, batch: int, vocab: int) -> np.ndarray:
    """int32 [batch, PROMPT_LEN], a different prompt per row."""
    if kind == "tiny":
        return np.random.default_rng(0).integers(1, vocab, size=(batch, PROMPT_LEN)).astype(np.int32)
    from iclm_jax.data.tokenizer import smollm2_tokenizer
    ids = smollm2_tokenizer().encode(TEXT)
    step = (len(ids) - PROMPT_LEN) // max(batch - 1, 1)
    if step < 1 and batch > 1:
        raise ValueError(f"the prompt text has {len(ids)} tokens: too few for {batch} windows")
    return np.stack([ids[i * step:i * step + PROMPT_LEN] for i in range(batch)]).astype(np.int32)


# --------------------------------------------------------------------------------------- decoders
def _cached(model, prompts: np.ndarray, n: int):
    from iclm_jax import generate as gen
    return lambda: gen.decode(model, prompts, max_new_tokens=n, eos_id=None, pad_id=0).tokens


class Recompute:
    """Greedy decoding by re-running the whole forward on the growing sequence (no cache)."""

    def __init__(self, model):
        graphdef, self.state = nnx.split(model)

        @jax.jit
        def next_token(state, inputs, lengths, prompt_len):
            m = nnx.merge(graphdef, state)
            b, w = inputs.shape
            pos = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))
            segments = (pos < lengths[:, None]).astype(jnp.int32)
            batch = dict(inputs=inputs, segments=segments, positions=pos,
                         prompt_mask=(pos < prompt_len[:, None]).astype(jnp.float32))   # route on the prompt
            h = m.forward(batch, train=False)
            rows = jnp.arange(b)

            def last(x):
                return None if x is None else x[rows, lengths - 1][:, None]
            logits = m.heads(last(h.x_inv), last(h.x_spec), aux=False)["logits"][:, 0]
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)

        self.next_token = next_token

    def width(self, length: int) -> int:
        return -(-length // BUCKET) * BUCKET

    def __call__(self, prompts: np.ndarray, n: int) -> np.ndarray:
        b, p = prompts.shape
        buf = np.zeros((b, self.width(p + n)), np.int32)
        buf[:, :p] = prompts
        out = np.zeros((b, n), np.int32)
        plen = np.full((b,), p, np.int32)
        for t in range(n):
            length = p + t
            tok = np.asarray(self.next_token(self.state, buf[:, :self.width(length)],
                                             np.full((b,), length, np.int32), plen))
            out[:, t] = tok
            buf[:, length] = tok
        return out

    def step_time_fn(self, batch: int, width: int):
        """One forward at a width (full rows of random ids): for extrapolating a long recompute."""
        inputs = np.random.default_rng(1).integers(1, 100, size=(batch, width)).astype(np.int32)
        lengths, plen = np.full((batch,), width, np.int32), np.full((batch,), PROMPT_LEN, np.int32)
        return lambda: self.next_token(self.state, inputs, lengths, plen).block_until_ready()


def _hf_generate(hf_model, prompts: np.ndarray, n: int):
    import torch
    from transformers import GenerationConfig
    ids = torch.from_numpy(prompts.astype(np.int64))
    mask = torch.ones_like(ids)
    gc = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0, bos_token_id=None)

    def call():
        with torch.inference_mode():
            out = hf_model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
        return out[:, prompts.shape[1]:].numpy()
    return call


# ------------------------------------------------------------------------------------- reporting
def _rate(ts: list[float], tokens: int) -> str:
    return f"{tokens / H.med(ts):,.1f} ({tokens / max(ts):,.1f}-{tokens / min(ts):,.1f})"


def _check_same(name: str, a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape or not np.array_equal(a, b):
        bad = np.argwhere(a != b) if a.shape == b.shape else None
        where = f"first difference at (row, token) {tuple(bad[0])}" if bad is not None and len(bad) else ""
        raise AssertionError(f"generation benchmark, {name}: {what} tokens differ from the cached "
                             f"decode's ({a.shape} vs {b.shape}) {where}: a bug in one of them")


def _agreement(ours: np.ndarray, theirs: np.ndarray) -> str:
    """How many leading tokens each row shares: 'identical' or per-row common prefix lengths."""
    if np.array_equal(ours, theirs):
        return "identical"
    prefix = [int(np.argmax(r)) if r.any() else len(r) for r in ours != theirs]
    return f"rows share the first {min(prefix)}-{max(prefix)} of {ours.shape[1]} tokens"


def run(quick: bool = False) -> H.Section:
    import torch

    n_new = 16 if quick else FULL_NEW_TOKENS
    batches = (1,) if quick else (1, 8)
    rounds = 2 if quick else 3
    rows, notes, estimates = [], [], {}
    t_start = time.time()

    # ---- tiny: cached vs recompute, measured in full
    tiny_variants = (("baseline", "1 LoRA module"),) if quick else (
        ("baseline", "1 LoRA module"), ("iclm", "ICLM K=2 + invariant: 2 streams"))
    for variant, desc in tiny_variants:
        model, vocab = _tiny(variant)
        rec = Recompute(model)
        for b in batches:
            prompts = _prompts("tiny", b, vocab)
            cached = _cached(model, prompts, n_new)
            out = {}
            fns = {"cached": lambda: out.__setitem__("cached", cached()),
                   "recompute": lambda: out.__setitem__("recompute", rec(prompts, n_new))}
            ts = H.interleaved(fns, rounds, warmup=1)
            _check_same(f"tiny {variant} batch {b}", out["recompute"], out["cached"], "recompute")
            tok = n_new * b
            rows.append([f"tiny ({desc})", b, n_new, _rate(ts["cached"], tok), _rate(ts["recompute"], tok),
                         f"**{H.med(ts['recompute']) / H.med(ts['cached']):.1f} x**", "-", "-"])

    # ---- SmolLM2-135M: cached vs recompute (extrapolated) vs transformers
    threads = torch.get_num_threads()
    if not quick:
        model = _smollm2()
        hf_model = _transformers_smollm2()
        rec = Recompute(model)
        # torch's thread count: whichever of 1 and its default is faster here (a probe of 16 tokens,
        # batch 1): on a loaded machine OpenMP threads that wait for a busy core can be many times slower.
        probe_prompts = _prompts("smollm2", 1, 0)
        speed = {}
        for n_threads in sorted({1, threads}):
            torch.set_num_threads(n_threads)
            speed[n_threads] = BUCKET / H.med(H.interleaved(
                {"hf": _hf_generate(hf_model, probe_prompts, BUCKET)}, 1, warmup=1)["hf"])
        hf_threads = max(speed, key=speed.get)
        torch.set_num_threads(hf_threads)
        notes.append("transformers' thread count: a 16-token batch-1 probe gave "
                     + ", ".join(f"{v:,.1f} tokens/s with {k} thread{'s' * (k > 1)}" for k, v in speed.items())
                     + f"; the table's transformers column uses {hf_threads}. (With other work on the cores, "
                     "as in this run's load average, OpenMP threads waiting on each other at every op can be "
                     "many times slower than one thread.) Ours runs on XLA's own thread pool over all cores, "
                     "so on an idle machine transformers' default threads would do better than here.")
        n_check = BUCKET            # recompute run for real: the first 16 new tokens (widths 32 and 48)
        sm_rounds = 2
        for b in batches:
            prompts = _prompts("smollm2", b, 0)
            cached, theirs = _cached(model, prompts, n_new), _hf_generate(hf_model, prompts, n_new)
            out = {}
            ts = H.interleaved({"cached": lambda: out.__setitem__("cached", cached()),
                                "transformers": lambda: out.__setitem__("hf", theirs())}, sm_rounds, warmup=1)
            agree = _agreement(out["cached"], out["hf"])
            # Recompute: the real loop for n_check tokens (checked against the cached tokens), and one
            # forward at three of the width buckets the 256-token loop passes through: its time is the
            # sum over its steps of the forward time at each step's width (interpolated linearly).
            widths = sorted({rec.width(PROMPT_LEN + t) for t in range(n_new)})
            probe = (widths[0], widths[len(widths) // 2], widths[-1])
            fwd = H.interleaved({w: rec.step_time_fn(b, w) for w in probe}, sm_rounds, warmup=1)
            real = {}
            short = H.interleaved({"rec": lambda: real.__setitem__("rec", rec(prompts, n_check))}, 1, warmup=1)
            _check_same(f"SmolLM2 batch {b}", real["rec"], out["cached"][:, :n_check], "recompute")
            f = {w: H.med(v) for w, v in fwd.items()}

            def predicted(n):
                return sum(float(np.interp(rec.width(PROMPT_LEN + t), probe, [f[w] for w in probe]))
                           for t in range(n))
            est = estimates[b] = predicted(n_new)
            tok = n_new * b
            rows.append(["SmolLM2-135M (base, no LoRA)", b, n_new, _rate(ts["cached"], tok),
                         f"~{tok / est:,.2f} (estimated)", f"**~{est / H.med(ts['cached']):.0f} x**",
                         _rate(ts["transformers"], tok),
                         f"**{H.med(ts['transformers']) / H.med(ts['cached']):.2f} x**"])
            notes.append(
                f"SmolLM2 batch {b}: one recompute forward takes "
                + ", ".join(f"{f[w] * 1e3:,.0f} ms at width {w}" for w in probe)
                + f" (median of {sm_rounds}); the {n_new}-token recompute, one forward per token at widths "
                f"{widths[0]}-{widths[-1]}, would take ~{est:,.0f} s (linear interpolation between those "
                f"widths, summed over the steps); the real recompute loop for the first {n_check} tokens "
                f"took {short['rec'][0]:.2f} s (one run; the sum predicts {predicted(n_check):.2f} s) and "
                f"gave the cached tokens. Ours vs transformers: {agree}.")
        torch.set_num_threads(threads)
        del hf_model

    text = (__doc__.split("\n\n", 1)[1].strip()
            + f"\n\ntorch {torch.__version__} (default {threads} threads); XLA:CPU: its own thread pool "
            f"over all {os.cpu_count()} cores. Tiny: {rounds} rounds after 1 warm-up"
            + ("" if quick else "; SmolLM2: 2 rounds after 1 warm-up (a round is minutes)")
            + f" (section: {time.time() - t_start:.0f} s).\n\n"
            + H.table(["model", "batch", "new tokens", "cached tokens/s", "recompute tokens/s",
                       "cached / recompute", "transformers tokens/s", "ours / transformers"], rows)
            + ("\n\n" + "\n\n".join(notes) if notes else "")
            + ("\n\n`--quick`: tiny baseline only, batch 1, 16 new tokens, cached and recompute; the full "
               "run adds batch 8, 256 tokens, the tiny ICLM, SmolLM2-135M and transformers." if quick else
               "\n\nSmolLM2's recompute is estimated (the sums above, checked against the real loop over "
               "its first 16 tokens), not run in full: that would cost every round "
               + " and ".join(f"~{e / 60:.0f} min at batch {b}" for b, e in estimates.items())
               + ", plus one compile per width bucket. Targets (issue): cached >= 5 x recompute; ours at "
               "least on par with transformers on CPU."))
    return H.Section("generation", "Generation: KV-cached decoding vs recompute and transformers", text,
                     "python -m benchmarks.run --only generation" + (" --quick" if quick else ""))
