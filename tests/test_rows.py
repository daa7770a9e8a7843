"""rows.matmul (leading dims flattened) against NumPy and the unflattened contraction: values and grads."""
import jax
import jax.numpy as jnp
import numpy as np

from iclm_jax.model import rows


def test_flattened_rows_match_numpy_and_the_unflattened_form_in_value_and_gradient():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 7)).astype(np.float32)
    w = rng.standard_normal((7, 4)).astype(np.float32)
    got = rows.matmul(jnp.asarray(x), jnp.asarray(w))
    assert got.shape == (3, 5, 4)
    np.testing.assert_allclose(np.asarray(got), np.einsum("bli,io->blo", x.astype(np.float64), w), rtol=1e-5,
                               atol=1e-5)
    one = rows.matmul(jnp.asarray(x[0, 0]), jnp.asarray(w))                  # no leading dims to flatten
    np.testing.assert_allclose(np.asarray(one), x[0, 0] @ w, rtol=1e-5, atol=1e-5)
    assert rows.matmul(jnp.asarray(x), jnp.asarray(w), preferred_element_type=jnp.float32).dtype == jnp.float32

    def loss(f):
        return lambda w, x: jnp.sum(jnp.sin(f(x, w)))

    g_new = jax.grad(loss(rows.matmul), argnums=(0, 1))(jnp.asarray(w), jnp.asarray(x))
    g_old = jax.grad(loss(rows.unflattened), argnums=(0, 1))(jnp.asarray(w), jnp.asarray(x))
    for a, b in zip(g_new, g_old):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
