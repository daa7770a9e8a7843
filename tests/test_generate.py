"""KV-cached decoding against a naive reference that re-runs the whole ICLM on the growing sequence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iclm_jax import generate as gen
from iclm_jax.model.router import Router
from tests.helpers import VOCAB, nonzero_lora_b, tiny_iclm

PROMPTS = [[5, 9, 2], [7, 1, 30, 4, 4, 11, 3], [12], [8, 8, 20, 6, 2]]   # different lengths
N = 6


def _forward(model, module=None):
    """Jitted full forward of the whole model (or one module alone) -> logits [B, L, V]."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, batch, module):
        m = nnx.merge(graphdef, state)
        return m(batch, train=False).logits if module is None else m.module_logits(batch, module)
    return lambda batch: np.asarray(f(state, batch, None if module is None else jnp.int32(module)))


def _batch(seqs, n_prompt, width, domain):
    """Right-padded batch of the sequences; only the first n_prompt[i] tokens count for routing."""
    b = len(seqs)
    inputs = np.zeros((b, width), np.int32)
    segments = np.zeros((b, width), np.int32)
    prompt_mask = np.zeros((b, width), np.float32)
    for i, s in enumerate(seqs):
        inputs[i, :len(s)], segments[i, :len(s)], prompt_mask[i, :n_prompt[i]] = s, 1, 1
    return dict(inputs=inputs, segments=segments, prompt_mask=prompt_mask,
                positions=np.tile(np.arange(width, dtype=np.int32), (b, 1)),
                domain=np.asarray(domain if domain is not None else [-1] * b, np.int32))


def reference(model, prompts, n, *, domain=None, module=None, forced=None, eos_id=None, pad_id=0):
    """Re-run the full model on prompt + tokens so far each step; argmax (or ``forced``) at the last
    real position. Returns (tokens [B, n], logits [B, n, V], NaN after a row's EOS)."""
    f = _forward(model, module)
    lens = [len(p) for p in prompts]
    seqs = [list(p) for p in prompts]
    width = max(lens) + n
    tokens = np.full((len(prompts), n), pad_id, np.int32)
    logits = np.full((len(prompts), n, VOCAB), np.nan, np.float32)
    done = [False] * len(prompts)
    for t in range(n):
        full = f(_batch(seqs, lens, width, domain))
        for i, s in enumerate(seqs):
            if done[i]:
                continue
            logits[i, t] = full[i, len(s) - 1]
            tok = int(np.argmax(logits[i, t])) if forced is None else int(forced[i, t])
            tokens[i, t] = tok
            s.append(tok)
            done[i] = tok == eos_id
    return tokens, logits


def _check_against_reference(model, domain=None, module=None):
    got = gen.decode(model, PROMPTS, max_new_tokens=N, eos_id=None, pad_id=0, domain=domain,
                     module=module, return_logits=True)
    want_tokens, want_logits = reference(model, PROMPTS, N, domain=domain, module=module)
    np.testing.assert_array_equal(got.tokens, want_tokens)
    np.testing.assert_allclose(got.logits, want_logits, atol=1e-5, rtol=0)
    return got


@pytest.mark.parametrize("kw", [
    dict(num_modules=2),                                                       # invariant + concat
    dict(num_modules=1, invariant=False),                                      # single-module baseline
    dict(num_modules=3, router={"mode": "soft"}, router_source="adapter", aggregator="probs"),
    dict(num_modules=2, base_kw=dict(canon=3)),     # the cache keeps token ids for the canon layer
], ids=["k2-concat", "k1-baseline", "soft-adapter-probs", "k2-canon"])
def test_greedy_cached_equals_full_recompute(kw):
    _check_against_reference(nonzero_lora_b(tiny_iclm(**kw)))


def test_oracle_rows_use_their_own_modules():
    model = nonzero_lora_b(tiny_iclm(num_modules=2, router={"mode": "oracle"}))
    got = _check_against_reference(model, domain=[0, 1, 1, 0])
    np.testing.assert_array_equal(got.module, [0, 1, 1, 0])
    flipped = gen.decode(model, PROMPTS, max_new_tokens=N, eos_id=None, pad_id=0, domain=[1, 0, 0, 1],
                         return_logits=True)
    assert np.abs(flipped.logits - got.logits).max() > 1e-3            # the modules really differ


