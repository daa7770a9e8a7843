"""The router uses all its codes: K = 4 codes on 4 (or 2) synthetic Gaussian clusters, driven by the jitted
train step with the default RouterConfig, and the one-line collapse report."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import iclm_jax  # noqa: F401  (eager sharding off before any Variable is built)
from iclm_jax.model.codebook import collapse_report, purity, split_statistics
from iclm_jax.model.router import Router

D, K, B = 16, 4, 32            # every run below shares these shapes: one compilation of each function
STEPS = 150                    # a short run
SEEDS = (0, 1, 2, 3)


def cluster_means(num: int, seed: int) -> np.ndarray:
    """``num`` means in d = 16, 4·N(0, 1) each: pairwise distances ≈ 23 against a within-cluster spread
    ‖x − μ‖ ≈ 4 (σ = 1), so every cluster is far from every other."""
    return (4.0 * np.random.default_rng(1000 + seed).standard_normal((num, D))).astype(np.float32)


def balanced(rng, means, clusters, n=B):
    labels = np.asarray(clusters)[np.arange(n) % len(clusters)]
    return (means[labels] + rng.standard_normal((n, D))).astype(np.float32), labels


@pytest.fixture(scope="module")
def steps():
    """Jitted train and eval steps of a default K = 4 router, compiled once for the whole file."""
    graphdef, _ = nnx.split(Router(D, K, rngs=nnx.Rngs(0)))

    @jax.jit
    def train(state, e):
        r = nnx.merge(graphdef, state)
        out = r(e, train=True)
        return nnx.split(r)[1], out.index

    @jax.jit
    def route(state, e):
        return nnx.merge(graphdef, state)(e).index

    return train, route


def run(steps, means, seed, first_clusters=None, first_steps=1, num_steps=STEPS):
    """Train a fresh default router; returns its state and the step after which every code owned one
    cluster ever since (checked every 10 steps on a held-out balanced set; None: not at the end)."""
    train, route = steps
    _, state = nnx.split(Router(D, K, rngs=nnx.Rngs(router=seed, params=seed + 1)))
    rng = np.random.default_rng(seed)
    all_clusters = list(range(len(means)))
    x_eval, y_eval = balanced(np.random.default_rng(99), means, all_clusters, n=256)
    settled = None
    for t in range(num_steps):
        clusters = first_clusters if first_clusters is not None and t < first_steps else all_clusters
        state, _ = train(state, jnp.asarray(balanced(rng, means, clusters)[0]))
        if (t + 1) % 10 == 0:
            table = contingency(np.asarray(route(state, jnp.asarray(x_eval))), y_eval, len(means))
            good = owns_clusters(table)
            settled = (settled or t + 1) if good else None
    table = contingency(np.asarray(route(state, jnp.asarray(x_eval))), y_eval, len(means))
    return state, table, settled


def sqdist_np(x, c):
    return ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)


def contingency(index, labels, num_labels):
    table = np.zeros((K, num_labels), np.int64)
    np.add.at(table, (index, labels), 1)
    return table


def owns_clusters(table) -> bool:
    """Every code receives rows and all of its rows come from one cluster; every cluster has a code."""
    codes_used = (table.sum(1) > 0).all()
    pure = ((table > 0).sum(1) <= 1).all()
    return bool(codes_used and pure and (table.sum(0) > 0).all())


# ----------------------------------------------------------------------------- 4 clusters, K = 4
@pytest.mark.parametrize("seed", SEEDS)
def test_four_clusters_balanced_batches_one_code_each(steps, seed):
    means = cluster_means(4, seed)
    state, table, settled = run(steps, means, seed)
    assert owns_clusters(table), table
    assert sorted(table.argmax(1).tolist()) == [0, 1, 2, 3], table          # one code per cluster
    rows = np.repeat(np.arange(4), table.sum(0) // 4)
    assert purity(table.argmax(0)[rows], rows, K, 4) == 1.0
    assert settled is not None and settled <= 50, (settled, table)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("first_steps", [1, 20])
def test_four_clusters_first_batches_hold_only_two(steps, seed, first_steps):
    """k-means++ seeds all four codes in the two clusters of the first batch(es) (two codes per cluster);
    when the other two clusters appear, their rows join those codes, and relocation moves the redundant
    codes (the halves of one cluster: low removal cost) onto splits of the codes that cover two clusters
    (high split gain) until every code owns one cluster."""
    means = cluster_means(4, seed)
    state, table, settled = run(steps, means, seed, first_clusters=[0, 1], first_steps=first_steps)
    assert owns_clusters(table), table
    assert sorted(table.argmax(1).tolist()) == [0, 1, 2, 3], table
    assert settled is not None and settled <= first_steps + 100, (settled, table)
    assert 1 <= int(state["relocations"][...]) <= 6       # a few moves, no thrashing


# ----------------------------------------------------------------------------- 2 clusters, K = 4
@pytest.mark.parametrize("seed", SEEDS)
def test_four_codes_on_two_clusters_split_the_clusters(steps, seed):
    """The documented behaviour with more codes than clusters: no code is left unused and no code mixes
    the clusters (purity 1); each cluster is split among codes along directions of its spread, usually two
    codes each (37 of 40 seeds at 200 steps), else three and one: a local optimum that relocation keeps,
    since removing one of the three costs more (estimated) than splitting the lone cluster's code gains.
    Uneven splits of a cluster drift towards halves over hundreds of steps; no code holds a sliver."""
    means = cluster_means(2, seed)
    state, table, _ = run(steps, means, seed, num_steps=200)
    assert owns_clusters(table), table
    assert sorted((table > 0).sum(0).tolist()) in ([2, 2], [1, 3]), table
    share = table / table.sum(0, keepdims=True)
    assert share[table > 0].min() > 0.1, table
    assert collapse_report(table.sum(1), num_domains=2) is None
    assert int(state["relocations"][...]) <= 4


# ----------------------------------------------------------------------------- collapse report
def test_collapse_report():
    assert collapse_report([419, 0, 0, 181]) == (
        "modules 1, 2 of 4 receive no rows (routes 419 / 0 / 0 / 181): the router uses 2 modules")
    assert collapse_report([419, 0, 0, 181], num_domains=2) == (
        "modules 1, 2 of 4 receive no rows (routes 419 / 0 / 0 / 181): the router uses 2 modules "
        "for 2 domains")
    assert collapse_report(np.array([600, 0, 0, 0]), num_domains=2) == (
        "modules 1, 2, 3 of 4 receive no rows (routes 600 / 0 / 0 / 0): the router uses 1 module, "
        "fewer than the 2 domains")
    # Almost no rows: at most 5% of an even share (600 / 4 = 150 -> 7.5 rows).
    assert collapse_report([419, 3, 0, 178]) == (
        "modules 1, 2 of 4 receive almost no rows (routes 419 / 3 / 0 / 178; at most 5% of an even "
        "share): the router uses 2 modules")
    assert collapse_report([0.25, 0.0, 0.75]) == (
        "module 1 of 3 receives no rows (routes 0.25 / 0 / 0.75): the router uses 2 modules")
    assert collapse_report([150, 150, 142, 158], num_domains=2) is None
    assert collapse_report([592, 8, 0]) is not None and collapse_report([592, 8, 0], floor=0.01) == (
        "module 2 of 3 receives no rows (routes 592 / 8 / 0): the router uses 2 modules")
    assert collapse_report([10]) is None                     # one module: nothing to compare
    assert collapse_report([0, 0, 0]) is None                # nothing routed


# ----------------------------------------------------------------------------- split statistics
def test_split_statistics_match_numpy_for_the_drawn_direction():
    """cost exactly; gain, halves and fraction equal the NumPy values for one of the code's rows as u."""
    rng = np.random.default_rng(3)
    codes = np.array([[0, 0, 0], [6, 0, 0], [0, 6, 0], [50, 50, 50]], np.float32)   # code 3: no rows
    x = np.concatenate([codes[[0, 1, 2]][np.arange(21) % 3] + rng.standard_normal((21, 3)),
                        [[99, 0, 0]]]).astype(np.float32)
    w = np.ones(22, np.float32)
    w[-1] = 0.0                                                      # padding: counted nowhere
    dist = sqdist_np(x, codes)
    own = dist.argmin(1)
    srt = np.sort(dist, 1)
    cost = np.bincount(own, weights=(srt[:, 1] - srt[:, 0]) * w, minlength=4)
    fn = jax.jit(split_statistics)
    seen = set()
    for seed in range(6):
        st = fn(jax.random.key(seed), jnp.asarray(x), jnp.asarray(codes), jnp.asarray(dist, jnp.float32),
                jnp.asarray(w))
        np.testing.assert_allclose(np.asarray(st.cost), cost, rtol=1e-5)
        assert not bool(st.valid[3]) and float(st.gain[3]) == 0.0
        for i in range(3):
            rows = np.flatnonzero((own == i) & (w > 0))
            found = None
            for j in rows:                                           # u from row j, j left out
                u = (x[j] - codes[i]) / np.linalg.norm(x[j] - codes[i])
                rest = np.setdiff1d(rows, [j])
                proj = (x[rest] - codes[i]) @ u
                hi = proj >= proj.mean()
                gain = hi.sum() * (~hi).sum() / len(proj) * (proj[hi].mean() - proj[~hi].mean()) ** 2
                if np.allclose(float(st.gain[i]), gain, rtol=1e-4) and np.allclose(
                        np.asarray(st.high[i]), proj[hi].mean() * u, atol=1e-4):
                    found = j
                    np.testing.assert_allclose(np.asarray(st.low[i]), proj[~hi].mean() * u, atol=1e-4)
                    assert float(st.frac[i]) == pytest.approx(hi.mean())
            assert found is not None, (seed, i)
            seen.add((i, found))
    assert len(seen) > 3                                             # the drawn row varies with the key
