"""Benchmark scripts (`python -m benchmarks.<name>`); what they share. They run with the launchers' host memory
setting (launch/host_memory.py), applied by importing `launch` first."""

import ast

from absl import app

import launch  # noqa: F401  (keeps freed host memory mapped, before JAX starts its threads)


def model_overrides(items, flag: str) -> dict:
  """['a=1', 'b=full'] -> {'a': 1, 'b': 'full'}: config.model fields from `field=value` items (Python literals,
  else strings); UsageError naming `flag` for an item without '='."""
  out = {}
  for item in filter(None, (i.strip() for i in items)):
    key, sep, value = item.partition("=")
    if not sep:
      raise app.UsageError(f"{flag}: {item!r} is not field=value (e.g. remat_policy=full)")
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()
  return out
