"""MI estimators: MINE on correlated Gaussians (closed form), plugin vs NumPy, DV / EMA maths."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import iclm_jax  # noqa: F401  (turns eager sharding off before any Param is built)
from iclm_jax.model.mi import MineCritic, dv_bound, marginal_shift, mine_critic_objective, mine_estimate, plugin_mi


# ---------------------------------------------------------------- NumPy references
def np_dv(t_j: np.ndarray, t_m: np.ndarray) -> float:
    t_j, t_m = t_j.astype(np.float64), t_m.astype(np.float64)
    mx = t_m.max()
    return float(t_j.mean() - (mx + np.log(np.mean(np.exp(t_m - mx)))))


def np_plugin(x: np.ndarray, z: np.ndarray, reverse: bool) -> float:
    def softmax(a):
        e = np.exp(a - a.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    px, pz = softmax(x.astype(np.float64)), softmax(z.astype(np.float64))
    joint = sum(np.outer(px[b], pz[b]) for b in range(len(x))) / len(x)
    prod = np.outer(px.mean(0), pz.mean(0))
    p, q = (prod, joint) if reverse else (joint, prod)
    return float(np.sum(p * np.log(p / q)))


# ---------------------------------------------------------------- MINE training harness
def gaussian_pair(key, n: int, d: int, rho: float):
    kx, ke = jax.random.split(key)
    x = jax.random.normal(kx, (n, d))
    return x, rho * x + math.sqrt(1.0 - rho ** 2) * jax.random.normal(ke, (n, d))


def train_mine(d: int, rho: float, *, steps: int = 1500, batch: int = 512, seed: int = 0,
               eval_n: int = 200_000) -> float:
    """Adam on mine_critic_objective with fresh samples per step (lax.scan), then I_DV on a
    large fresh sample so the estimate's logmeanexp bias is negligible."""
    critic = MineCritic(d, d, hidden=64, depth=2, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(critic)
    tx = optax.adam(optax.cosine_decay_schedule(1e-3, steps, alpha=0.1))

    def step(carry, key):
        params, opt_state, ema = carry
        x, z = gaussian_pair(key, batch, d, rho)

        def loss_fn(p):
            loss, new_ema, _ = mine_critic_objective(nnx.merge(graphdef, p), x, z, ema)
            return loss, new_ema
        grads, new_ema = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, new_ema), None

    @jax.jit
    def run(params, key):
        carry = (params, tx.init(params), jnp.float32(0.0))
        (params, _, _), _ = jax.lax.scan(step, carry, jax.random.split(key, steps))
        x, z = gaussian_pair(jax.random.fold_in(key, 1), eval_n, d, rho)
        return mine_estimate(nnx.merge(graphdef, params), x, z)

    return float(run(params, jax.random.key(seed + 1)))


@pytest.mark.parametrize("d,rho", [(1, 0.6), (2, 0.8), (4, 0.8), (5, 0.6)])
def test_mine_correlated_gaussians_closed_form(d, rho):
    true_mi = -d / 2 * math.log(1 - rho ** 2)  # 0.22, 1.02, 2.04, 1.12 nats
    est = train_mine(d, rho)
    assert abs(est - true_mi) <= 0.15 * true_mi, (d, rho, est, true_mi)


def test_mine_independent_is_near_zero():
    assert abs(train_mine(3, 0.0)) < 0.05


# ---------------------------------------------------------------- plugin
@pytest.mark.parametrize("reverse", [False, True])
def test_plugin_matches_numpy(reverse):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 7)).astype(np.float32) * 2
    z = (x[:, :5] + rng.normal(size=(16, 5))).astype(np.float32)
    got = float(plugin_mi(jnp.asarray(x), jnp.asarray(z), reverse=reverse))
    want = np_plugin(x, z, reverse)
    assert want > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("reverse", [False, True])
def test_plugin_dependent_positive_independent_zero(reverse):
    kx, kz = jax.random.split(jax.random.key(0))
    x = 3.0 * jax.random.normal(kx, (200_000, 8))
    z = 3.0 * jax.random.normal(kz, (200_000, 8))
    assert float(plugin_mi(x, x, reverse=reverse)) > 0.1
    assert abs(float(plugin_mi(x, z, reverse=reverse))) < 1e-3


