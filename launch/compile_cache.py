"""The persistent compilation cache every launcher turns on: a rerun of a config loads its compiled programs from
disk instead of waiting for XLA again.

  --compile_cache=DIR   where the compiled programs are kept (default: $JAX_COMPILATION_CACHE_DIR, else
                        ~/.cache/lm2_jax/xla, under $XDG_CACHE_HOME when that is set)
  --compile_cache=      off

JAX keys each entry by the program, the jax/jaxlib version, the devices and the compiler flags, so a changed
config, code or machine compiles afresh; only programs that took at least `MIN_COMPILE_S` to compile are kept.

The cache stays off in a process set up for several virtual CPU devices (`--xla_force_host_platform_device_count`
or `jax_num_cpu_devices` above 1; not when JAX_PLATFORMS puts another platform first). There, with jax 0.10.2,
a multi-device train step loaded from the cache aborted in XLA's CPU all-reduce rendezvous ("Termination timeout
... of 40 seconds exceeded") in 6 of 21 runs, and never once compiled afresh (benchmarks/PERF_NOTES.md,
section 6). The decision is taken from the flags, before any device is touched, since multi-process launchers
must call `jax.distributed.initialize` first.
"""

import os
import re

import jax
from absl import flags

MIN_COMPILE_S = 0.5
DEFAULT_DIR = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lm2_jax", "xla")

_DIR = flags.DEFINE_string("compile_cache", DEFAULT_DIR,
                           "Persistent compilation cache directory ('' turns it off).")


def virtual_cpu_devices() -> int:
  """The number of CPU devices this process is set up for, read from the flags (1 when none asks for more, or when
  JAX_PLATFORMS names another platform first)."""
  platforms = (jax.config.jax_platforms or "").split(",")
  if platforms[0] not in ("", "cpu"):
    return 1
  forced = re.findall(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  return max(int(forced[-1]) if forced else 1, jax.config.jax_num_cpu_devices)


def enable() -> None:
  """Turns the cache on in `--compile_cache` (call at the start of a launcher's main), unless the process is set up
  for several virtual CPU devices (see the module docstring)."""
  directory = _DIR.value if virtual_cpu_devices() == 1 else ""
  jax.config.update("jax_compilation_cache_dir", directory or None)  # None also over $JAX_COMPILATION_CACHE_DIR
  if directory:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
