"""The persistent compilation cache of the launchers (launch/compile_cache.py): on in the directory given, off
with an empty --compile_cache, and off in a process with several virtual CPU devices (where XLA's CPU collectives
aborted in programs loaded from the cache)."""

import os
import subprocess
import sys

PROGRAM = """
import sys
import jax, jax.numpy as jnp
from absl import flags
from launch import compile_cache
flags.FLAGS(["prog", "--compile_cache=" + sys.argv[1]])
compile_cache.MIN_COMPILE_S = 0.0  # keep even this small program
compile_cache.enable()
jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))))
print(jax.device_count(), jax.config.jax_compilation_cache_dir)
"""


def _run(cache_dir, devices=1, **env):
  """(device count, cache directory) of a launcher-like process with `devices` virtual CPU devices."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **env)
  out = subprocess.run([sys.executable, "-c", PROGRAM, cache_dir], capture_output=True, text=True, timeout=300,
                       env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  count, directory = out.stdout.split()[-2:]
  return int(count), directory


def test_cache_on_in_the_given_directory_and_off_when_empty(tmp_path):
  assert _run(str(tmp_path / "xla")) == (1, str(tmp_path / "xla"))
  assert any(name.startswith("jit_") for name in (p.name for p in (tmp_path / "xla").iterdir()))
  assert _run("") == (1, "None")


def test_cache_off_with_several_virtual_cpu_devices(tmp_path):
  assert _run(str(tmp_path / "xla"), devices=8, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "env")) == (8, "None")
  assert not (tmp_path / "xla").exists() and not (tmp_path / "env").exists()