@pytest.mark.parametrize("module", [0, 2, -1])                           # specific, invariant, bare base
def test_module_generate_equals_that_module_alone(module):
    model = nonzero_lora_b(tiny_iclm(num_modules=2))
    got = _check_against_reference(model, module=module)
    np.testing.assert_array_equal(got.module, [module] * len(PROMPTS))
    tokens = gen.module_generate(model, PROMPTS, module, max_new_tokens=N, eos_id=None, pad_id=0)
    np.testing.assert_array_equal(tokens, got.tokens)


def test_router_runs_once_on_the_prompt(monkeypatch):
    model = nonzero_lora_b(tiny_iclm(num_modules=3))
    # Codes at three rows' own pooled prompts, so routing is 0, 1, 2 for them (not all one module).
    prompt_batch = _batch(PROMPTS, [len(p) for p in PROMPTS], 8, None)
    graphdef = nnx.graphdef(model)
    full = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch, train=False))
    pooled = np.asarray(full(nnx.state(model), prompt_batch).pooled_inv)
    model.router.codebook[...] = jnp.asarray(pooled[[2, 0, 1]])
    want = np.asarray(full(nnx.state(model), prompt_batch).route.index)
    np.testing.assert_array_equal(want[:3], [1, 2, 0])

    calls = []
    original = Router.__call__

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)
    monkeypatch.setattr(Router, "__call__", counting)
    jax.clear_caches()                 # force a trace, so every router call in the program is seen
    got = gen.decode(model, PROMPTS, max_new_tokens=N, eos_id=None, pad_id=0)
    assert gen._run._cache_size() == 1              # one compiled program, the router called once in it
    assert len(calls) == 1
    np.testing.assert_array_equal(got.module, want)
    np.testing.assert_array_equal(got.tokens, reference(model, PROMPTS, N)[0])


def test_eos_row_pads_afterwards():
    model = nonzero_lora_b(tiny_iclm(num_modules=2))
    free = gen.generate(model, PROMPTS, max_new_tokens=N, eos_id=None, pad_id=0)
    eos = int(free[1, 0])
    got = gen.generate(model, PROMPTS, max_new_tokens=N, eos_id=eos, pad_id=0)
    want, _ = reference(model, PROMPTS, N, eos_id=eos, pad_id=0)
    np.testing.assert_array_equal(got, want)
    assert got[1, 0] == eos and (got[1, 1:] == 0).all()
    for i in range(len(PROMPTS)):                       # identical to the free run up to the first EOS
        hits = np.flatnonzero(free[i] == eos)
        stop = hits[0] + 1 if hits.size else N
        np.testing.assert_array_equal(got[i, :stop], free[i, :stop])
        assert (got[i, stop:] == 0).all()


def test_sampling_is_deterministic_and_respects_top_k():
    model = nonzero_lora_b(tiny_iclm(num_modules=2))
    kw = dict(max_new_tokens=N, eos_id=None, pad_id=0, temperature=1.5, top_k=3, return_logits=True)
    a = gen.decode(model, PROMPTS, rng=7, **kw)
    b = gen.decode(model, PROMPTS, rng=jax.random.key(7), **kw)
    c = gen.decode(model, PROMPTS, rng=8, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    _, want_logits = reference(model, PROMPTS, N, forced=a.tokens)
    np.testing.assert_allclose(a.logits, want_logits, atol=1e-5, rtol=0)
    top3 = np.argsort(-want_logits, axis=-1)[..., :3]
    assert (a.tokens[..., None] == top3).any(-1).all()
    assert (a.tokens != np.argmax(want_logits, -1)).any()                         # not just greedy


def test_sampling_follows_the_tempered_top_k_softmax():
    """4000 rows of one prompt, one token each: frequencies = softmax(logits / T) renormalised over
    the top k (closed form, NumPy), zero outside it."""
    model = nonzero_lora_b(tiny_iclm(num_modules=2))
    n, temp, k = 4000, 0.7, 5
    got = gen.decode(model, [PROMPTS[1]] * n, max_new_tokens=1, eos_id=None, pad_id=0,
                     temperature=temp, top_k=k, rng=3, return_logits=True)
    z = got.logits[0, 0].astype(np.float64) / temp
    keep = np.argsort(-z)[:k]
    p = np.zeros(VOCAB)
    p[keep] = np.exp(z[keep] - z[keep].max()) / np.exp(z[keep] - z[keep].max()).sum()
    freq = np.bincount(got.tokens[:, 0], minlength=VOCAB) / n
    assert freq[p == 0].sum() == 0
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n))


