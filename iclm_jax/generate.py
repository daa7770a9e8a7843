"""Batched, jitted ICLM decoding with a KV cache per active module.

The original code re-feeds the whole sequence for every new token. Here each prompt is run once
(prefill): first by the invariant module, whose prompt-pooled state the router reads — once per
prompt, so a row keeps its specific module for the whole continuation — then by the routed specific
module (per-row adapter). Each new token then costs one step of every active module over its own
cache. The active modules' rows are stacked on the batch axis of one ``KVCache`` (rows ``s*B..``
belong to module stream ``s``), so a decode step is one pass over the base weights, which is what
bounds decoding speed. Next-token logits are ``ICLM.heads`` applied to the streams' last hidden
states only (never a [B, L, vocab] prefill tensor), exactly as ``ICLM.__call__`` computes them for the
last position.

Prompts are right-padded (the ``KVCache`` convention: RoPE position = slot). The prompt width and
the number of new tokens are rounded up to multiples of ``pad_multiple`` and ``max_new_tokens`` is a
traced value, so one compilation serves every call in the same bucket; the token loop is a
``lax.while_loop`` (one compiled decode step) that stops once every row has emitted EOS.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iclm_jax.model.iclm import ICLM
from iclm_jax.model.transformer import KVCache
from iclm_jax.padding import round_up


class Generation(NamedTuple):
    tokens: np.ndarray           # int32 [B, N]; EOS is emitted, pad_id after it
    module: np.ndarray           # int32 [B] specific module each row was routed to (or the module asked for)
    logits: np.ndarray | None    # float32 [B, N, V] logits each token was chosen from (return_logits)


def generate(model: ICLM, prompts, *, max_new_tokens: int, eos_id: int | None, pad_id: int,
             temperature: float = 0.0, top_k: int = 0, rng: Any = None, domain=None,
             pad_multiple: int = 16) -> np.ndarray:
    """Continue each prompt with the whole ICLM -> int32 [B, max_new_tokens] (see ``decode``)."""
    return decode(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                  temperature=temperature, top_k=top_k, rng=rng, domain=domain,
                  pad_multiple=pad_multiple).tokens


def module_generate(model: ICLM, prompts, module: int, *, max_new_tokens: int, eos_id: int | None,
                    pad_id: int, temperature: float = 0.0, top_k: int = 0, rng: Any = None,
                    pad_multiple: int = 16) -> np.ndarray:
    """Continue each prompt with one module alone (its adapter on the base head, as
    ``ICLM.module_logits``): per-module evaluation and export checks. ``module`` is an adapter
    slot (0..K-1 specific, K invariant) or -1 for the bare base."""
    return decode(model, prompts, module=module, max_new_tokens=max_new_tokens, eos_id=eos_id,
                  pad_id=pad_id, temperature=temperature, top_k=top_k, rng=rng,
                  pad_multiple=pad_multiple).tokens


def decode(model: ICLM, prompts, *, max_new_tokens: int, eos_id: int | None, pad_id: int,
           temperature: float = 0.0, top_k: int = 0, rng: Any = None, domain=None,
           module: int | None = None, return_logits: bool = False,
           pad_multiple: int = 16, route=None) -> Generation:
    """Greedy (``temperature == 0``) or sampled decoding of a batch of prompts.

    ``prompts``: a list of token-id lists, a 2-D int array of full rows, or a batch dict with
    ``inputs`` and ``segments`` (right-padded, segments 0/1; its ``domain`` is used unless
    ``domain`` is given — oracle routing needs one). Sampling draws from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits (0 = all), with
    key ``fold_in(rng, step)``; ``rng`` is a PRNG key or an int seed. ``eos_id`` None: no stop.
    ``module`` None runs the whole ICLM, an int one module alone (``module_generate``).
    ``route`` (int [B], with the whole ICLM): the specific module each row is forced to, an
    intervention (``intervene.py``); the router is then not run at all.
    """
    cfg = model.cfg
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"decode: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"decode: temperature must be >= 0, got {temperature!r}")
    if not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= cfg.base.vocab_size:
        raise ValueError(f"decode: top_k must be an int in [0, vocab_size={cfg.base.vocab_size}], "
                         f"got {top_k!r}")
    if not isinstance(pad_multiple, int) or pad_multiple < 1:
        raise ValueError(f"decode: pad_multiple must be an int >= 1, got {pad_multiple!r}")
    num_modules = cfg.num_modules + int(cfg.invariant)
    if module is not None and not -1 <= module < num_modules:
        raise ValueError(f"decode: module={module} must be in [-1, {num_modules}) "
                         f"(K={cfg.num_modules} specific, invariant={cfg.invariant})")
    if route is not None and module is not None:
        raise ValueError("decode: route forces the whole ICLM's specific module; it cannot go with module")
    greedy = temperature == 0
    if not greedy and rng is None:
        raise ValueError("decode: temperature > 0 needs rng (a PRNG key or an int seed)")
    key = jax.random.key(0) if rng is None else (
        jax.random.key(int(rng)) if isinstance(rng, (int, np.integer)) else rng)

    inputs, lengths, batch_domain = _prompt_arrays(prompts, cfg.base.vocab_size, pad_multiple)
    domain = batch_domain if domain is None else np.asarray(domain, np.int32).reshape(-1)
    if domain is not None and domain.shape != lengths.shape:
        raise ValueError(f"decode: domain has shape {domain.shape}, expected ({lengths.shape[0]},)")
    if route is not None:
        route = np.asarray(route)
        if (route.shape != lengths.shape or not np.issubdtype(route.dtype, np.integer)
                or not ((0 <= route) & (route < cfg.num_modules)).all()):
            raise ValueError(f"decode: route must be one int per prompt in [0, {cfg.num_modules}), "
                             f"got {route.tolist()}")
    n_cap = round_up(max_new_tokens, pad_multiple)
    graphdef, state = nnx.split(model)
    tokens, routed, logits = _run(
        graphdef, state, jnp.asarray(inputs), jnp.asarray(lengths),
        None if domain is None else jnp.asarray(domain), jnp.int32(max_new_tokens),
        jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id),
        jnp.float32(temperature if not greedy else 1.0), key, jnp.int32(-1 if module is None else module),
        single=module is not None, greedy=greedy, top_k=int(top_k), n_cap=n_cap, want_logits=return_logits,
        route=None if route is None else jnp.asarray(route, jnp.int32))
    n = max_new_tokens
    return Generation(np.asarray(tokens)[:, :n], np.asarray(routed),
                      None if logits is None else np.asarray(logits)[:, :n])


# ---------------------------------------------------------------------------- host-side inputs
def _prompt_arrays(prompts, vocab: int, multiple: int):
    """-> right-padded inputs int32 [B, P] (P a multiple of ``multiple``), lengths [B], domain|None."""
    domain = None
    if isinstance(prompts, dict):
        if "inputs" not in prompts or "segments" not in prompts:
            raise ValueError(f"decode: a prompt batch needs 'inputs' and 'segments', got {sorted(prompts)}")
        ids, seg = np.asarray(prompts["inputs"]), np.asarray(prompts["segments"])
        if ids.ndim != 2 or seg.shape != ids.shape:
            raise ValueError(f"decode: batch inputs {ids.shape} and segments {seg.shape} must be one [B, L]")
        if not np.isin(seg, (0, 1)).all():
            raise ValueError("decode: batch segments must be 0/1 (packed queries cannot be continued)")
        lengths = seg.sum(axis=1)
        right = np.arange(ids.shape[1])[None] < lengths[:, None]
        bad = np.flatnonzero((right != (seg == 1)).any(axis=1))
        if bad.size:
            raise ValueError(f"decode: batch row {bad[0]} is not right-padded "
                             f"(segments {seg[bad[0]].tolist()})")
        rows: Sequence = [ids[i, :n] for i, n in enumerate(lengths)]
        if prompts.get("domain") is not None:
            domain = np.asarray(prompts["domain"], np.int32).reshape(-1)
    elif isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        rows = list(prompts)
    else:
        rows = [np.asarray(p) for p in prompts]
    if not rows:
        raise ValueError("decode: no prompts")
    for i, r in enumerate(rows):
        r = np.asarray(r)
        if r.ndim != 1 or r.size == 0:
            raise ValueError(f"decode: prompt {i} must be a non-empty 1-D token list, got shape {r.shape}")
        if not np.issubdtype(r.dtype, np.integer) or r.min() < 0 or r.max() >= vocab:
            raise ValueError(f"decode: prompt {i} has token ids outside [0, {vocab}): {r.tolist()}")
    lengths = np.asarray([len(r) for r in rows], np.int32)
    width = round_up(int(lengths.max()), multiple)
    inputs = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        inputs[i, :len(r)] = r
    return inputs, lengths, domain


# ---------------------------------------------------------------------------- jitted core
def _select(logits: jax.Array, key: jax.Array, greedy: bool, temperature: jax.Array,
            top_k: int) -> jax.Array:
    """Next token [B] from float32 logits [B, V]."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _prefill(model: ICLM, inputs, lengths, domain, module: jax.Array | None, max_len: int,
             forced: jax.Array | None = None):
    """Run the prompts through every active module stream (``forced`` [B]: each row's specific module,
    chosen without the router).

    -> (cache over S*B rows, adapter [S*B], last hidden [S*B, 1, d], combine, routed module [B]);
    ``combine`` maps the S streams' hidden states [B, T, d] to the model's logits [B, T, V].
    """
    base, cfg = model.base, model.cfg
    b, p = inputs.shape
    full = lambda m: jnp.full((b,), m, jnp.int32)  # noqa: E731

    def run(adapter):
        return base.extend(inputs, base.init_cache(b, max_len), adapter, num_new=lengths)

    if module is not None:
        adapters, weights, routed = [full(module)], None, full(module)
        outs = [run(adapters[0])]
    else:
        segments = (jnp.arange(p)[None, :] < lengths[:, None]).astype(jnp.int32)
        batch = dict(inputs=inputs, segments=segments, prompt_mask=segments.astype(jnp.float32),
                     positions=jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p)), domain=domain)
        adapters, outs, x_inv = [], [], None
        if cfg.invariant:
            adapters.append(full(cfg.invariant_slot))
            outs.append(run(adapters[-1]))
            x_inv = outs[-1][0]
        if forced is not None:      # an intervention: one-hot weights, so one stream is the same sum
            spec, weights, routed = [forced], None, forced
        else:
            route = model.route(batch, x_inv, train=False)          # the only router call
            soft = cfg.router.mode == "soft" and model.router is not None
            spec = [full(m) for m in range(cfg.num_modules)] if soft else [route.index]
            weights, routed = (route.weights if soft else None), route.index
        for a in spec:
            adapters.append(a)
            outs.append(run(a))

    def combine(xs):
        if module is not None:
            return base.logits(xs[0])
        specs = xs[1:] if cfg.invariant else xs
        if weights is None:
            x_spec = specs[0]
        else:   # soft routing: the same weighted sum as ICLM.__call__
            x_spec = sum(weights[:, m, None, None] * specs[m] for m in range(cfg.num_modules))
        return model.heads(xs[0] if cfg.invariant else None, x_spec, aux=False)["logits"]

    last = jnp.concatenate([x[jnp.arange(b), lengths - 1][:, None] for x, _ in outs], axis=0)
    cache = KVCache.concat([c for _, c in outs])
    return cache, jnp.concatenate(adapters), last, combine, routed


