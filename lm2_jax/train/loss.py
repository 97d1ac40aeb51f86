"""Language-modelling losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def next_token_loss(logits_BTV: jax.Array, tokens_BT: jax.Array, mask_BT: jax.Array | None = None):
  """Mean cross-entropy of predicting tokens[:, t+1] from logits[:, t], over positions where mask[:, t+1] is set.

  Returns (loss, accuracy), both float32 scalars.
  """
  logits, targets = logits_BTV[:, :-1], tokens_BT[:, 1:]
  weights = jnp.ones(targets.shape, jnp.float32) if mask_BT is None else mask_BT[:, 1:].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  total = jnp.maximum(weights.sum(), 1.0)
  correct = (logits.argmax(-1) == targets).astype(jnp.float32)
  return (ce * weights).sum() / total, (correct * weights).sum() / total
