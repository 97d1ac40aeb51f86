"""Benchmark scripts (`python -m benchmarks.<name>`); what they share. They run with the launchers' host memory
setting (launch/host_memory.py), applied by importing `launch` first."""

import ast
import time

from absl import app

import launch  # noqa: F401  (keeps freed host memory mapped, before JAX starts its threads)


def machine() -> str:
  """The CPU this process runs on, e.g. 'AMD EPYC, 2 cores, AVX-512': XLA's CPU code (and so every timing and
  ratio here) differs between machines, so benchmark output names it."""
  import os
  import platform

  model, flags_ = platform.processor() or platform.machine(), ""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), model)
    flags_ = next((l for l in info.splitlines() if l.startswith("flags")), "")
  except OSError:
    pass
  vector = "AVX-512" if " avx512f" in flags_ else "AVX2" if " avx2" in flags_ else ""
  return ", ".join(filter(None, [model, f"{len(os.sched_getaffinity(0))} cores", vector]))


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


def timed_calls(fn, repeats: int) -> tuple[float, list[float]]:
  """(seconds of the first call of `fn`: compilation and one step, seconds of each of the next `repeats` calls),
  each call waited for (`jax.block_until_ready` on what `fn` returns)."""
  import jax  # here: the package imports `launch` before anything starts JAX

  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, times