# ---------------------------------------------------------------- DV bound
def test_dv_bound_matches_numpy_and_is_stable():
    rng = np.random.default_rng(1)
    for scale in (1.0, 1e3):
        t_j = (rng.normal(size=64) * scale).astype(np.float32)
        t_m = (rng.normal(size=64) * scale + scale).astype(np.float32)
        got = dv_bound(jnp.asarray(t_j), jnp.asarray(t_m))
        assert np.isfinite(float(got))
        np.testing.assert_allclose(float(got), np_dv(t_j, t_m), rtol=1e-5, atol=1e-4 * scale)
        grad = jax.grad(dv_bound, argnums=(0, 1))(jnp.asarray(t_j), jnp.asarray(t_m))
        assert all(np.isfinite(np.asarray(g)).all() for g in grad)


def test_marginal_shift_rolls_batch_and_rejects_identity():
    z = jnp.arange(12.0).reshape(6, 2)
    np.testing.assert_array_equal(marginal_shift(z), np.roll(np.asarray(z), 1, axis=0))
    with pytest.raises(ValueError, match="multiple of batch size"):
        marginal_shift(z, shift=6)


# ---------------------------------------------------------------- EMA-corrected critic gradient
def _tiny(seed: int = 0):
    critic = MineCritic(3, 2, hidden=8, depth=2, rngs=nnx.Rngs(seed))
    kx, kz = jax.random.split(jax.random.key(seed))
    return critic, jax.random.normal(kx, (5, 3)), jax.random.normal(kz, (5, 2))


def _per_sample_jacobians(critic, x, z):
    """Flat per-sample d T / d params for joint and rolled pairs, straight from the critic."""
    graphdef, params = nnx.split(critic)
    flat, unravel = ravel_pytree(params)

    def scores(f, xs, zs):
        return nnx.merge(graphdef, unravel(f))(xs, zs)
    zm = np.roll(np.asarray(z), 1, axis=0)
    t_j, t_m = np.asarray(scores(flat, x, z)), np.asarray(scores(flat, x, zm))
    j_j = np.asarray(jax.jacrev(scores)(flat, x, z))
    j_m = np.asarray(jax.jacrev(scores)(flat, x, zm))
    return t_j, t_m, j_j, j_m, params, unravel


def _flat_grad(critic, x, z, ema, **kw):
    graphdef, params = nnx.split(critic)
    g = jax.grad(lambda p: mine_critic_objective(nnx.merge(graphdef, p), x, z, ema, **kw)[0])(
        params)
    return np.asarray(ravel_pytree(g)[0])


@pytest.mark.parametrize("ema", [0.0, 0.7, 3.0])
def test_ema_recurrence_value_and_gradient(ema):
    decay, clip = 0.9, 20.0
    critic, x, z = _tiny()
    t_j, t_m, j_j, j_m, _, _ = _per_sample_jacobians(critic, x, z)
    loss, new_ema, i_dv = mine_critic_objective(critic, x, z, jnp.float32(ema), decay=decay,
                                                clip=clip)
    batch_mean = np.mean(np.exp(t_m))
    want_ema = batch_mean if ema == 0 else decay * ema + (1 - decay) * batch_mean
    np.testing.assert_allclose(float(new_ema), want_ema, rtol=1e-6)
    np.testing.assert_allclose(float(i_dv), np_dv(t_j, t_m), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss), -float(i_dv), rtol=1e-5, atol=1e-6)
    # documented gradient: naive DV gradient with the denominator mean exp(T_m) -> new_ema
    weights = np.exp(t_m)[:, None]
    want = -(j_j.mean(0) - (weights * j_m).mean(0) / want_ema)
    got = _flat_grad(critic, x, z, jnp.float32(ema), decay=decay, clip=clip)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    naive = -(j_j.mean(0) - (weights * j_m).mean(0) / batch_mean)
    if ema == 0:  # uninitialised EMA: exactly the naive DV gradient = grad of -i_dv
        graphdef, params = nnx.split(critic)
        g = jax.grad(lambda p: -mine_estimate(nnx.merge(graphdef, p), x, z))(params)
        np.testing.assert_allclose(ravel_pytree(g)[0], naive, rtol=1e-4,
                                   atol=1e-6)
    else:  # only the marginal (denominator) term differs from the naive gradient
        np.testing.assert_allclose(got - naive,
                                   (weights * j_m).mean(0) * (1 / want_ema - 1 / batch_mean),
                                   rtol=1e-4, atol=1e-6)


