"""iclm-jax: Independent Causal Language Models in JAX/Flax NNX.

Variables carry *logical* axis names (``out_sharding=("embed", "mlp")``); they are mapped to a
device mesh explicitly by :mod:`iclm_jax.sharding`. Flax's eager sharding would instead require a
mesh at construction time, so its default is switched off for the whole process (the config flag,
not the thread-local ``nnx.use_eager_sharding`` stack, which other code may push and pop).
"""
import flax as _flax

_flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
