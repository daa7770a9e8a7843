"""VQ router: pooling, k-means++, EMA / gradient codebooks, routing modes, jit-purity of state."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import iclm_jax  # noqa: F401  (eager sharding off before any Variable is built)
from iclm_jax.model.codebook import kmeans_plus_plus, purity
from iclm_jax.model.router import Router, RouterStat, pool_prompt


# ----------------------------------------------------------------------------- helpers
def blobs(rng: np.random.Generator, means: np.ndarray, n: int, std: float):
    labels = rng.integers(0, len(means), n)
    x = means[labels] + std * rng.standard_normal((n, means.shape[1]))
    return x.astype(np.float32), labels


def make_train_step(graphdef, counter: list | None = None):
    """The functional NNX pattern: merge -> call -> split inside jax.jit."""
    @jax.jit
    def step(state, e, valid):
        if counter is not None:
            counter.append(1)
        r = nnx.merge(graphdef, state)
        out = r(e, train=True, valid=valid)
        return nnx.split(r)[1], out
    return step


def _raw(x) -> np.ndarray:
    return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def tree_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(_raw(x), _raw(y)) for x, y in zip(la, lb))


def sqdist_np(x, c):
    return ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)


# ----------------------------------------------------------------------------- pooling
def test_pool_prompt_matches_numpy_and_ignores_other_tokens():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((4, 9, 5)).astype(np.float32)
    mask = (rng.random((4, 9)) < 0.5).astype(np.float32)
    mask[2] = 0.0                                   # a row without prompt tokens
    mask[3] = 1.0
    ref = np.zeros((4, 5), np.float64)
    for b in range(4):
        if mask[b].sum() > 0:
            ref[b] = h[b][mask[b] > 0].astype(np.float64).mean(0)
    out = pool_prompt(jnp.asarray(h), jnp.asarray(mask))
    assert out.dtype == jnp.float32 and out.shape == (4, 5)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(out)[2] == 0.0)
    # Padding / answer positions may hold anything: the result is bit-identical.
    h2 = np.where(mask[..., None] > 0, h, 1e6 * rng.standard_normal(h.shape)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(pool_prompt(jnp.asarray(h2), jnp.asarray(mask))),
                                  np.asarray(out))
    with pytest.raises(ValueError, match="prompt_mask"):
        pool_prompt(jnp.asarray(h), jnp.asarray(mask[:, :3]))


# ----------------------------------------------------------------------------- k-means++
def test_kmeans_pp_picks_one_point_per_blob():
    rng = np.random.default_rng(1)
    means = np.array([[50, 0, 0], [-50, 0, 0], [0, 50, 0], [0, 0, -50]], np.float32)
    x, labels = blobs(rng, means, 200, 0.5)
    km = jax.jit(kmeans_plus_plus, static_argnums=2)
    for seed in range(8):
        c = np.asarray(km(jax.random.key(seed), jnp.asarray(x), 4))
        rows = [int(np.flatnonzero((x == ci).all(1))[0]) for ci in c]   # every pick is a row of x
        assert sorted(labels[rows].tolist()) == [0, 1, 2, 3]


def test_kmeans_pp_sampling_distribution_matches_d2():
    x = np.array([[0.0], [1.0], [3.0], [7.0]], np.float32)
    n = 20000
    picks = jax.jit(jax.vmap(lambda k: kmeans_plus_plus(k, jnp.asarray(x), 2)))(
        jax.random.split(jax.random.key(0), n))
    idx = np.searchsorted(x[:, 0], np.asarray(picks)[..., 0])
    emp = np.zeros((4, 4))
    np.add.at(emp, (idx[:, 0], idx[:, 1]), 1.0 / n)
    d2 = (x - x.T) ** 2
    ref = 0.25 * d2 / d2.sum(1, keepdims=True)            # P(first=i) P(second=j | i) ∝ D²
    np.testing.assert_allclose(emp.sum(1), 0.25, atol=0.015)   # first pick uniform
    np.testing.assert_allclose(emp, ref, atol=0.015)
    # A mask restricts every pick to the valid rows.
    m = jnp.asarray([1.0, 0.0, 1.0, 0.0])
    pm = jax.vmap(lambda k: kmeans_plus_plus(k, jnp.asarray(x), 2, mask=m))(
        jax.random.split(jax.random.key(1), 200))
    assert set(np.unique(np.asarray(pm))) == {0.0, 3.0}


# ----------------------------------------------------------------------------- EMA codebook
def test_ema_converges_to_blob_means_with_purity_one():
    k, d = 4, 8
    rng = np.random.default_rng(2)
    means = (6.0 * rng.standard_normal((k, d))).astype(np.float32)
    r = Router(d, k, ema_decay=0.9, rngs=nnx.Rngs(router=3, params=4))
    graphdef, state = nnx.split(r)
    step = make_train_step(graphdef)
    ones = jnp.ones((64,))
    for _ in range(80):
        x, _ = blobs(rng, means, 64, 0.2)
        state, _ = step(state, jnp.asarray(x), ones)
    r = nnx.merge(graphdef, state)
    codes = np.asarray(r.codebook[...])
    match = sqdist_np(codes, means).argmin(1)
    assert sorted(match.tolist()) == list(range(k))
    np.testing.assert_allclose(codes, means[match], atol=0.05)
    x, labels = blobs(rng, means, 256, 0.2)
    out = r(jnp.asarray(x))
    assert purity(np.asarray(out.index), labels, k, k) == 1.0
    np.testing.assert_allclose(np.asarray(r.usage[...]), np.bincount(labels, minlength=k) / 256,
                               atol=0.1)


def test_ema_counts_follow_documented_recurrence():
    g, eps, k = 0.5, 1e-3, 2
    r = Router(2, k, ema_decay=g, eps=eps, dead_threshold=0.0, rngs=nnx.Rngs(router=0, params=1))
    x1 = np.array([[0, 0], [0, 0], [0, 0], [4, 4]], np.float32)   # k-means++ must pick both
    x2 = np.array([[0.5, 0], [3, 4], [4, 5], [1, 1], [99, 99]], np.float32)
    v2 = np.array([1, 1, 1, 1, 0], np.float32)                      # last row is padding
    r(jnp.asarray(x1), train=True)
    perm = np.argsort(np.asarray(r.codebook[...])[:, 0])            # code order chosen by k-means++
    init = np.array([[0, 0], [4, 4]], np.float64)[np.argsort(perm)]

    def ema(n_prev, m_prev, codes, x, v):
        hard = np.eye(k)[sqdist_np(x, codes).argmin(1)] * v[:, None]
        n = g * n_prev + (1 - g) * hard.sum(0)
        m = g * m_prev + (1 - g) * hard.T @ x
        smoothed = (n + eps) / (n.sum() + k * eps) * n.sum()
        return n, m, m / smoothed[:, None]

    def removal_cost(cost_prev, codes, x, v):        # EMA of Σ (d² second-nearest − d² nearest)
        dist = np.sort(sqdist_np(x, codes), axis=1)
        r = np.bincount(sqdist_np(x, codes).argmin(1), weights=(dist[:, 1] - dist[:, 0]) * v, minlength=k)
        return g * cost_prev + (1 - g) * r

    share = 4 / k
    cost = removal_cost(np.zeros(k), init, x1, np.ones(4))
    n, m, codes = ema(np.full(k, share), share * init, init, x1, np.ones(4))
    np.testing.assert_allclose(np.asarray(r.counts[...]), n, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r.ema_sums[...]), m, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r.codebook[...]), codes, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r.removal_cost[...]), cost, rtol=1e-6)
    out = r(jnp.asarray(x2), train=True, valid=jnp.asarray(v2))
    np.testing.assert_allclose(np.asarray(out.distances), sqdist_np(x2, codes), rtol=1e-6)
    cost = removal_cost(cost, codes, x2, v2)
    n, m, codes = ema(n, m, codes, x2, v2)
    np.testing.assert_allclose(np.asarray(r.counts[...]), n, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r.ema_sums[...]), m, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r.codebook[...]), codes, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r.removal_cost[...]), cost, rtol=1e-6)
    # Each code's rows are identical (step 1) or two, one of which gives u (step 2): no split gains.
    np.testing.assert_array_equal(np.asarray(r.split_gain[...]), 0.0)
    assert int(r.relocations[...]) == 0


@pytest.mark.parametrize("relocate", [False, True])
def test_dead_code_is_relocated_by_splitting_another(relocate):
    """A code moved far from the data (its blob's rows go to a neighbour, which then covers two blobs) is
    relocated onto a split of that neighbour: by the count rule (N_i < dead_threshold · share) alone, or
    earlier by the cost rule (its EMA removal cost falls below the neighbour's split gain)."""
    k, d, b, g = 3, 4, 32, 0.9
    rng = np.random.default_rng(5)
    means = (5.0 * rng.standard_normal((k, d))).astype(np.float32)
    r = Router(d, k, ema_decay=g, dead_threshold=0.5, relocate=relocate, rngs=nnx.Rngs(router=1, params=2))
    r(jnp.asarray(blobs(rng, means, b, 0.3)[0]), train=True)
    far = np.full((d,), 1000.0, np.float32)
    r.codebook[...] = r.codebook[...].at[2].set(far)
    r.ema_sums[...] = r.ema_sums[...].at[2].set(far * r.counts[...][2])
    graphdef, state = nnx.split(r)
    step = make_train_step(graphdef)
    relocated = None
    for t in range(40):
        x = blobs(rng, means, b, 0.3)[0]
        before = nnx.merge(graphdef, state)
        old_codes, old_counts = np.asarray(before.codebook[...]), np.asarray(before.counts[...])
        state, _ = step(state, jnp.asarray(x), jnp.ones((b,)))
        after = nnx.merge(graphdef, state)
        codes = np.asarray(after.codebook[...])
        if relocated is None and np.abs(codes[2]).max() < 100:
            relocated = t
            assert int(after.relocations[...]) == 1
            # The split code j moved to the other half along the same line through its old place.
            j = int(np.argmax(np.abs(codes[:2] - old_codes[:2]).sum(1)))
            a, c = codes[2] - old_codes[j], codes[j] - old_codes[j]
            assert abs(a @ c) == pytest.approx(np.linalg.norm(a) * np.linalg.norm(c), rel=1e-4)
            assert a @ c < 0 or np.linalg.norm(a) > np.linalg.norm(c)      # two different sides
            # The two halves share j's EMA count; code 2's own count is dropped.
            total = g * (old_counts.sum() - old_counts[2]) + (1 - g) * b      # code 2 had no row
            assert float(after.counts[...].sum()) == pytest.approx(total, rel=1e-5)
    assert int(nnx.merge(graphdef, state).relocations[...]) == 1
    # Count rule: 1000-away code, 0.9^t < 0.5 first at t = 7 (counted from the decay start);
    # cost rule: as soon as the merged neighbour's split gain exceeds the code's decaying cost.
    assert relocated is not None and (relocated <= 3 if relocate else 5 <= relocated <= 8)
    # The split lands one code per blob.
    codes = np.asarray(nnx.merge(graphdef, state).codebook[...])
    assert sorted(sqdist_np(codes, means).argmin(1).tolist()) == [0, 1, 2]
    assert sqdist_np(codes, means).min(1).max() < 1.0


# ----------------------------------------------------------------------------- gradient codebook
def test_gradient_mode_loss_grad_and_param_split():
    k, d, beta = 3, 4, 0.25
    rng = np.random.default_rng(6)
    r = Router(d, k, update="gradient", commitment=beta, rngs=nnx.Rngs(router=0, params=1))
    assert "codebook" in nnx.state(r, nnx.Param)
    assert "codebook" not in nnx.state(Router(d, k, rngs=nnx.Rngs(0)), nnx.Param)
    x = rng.standard_normal((10, d)).astype(np.float32)
    r(jnp.asarray(x), train=True)                       # k-means++ init of the Param
    assert bool(r.initialized[...])
    codes = np.asarray(r.codebook[...]).astype(np.float64)
    x = rng.standard_normal((10, d)).astype(np.float32)
    a = sqdist_np(x, codes).argmin(1)
    diff = x - codes[a]
    out = r(jnp.asarray(x))
    np.testing.assert_allclose(float(out.vq_loss), (1 + beta) * (diff ** 2).sum(1).mean(),
                               rtol=1e-5)

    gc = nnx.grad(lambda m: m(jnp.asarray(x)).vq_loss)(r)["codebook"][...]
    ref = np.zeros_like(codes)
    for j in range(k):
        ref[j] = 2.0 / len(x) * (codes[j] - x[a == j]).sum(0)     # only ||sg(e) - c||² reaches c
    np.testing.assert_allclose(np.asarray(gc), ref, rtol=1e-5, atol=1e-6)
    moved = codes - 0.1 * np.asarray(gc)
    for j in set(a.tolist()):                       # a descent step pulls codes to their points
        pts = x[a == j]
        assert sqdist_np(pts, moved[j:j + 1]).sum() < sqdist_np(pts, codes[j:j + 1]).sum()
    ge = jax.grad(lambda e: r(e).vq_loss)(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ge), 2 * beta / len(x) * diff, rtol=1e-5, atol=1e-6)


def test_perplexity_closed_form_and_ema_vq_loss():
    k = 4
    r = Router(2, k, commitment=0.5, rngs=nnx.Rngs(0))
    codes = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], np.float32)
    r.codebook[...] = jnp.asarray(codes)
    assert float(r(jnp.asarray(codes)).perplexity) == pytest.approx(k, rel=1e-6)
    assert float(r(jnp.asarray(np.repeat(codes[:1], 5, 0))).perplexity) == pytest.approx(1.0)
    x = codes[[0, 0, 0, 1]] + 0.1
    p = np.array([0.75, 0.25])
    out = r(jnp.asarray(x))
    assert float(out.perplexity) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert float(out.vq_loss) == pytest.approx(0.5 * 0.02, rel=1e-5)   # ema: commitment only