def test_decode_step_compiles_once():
    model = nonzero_lora_b(tiny_iclm(num_modules=2))
    kw = dict(eos_id=None, pad_id=0)
    longest = gen.generate(model, PROMPTS, max_new_tokens=7, **kw)
    before = gen._run._cache_size()
    for n in range(3, 8):
        np.testing.assert_array_equal(gen.generate(model, PROMPTS, max_new_tokens=n, **kw), longest[:, :n])
    gen.generate(model, [p[:-1] or [3] for p in PROMPTS], max_new_tokens=4, **kw)   # same shape bucket
    gen.generate(nonzero_lora_b(tiny_iclm(num_modules=2), seed=5), PROMPTS, max_new_tokens=4, **kw)
    assert gen._run._cache_size() == before


def test_padded_batch_input_equals_token_lists():
    model = nonzero_lora_b(tiny_iclm(num_modules=2, router={"mode": "oracle"}))
    batch = _batch(PROMPTS, [len(p) for p in PROMPTS], 9, [1, 0, 1, 1])
    got = gen.generate(model, batch, max_new_tokens=4, eos_id=None, pad_id=0)
    want = gen.generate(model, PROMPTS, max_new_tokens=4, eos_id=None, pad_id=0, domain=[1, 0, 1, 1])
    np.testing.assert_array_equal(got, want)


def test_transformer_extend_in_chunks_equals_full_forward():
    """Prefill 4 (row 1: 3 real + 1 pad that the next token overwrites), then 3 single steps."""
    graphdef, state = nnx.split(nonzero_lora_b(tiny_iclm(num_modules=2)).base)
    rng = np.random.default_rng(0)
    lengths = np.array([9, 6])
    inputs = rng.integers(1, VOCAB, size=(2, 9)).astype(np.int32)
    segments = (np.arange(9)[None] < lengths[:, None]).astype(np.int32)
    steps = np.stack([inputs[0, 4:7], inputs[1, 3:6]], axis=1)      # [3, 2]: row 1 from its own length

    @jax.jit
    def run(state, inputs, segments, steps):
        base = nnx.merge(graphdef, state)
        adapter = jnp.array([0, 2], jnp.int32)
        want = base(inputs * segments, jnp.tile(jnp.arange(9), (2, 1)), segments, adapter)
        x, cache = base.extend(inputs[:, :4], base.init_cache(2, 12), adapter, num_new=jnp.array([4, 3]))
        parts, seen = [x], [cache.lengths]
        for tok in steps:
            x, cache = base.extend(tok[:, None], cache, adapter)
            parts.append(x)
            seen.append(cache.lengths)
        return want, jnp.concatenate(parts, axis=1), jnp.stack(seen)

    want, got, seen = map(np.asarray, run(state, inputs, segments, steps))
    np.testing.assert_array_equal(seen, [[4, 3], [5, 4], [6, 5], [7, 6]])
    np.testing.assert_allclose(got[0], want[0, :7], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.concatenate([got[1, :3], got[1, 4:]]), want[1, :6], atol=1e-5, rtol=0)


def test_bad_inputs_are_refused_by_name():
    model = tiny_iclm(num_modules=2)
    kw = dict(max_new_tokens=2, eos_id=None, pad_id=0)
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty"):
        gen.generate(model, [[1, 2], []], **kw)
    with pytest.raises(ValueError, match=f"prompt 0 has token ids outside \\[0, {VOCAB}\\)"):
        gen.generate(model, [[1, VOCAB]], **kw)
    with pytest.raises(ValueError, match="row 0 is not right-padded"):
        gen.generate(model, dict(inputs=np.ones((1, 3), np.int32), segments=np.array([[0, 1, 1]])), **kw)
    with pytest.raises(ValueError, match="needs rng"):
        gen.generate(model, [[1, 2]], temperature=1.0, **kw)
    with pytest.raises(ValueError, match="module=3"):
        gen.module_generate(model, [[1, 2]], 3, **kw)
    with pytest.raises(ValueError, match="oracle' needs domain"):
        gen.generate(tiny_iclm(num_modules=2, router={"mode": "oracle"}), [[1, 2]], **kw)
