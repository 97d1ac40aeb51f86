"""Validation of the run settings, `config.train` and `config.checkpoint` (the model validates `config.model`,
the mesh `config.mesh`, the data pipeline `config.data`), and of the sections a config file may hold.

Every error is a `ConfigError` naming the field, the bad value and the fix, raised before anything is written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lm2_jax.model.config import as_dict, check, check_fields, positive_int

NONFINITE_POLICIES = ("stop", "skip")
DEFAULT_WINDOW_TOKENS = 4096  # train.window_tokens (configs/defaults.py sets it from here)


def window_tokens_of(config) -> int:
  """`train.window_tokens`; configs saved before it existed get its default."""
  return config.train.get("window_tokens", DEFAULT_WINDOW_TOKENS)


def _real(values: Mapping[str, Any], name: str, field: str, low: float, high: float = math.inf, *,
          low_open: bool = False, high_open: bool = False) -> float:
  """A finite number in [low, high] (ends excluded where `*_open`)."""
  v = values[name]
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
  if math.isinf(high):
    bounds = f"{'>' if low_open else '>='} {low}"
  else:
    bounds = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
  check(ok, f"{field}.{name}", v, f"must be a finite number {bounds}")
  return float(v)


def check_run_config(config) -> None:
  """Raises ConfigError for the first bad field of `config.train` or `config.checkpoint`."""
  t, c = config.train, config.checkpoint
  for name in ("steps", "batch_size", "seq_len", "log_every", "grad_accum_steps"):
    positive_int(t, name, "train")
  for name in ("every", "keep"):
    positive_int(c, name, "checkpoint")
  check(isinstance(t.warmup_steps, int) and not isinstance(t.warmup_steps, bool) and t.warmup_steps >= 0,
        "train.warmup_steps", t.warmup_steps, "must be an integer >= 0 (values >= train.steps are clipped)")
  window = window_tokens_of(config)
  check(isinstance(window, int) and not isinstance(window, bool) and window >= 0, "train.window_tokens", window,
        "must be an integer >= 0: tokens of a row per forward/backward window (0: the whole row at once)")
  check(isinstance(t.seed, int) and not isinstance(t.seed, bool), "train.seed", t.seed, "must be an integer")
  _real(t, "learning_rate", "train", 0)
  _real(t, "final_lr_fraction", "train", 0, 1)
  _real(t, "b1", "train", 0, 1, high_open=True)
  _real(t, "b2", "train", 0, 1, high_open=True)
  _real(t, "weight_decay", "train", 0)
  _real(t, "grad_clip_norm", "train", 0, low_open=True)
  check(t.nonfinite in NONFINITE_POLICIES, "train.nonfinite", t.nonfinite,
        f"use one of {NONFINITE_POLICIES}: stop with a diagnosis, or skip the step (its update is not applied)")


def check_known_fields(config, reference, skip: tuple[str, ...] = ("model", "mesh")) -> None:
  """Rejects sections and fields of `config` that `reference` (the defaults) lacks: typos in a config file,
  which command-line overrides already refuse. Sections in `skip` validate their own fields."""
  known = as_dict(reference, "config")
  for name, section in as_dict(config, "config").items():
    check(name in known, name, section, f"unknown section; the sections of a config are {sorted(known)}")
    if name not in skip and hasattr(known[name], "keys"):
      check_fields(as_dict(section, name), set(known[name].keys()), name, required=set())
