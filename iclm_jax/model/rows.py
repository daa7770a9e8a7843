"""``matmul``: ``x [..., in] @ w [in, out]`` with the leading dimensions flattened into one.

The same values as ``x @ w``. Flattened, the weight's gradient ``x^T @ dy`` is one plain matmul; on XLA:CPU
(jax 0.10) the same contraction over ``[B, L]`` kept apart ran 1.3-1.8x slower at this project's shapes
(fwd + grad of one projection, interleaved; ``benchmarks/matmul_rows.py`` times whole train steps). A
reshape that merges the leading dimensions keeps a batch-dimension sharding, so the layout is unchanged on
a mesh. Model code calls ``rows.matmul`` through the module, which lets the benchmark swap the old
unflattened form back in for its before/after rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def matmul(x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
    lead = x.shape[:-1]
    out = jnp.dot(x.reshape(-1, x.shape[-1]), w, preferred_element_type=preferred_element_type)
    return out.reshape(*lead, w.shape[-1])


def unflattened(x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
    """What the model computed before ``matmul``: a contraction of ``x``'s last dimension as it is."""
    return jnp.einsum("...i,io->...o", x, w, preferred_element_type=preferred_element_type)
