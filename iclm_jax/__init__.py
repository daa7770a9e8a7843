"""iclm-jax: Independent Causal Language Models in JAX/Flax NNX.

Variables carry *logical* axis names (``out_sharding=("embed", "mlp")``); they are mapped to a
device mesh explicitly by :mod:`iclm_jax.sharding`. Flax's eager sharding would instead require a
mesh at construction time, so it is switched off for the whole package.
"""
from flax import nnx as _nnx

_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
