"""lm2-jax: decoder language models with explicit, trainable memory, in JAX/Flax."""

__version__ = "0.1.0"
