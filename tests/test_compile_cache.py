"""The persistent compilation cache of the launchers (launch/compile_cache.py): on in the directory given, off
with an empty --compile_cache."""

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
print(jax.config.jax_compilation_cache_dir)
"""


def _run(cache_dir):
  out = subprocess.run([sys.executable, "-c", PROGRAM, cache_dir], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.split()[-1]


def test_cache_on_in_the_given_directory_and_off_when_empty(tmp_path):
  assert _run(str(tmp_path / "xla")) == str(tmp_path / "xla")
  assert any(name.startswith("jit_") for name in (p.name for p in (tmp_path / "xla").iterdir()))
  assert _run("") == "None"
