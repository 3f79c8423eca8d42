"""dihal_jax: DiHAL (geometry-guided diffusion/transformer hybrid) in JAX + Flax NNX."""

__version__ = "0.1.0"