# ----------------------------------------------------------------------------- routing modes
def test_soft_gumbel_oracle_modes():
    k, d, t = 3, 5, 2.0
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((6, d)).astype(np.float32))
    soft = Router(d, k, mode="soft", temperature=t, rngs=nnx.Rngs(0))
    out = soft(x)
    dist = np.asarray(out.distances, np.float64)
    ref = np.exp(-(dist - dist.min(1, keepdims=True)) / t)
    np.testing.assert_allclose(np.asarray(out.weights), ref / ref.sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.weights).sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.index), dist.argmin(1))

    gum = Router(d, k, mode="gumbel", rngs=nnx.Rngs(0))
    gum(x, train=True)
    out = gum(x, train=True)
    w = np.asarray(out.weights)
    np.testing.assert_array_equal(w, np.eye(k, dtype=np.float32)[np.asarray(out.index)])
    coef = jnp.asarray(rng.standard_normal((6, k)).astype(np.float32))

    g = nnx.grad(lambda e, m: jnp.sum(m(e, train=True).weights * coef))(x, nnx.clone(gum))
    assert np.abs(np.asarray(g)).max() > 1e-6
    ev = gum(x)
    np.testing.assert_array_equal(np.asarray(ev.index), np.asarray(ev.distances).argmin(1))

    orc = Router(d, k, mode="oracle", rngs=nnx.Rngs(0))
    dom = jnp.asarray([0, 1, 2, 3, -1, 1], jnp.int32)
    out = orc(x, domain=dom, train=True)
    np.testing.assert_array_equal(np.asarray(out.index), [0, 1, 2, 0, 2, 1])
    np.testing.assert_array_equal(np.asarray(out.weights), np.eye(k)[[0, 1, 2, 0, 2, 1]])
    with pytest.raises(ValueError, match="domain"):
        orc(x)


