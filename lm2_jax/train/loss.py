"""Language-modelling losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def weighted_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array):
  """(sum of weights x cross-entropy, sum of weights x [argmax == target]) over [B, T], float32 scalars."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
  correct = (logits_BTV.argmax(-1) == targets_BT).astype(jnp.float32)
  return (ce * weights_BT).sum(), (correct * weights_BT).sum()


def next_token_targets(tokens_BT: jax.Array, mask_BT: jax.Array | None = None):
  """(targets_BT, weights_BT float32): position t predicts tokens[:, t+1], weighted by mask[:, t+1] (1 without a
  mask); the last position predicts nothing (weight 0). For losses over parts of a row (trainer's windows)."""
  B = tokens_BT.shape[0]
  targets = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros((B, 1), tokens_BT.dtype)], axis=1)
  weights = jnp.ones(tokens_BT.shape, jnp.float32) if mask_BT is None else mask_BT.astype(jnp.float32)
  weights = jnp.concatenate([weights[:, 1:], jnp.zeros((B, 1), jnp.float32)], axis=1)
  return targets, weights


def next_token_loss(logits_BTV: jax.Array, tokens_BT: jax.Array, mask_BT: jax.Array | None = None):
  """Mean cross-entropy of predicting tokens[:, t+1] from logits[:, t], over positions where mask[:, t+1] is set.

  Returns (loss, accuracy), both float32 scalars.
  """
  targets, weights = next_token_targets(tokens_BT, mask_BT)
  ce, correct = weighted_cross_entropy(logits_BTV[:, :-1], targets[:, :-1], weights[:, :-1])
  total = jnp.maximum(weights.sum(), 1.0)
  return ce / total, correct / total
