"""The persistent compilation cache every launcher turns on: a rerun of a config loads its compiled programs from
disk instead of waiting for XLA again.

  --compile_cache=DIR   where the compiled programs are kept (default: $JAX_COMPILATION_CACHE_DIR, else
                        ~/.cache/lm2_jax/xla, under $XDG_CACHE_HOME when that is set)
  --compile_cache=      off

JAX keys each entry by the program, the jax/jaxlib version, the devices and the compiler flags, so a changed
config, code or machine compiles afresh; only programs that took at least `MIN_COMPILE_S` to compile are kept.
"""

import os

import jax
from absl import flags

MIN_COMPILE_S = 0.5
DEFAULT_DIR = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lm2_jax", "xla")

_DIR = flags.DEFINE_string("compile_cache", DEFAULT_DIR,
                           "Persistent compilation cache directory ('' turns it off).")


def enable() -> None:
  """Turns the cache on in `--compile_cache` (call at the start of a launcher's main)."""
  if _DIR.value:
    jax.config.update("jax_compilation_cache_dir", _DIR.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