def _core(graphdef, state, inputs, lengths, domain, max_new, eos_id, pad_id, temperature, key,
          module, *, single: bool, greedy: bool, top_k: int, n_cap: int, want_logits: bool, route=None):
    """The whole decode; ``module`` (traced, so every module shares one compile) is used iff ``single``;
    ``route`` (traced [B], or None: the router) forces each row's specific module."""
    model: ICLM = nnx.merge(graphdef, state)
    base = model.base
    b, p = inputs.shape
    cache, adapter, last, combine, routed = _prefill(model, inputs, lengths, domain,
                                                     module if single else None, p + n_cap, route)
    streams = adapter.shape[0] // b
    split = lambda x: [x[s * b:(s + 1) * b] for s in range(streams)]  # noqa: E731

    logits0 = combine(split(last))[:, 0]
    tok0 = _select(logits0, jax.random.fold_in(key, 0), greedy, temperature, top_k)
    out = jnp.full((b, n_cap), pad_id, jnp.int32).at[:, 0].set(tok0)
    lbuf = (jnp.zeros((b, n_cap, logits0.shape[-1]), jnp.float32).at[:, 0].set(logits0)
            if want_logits else None)

    def cond(carry):
        t, _, done, _, _, _ = carry
        return (t < max_new) & ~jnp.all(done)

    def step(carry):
        t, tok, done, cache, out, lbuf = carry
        x, cache = base.extend(jnp.tile(tok, streams)[:, None], cache, adapter)
        logits = combine(split(x))[:, 0]
        nxt = _select(logits, jax.random.fold_in(key, t), greedy, temperature, top_k)
        nxt = jnp.where(done, pad_id, nxt)
        out = out.at[:, t].set(nxt)
        if lbuf is not None:
            lbuf = lbuf.at[:, t].set(logits)
        return t + 1, nxt, done | (nxt == eos_id), cache, out, lbuf

    carry = (jnp.int32(1), tok0, tok0 == eos_id, cache, out, lbuf)
    _, _, _, _, out, lbuf = jax.lax.while_loop(cond, step, carry)
    return out, routed, lbuf


_run = jax.jit(_core, static_argnames=("graphdef", "single", "greedy", "top_k", "n_cap", "want_logits"))
