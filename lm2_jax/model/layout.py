"""Converts parameters between the per-layer layout (`decoder/layer_{i}`) and the scanned one
(`decoder/layers_{start}_{stop}`, stacked on a leading `layers` axis); see `decoder.layer_groups`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm2_jax.model.config import ModelConfig
from lm2_jax.model.decoder import layer_groups


def scan_layout(params, cfg: ModelConfig):
  """Per-layer params -> scanned params."""
  dec = dict(params["decoder"])
  for g in layer_groups(cfg):
    layers = [dec.pop(f"layer_{i}") for i in range(g.start, g.stop)]
    dec[g.scanned_name] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
  return {**params, "decoder": dec}


def unscan_layout(params, cfg: ModelConfig):
  """Scanned params -> per-layer params."""
  dec = dict(params["decoder"])
  for g in layer_groups(cfg):
    stacked = dec.pop(g.scanned_name)
    for i in range(g.start, g.stop):
      dec[f"layer_{i}"] = jax.tree.map(lambda a: a[i - g.start], stacked)
  return {**params, "decoder": dec}