def test_purity():
    assert purity([0, 0, 1, 1], [5, 5, 3, 3], 2, 6) == 1.0
    assert purity([0, 0, 0, 1], [0, 0, 1, 1], 2, 2) == 0.75
    assert purity([0, 1, 1], [0, -1, 1], 2, 2) == 1.0          # unknown labels ignored
    assert np.isnan(purity([0], [-1], 1, 1))


# ----------------------------------------------------------------------------- jit / state
def test_jitted_step_no_recompile_state_roundtrip_and_eval_is_pure():
    d, k, b = 6, 3, 8
    r = Router(d, k, proj_dim=4, mode="gumbel", rngs=nnx.Rngs(router=0, params=1))
    assert r.proj.get_metadata("out_sharding") == ("embed", None)
    assert r.codebook.get_metadata("out_sharding") == ("codes", None)
    graphdef, state = nnx.split(r)
    traces: list = []
    step = make_train_step(graphdef, traces)
    rng = np.random.default_rng(8)
    xs = [jnp.asarray(rng.standard_normal((b, d)).astype(np.float32)) for _ in range(3)]
    s1, _ = step(state, xs[0], jnp.ones((b,)))
    s2, _ = step(s1, xs[1], jnp.ones((b,)))
    s3, out = step(s2, xs[2], jnp.ones((b,)))
    np.testing.assert_array_equal(np.asarray(out.weights),            # compiled straight-through
                                  np.eye(k, dtype=np.float32)[np.asarray(out.index)])
    assert len(traces) == 1
    assert not bool(state["initialized"][...]) and bool(s1["initialized"][...])
    assert not tree_equal(nnx.state(s1, RouterStat), nnx.state(s2, RouterStat))
    # The updated state merges back into an equivalent module.
    m = nnx.merge(graphdef, s3)
    np.testing.assert_array_equal(np.asarray(m.usage[...]), np.asarray(s3["usage"][...]))

    # Eval (eager and jitted) changes no state, RNG counters included.
    before = nnx.state(m)
    out = m(xs[0])
    assert tree_equal(before, nnx.state(m))
    np.testing.assert_array_equal(np.asarray(out.index), np.asarray(out.distances).argmin(1))

    @jax.jit
    def evaluate(state, e):
        mm = nnx.merge(graphdef, state)
        o = mm(e)
        return nnx.split(mm)[1], o
    after, _ = evaluate(s3, xs[1])
    assert tree_equal(s3, after)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="update"):
        Router(4, 2, update="sgd", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mode"):
        Router(4, 2, mode="top2", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"e has shape"):
        Router(4, 2, rngs=nnx.Rngs(0))(jnp.ones((3, 5)))


@pytest.mark.parametrize("update", ["ema", "gradient"])
def test_state_updates_survive_nnx_value_and_grad_in_jit(update):
    """The train-step pattern: merge -> nnx.value_and_grad(wrt Param) -> optimiser -> split."""
    d, k, b = 5, 3, 12
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((b, d)).astype(np.float32))
    r = Router(d, k, proj_dim=4, update=update, rngs=nnx.Rngs(router=0, params=1))
    opt = nnx.Optimizer(r, optax.sgd(0.1), wrt=nnx.Param)
    graphdef, state = nnx.split((r, opt))
    reference = nnx.clone(r)
    reference(x, train=True)                 # same RNG stream, no gradient machinery

    @jax.jit
    def step(state, e):
        model, opt = nnx.merge(graphdef, state)
        diff = nnx.DiffState(0, nnx.Param)
        _, grads = nnx.value_and_grad(lambda m: m(e, train=True).vq_loss, argnums=diff)(model)
        opt.update(model, grads)
        return nnx.split((model, opt))[1], grads
    state, grads = step(state, x)
    model, _ = nnx.merge(graphdef, state)
    assert bool(model.initialized[...])
    for name in ("counts", "usage"):
        np.testing.assert_allclose(np.asarray(getattr(model, name)[...]),
                                   np.asarray(getattr(reference, name)[...]), rtol=1e-6)
    assert "codebook" in grads if update == "gradient" else "codebook" not in grads
    # EMA: the optimiser never touches the codebook; gradient: the k-means++ init is kept and the
    # first step's codebook gradient is zero (the init replaced the Param inside the step).
    np.testing.assert_allclose(np.asarray(model.codebook[...]), np.asarray(reference.codebook[...]),
                               rtol=1e-6)
    assert np.abs(np.asarray(grads["proj"][...])).max() > 0      # the commitment term trains proj