def test_clipped_marginal_scores_drop_out_of_gradient():
    critic, x, z = _tiny(1)
    t_j, t_m, j_j, j_m, _, _ = _per_sample_jacobians(critic, x, z)
    srt = np.sort(t_m)
    clip = float(srt[2] + srt[3]) / 2  # between two scores (no tie): the top 2 of 5 get clipped
    keep = t_m < clip
    assert 0 < keep.sum() < len(t_m)
    c = np.minimum(t_m, clip)
    ema = np.mean(np.exp(c))
    want = -(j_j.mean(0) - (np.exp(c)[:, None] * keep[:, None] * j_m).mean(0) / ema)
    got = _flat_grad(critic, x, z, jnp.float32(0.0), clip=clip)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_critic_objective_finite_when_all_marginal_exps_underflow():
    critic, x, z = _tiny()
    critic.out.kernel[...] = jnp.zeros_like(critic.out.kernel[...])
    critic.layers[-1].kernel[...] = jnp.zeros_like(critic.layers[-1].kernel[...])    # last hidden = elu(1)
    critic.layers[-1].bias[...] = jnp.ones_like(critic.layers[-1].bias[...])
    critic.out.kernel[...] = critic.out.kernel[...].at[0, 0].set(-500.0)  # T = -500: exp(T_m) == 0 in f32
    graphdef, params = nnx.split(critic)
    (loss, new_ema), g = jax.value_and_grad(
        lambda p: mine_critic_objective(nnx.merge(graphdef, p), x, z, jnp.float32(0.0))[:2],
        has_aux=True)(params)
    assert float(new_ema) == 0.0 and np.isfinite(float(loss))
    assert np.isfinite(np.asarray(ravel_pytree(g)[0])).all()


def test_critic_objective_does_not_backprop_into_inputs():
    critic, x, z = _tiny()
    gx = jax.grad(lambda a: mine_critic_objective(critic, a, z, jnp.float32(1.0))[0])(x)
    assert not np.any(np.asarray(gx))


def test_mine_estimate_grad_wrt_x_is_finite_and_nonzero():
    critic, x, z = _tiny()
    gx = np.asarray(jax.grad(lambda a: mine_estimate(critic, a, z))(x))
    assert np.isfinite(gx).all() and np.abs(gx).max() > 0


def test_critic_shape_errors_name_tensors():
    critic, x, z = _tiny()
    with pytest.raises(ValueError, match="x_dim=3"):
        critic(z, x)


def test_critic_param_logical_names():
    critic, _, _ = _tiny()
    names = {"/".join(map(str, path)): v.get_metadata()["out_sharding"]
             for path, v in nnx.to_flat_state(nnx.state(critic, nnx.Param))}
    assert names == {
        "layers/0/kernel": ("mi_in", "mi_hidden"), "layers/0/bias": ("mi_hidden",),
        "layers/1/kernel": ("mi_hidden", "mi_hidden"), "layers/1/bias": ("mi_hidden",),
        "out/kernel": ("mi_hidden", None)}   # no output bias: the DV bound ignores a constant


# ---------------------------------------------------------------- sharded batch (8 CPU devices)
def test_sharded_batch_matches_unsharded():
    critic, _, _ = _tiny()
    kx, kz = jax.random.split(jax.random.key(3))
    x, z = jax.random.normal(kx, (16, 3)), jax.random.normal(kz, (16, 2))
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    xs, zs = (jax.device_put(a, NamedSharding(mesh, P("data", None))) for a in (x, z))
    f = jax.jit(lambda a, b: (mine_estimate(critic, a, b), plugin_mi(a, b), marginal_shift(b)))
    got, want = f(xs, zs), f(x, z)
    np.testing.assert_allclose(np.asarray(got[2]), np.roll(np.asarray(z), 1, axis=0))
    for g, w in zip(got[:2], want[:2]):
        np.testing.assert_allclose(float(g), float(w), rtol=1e-5, atol=1e-7)
