"""Parameter initialisation and inspection."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.model.decoder import LM2Model


def _init(model: LM2Model, rng: jax.Array):
  tokens = jnp.zeros((1, model.config.segment_len), jnp.int32)
  return model.init(rng, tokens)["params"]


def init_params(model: LM2Model, rng: jax.Array):
  """Fresh float32 parameters (plain arrays; logical axes from `param_axes`). Compiled, as the trainer's
  initialisation is: run op by op, the model's forward pass inside `init` took seconds even at toy sizes."""
  return jax.jit(lambda r: nn.unbox(_init(model, r)))(rng)


def param_axes(model: LM2Model):
  """Logical axis names of every parameter, as a pytree of PartitionSpecs matching `init_params`."""
  return nn.get_partition_spec(jax.eval_shape(lambda: _init(model, jax.random.key(0))))


def count_params(model: LM2Model) -> dict[str, int]:
  """Parameter counts without allocating them: {'total', 'memory', 'decoder'} ('memory': the memory kind's)."""
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  counts = {"total": 0, "memory": 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    n = int(np.prod(leaf.shape))
    counts["total"] += n
    if any(getattr(k, "key", None) == "memory" for k in path):
      counts["memory"] += n
  counts["decoder"] = counts["total"] - counts["memory"]
  return counts
