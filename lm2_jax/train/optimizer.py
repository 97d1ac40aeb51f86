"""AdamW with linear warmup and cosine decay, global-norm clipping, weight decay on matrices only, and optional
gradient accumulation."""

from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate_schedule(train_cfg: Any) -> optax.Schedule:
  """Per optimizer update: `train.steps` and `train.warmup_steps` count batches, and an update happens every
  `grad_accum_steps` batches. A warmup as long as the run is clipped to `steps - 1` (a short smoke run of a long
  config just works). `train_cfg` is validated by lm2_jax.train.config.check_run_config."""
  k = train_cfg.grad_accum_steps
  warmup = min(train_cfg.warmup_steps, train_cfg.steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.learning_rate, warmup_steps=warmup // k,
      decay_steps=max(train_cfg.steps // k, 1), end_value=train_cfg.learning_rate * train_cfg.final_lr_fraction)


def decay_mask(params) -> Any:
  """Weight decay on matrices (kernels, embeddings) only: not on norm scales or biases (1-D, or 2-D when scanned
  over layers). Memory slots are state, not parameters, so they are never decayed."""
  def is_matrix(path, _):
    return getattr(path[-1], "key", None) in ("kernel", "embedding")
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(train_cfg: Any) -> optax.GradientTransformation:
  tx = optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip_norm),
      optax.adamw(learning_rate_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                  weight_decay=train_cfg.weight_decay, mask=decay_mask),
  )
  if train_cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=train_cfg.grad_accum_steps)
  return tx
