"""launch/host_memory.py: with freed memory kept, a repeated train step stops faulting its pages back in (the
kernel's count of minor page faults, getrusage), against the same step in a process with glibc's defaults."""

import os
import subprocess
import sys

_STEP_FAULTS = """
import resource
import launch  # applies launch/host_memory.py unless LM2_KEEP_HOST_MEMORY=0
import jax, jax.numpy as jnp
from lm2_jax.model import LM2Model, init_params
from lm2_jax.model.config import default_model_config
from lm2_jax.train.loss import next_token_loss
m = default_model_config()
m.update(dict(vocab_size=256, d_model=128, num_layers=2, num_heads=4, num_kv_heads=4, d_ff=256, segment_len=128))
m.memory.update(dict(kind="lm2", num_slots=16, num_heads=4))
model = LM2Model(m)
params = init_params(model, jax.random.key(0))
tokens = jnp.zeros((2, 256), jnp.int32)
step = jax.jit(jax.grad(lambda p: next_token_loss(model.apply({"params": p}, tokens)[0], tokens)[0]))
for _ in range(3):
  jax.block_until_ready(step(params))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  jax.block_until_ready(step(params))
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _faults_per_step(keep: str) -> float:
  env = {**os.environ, "LM2_KEEP_HOST_MEMORY": keep}
  out = subprocess.run([sys.executable, "-c", _STEP_FAULTS], env=env, capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return float(out.stdout.strip().splitlines()[-1])


def test_kept_host_memory_stops_the_page_faults_of_every_step():
  default, kept = _faults_per_step("0"), _faults_per_step("1")
  assert default > 2000, default  # 8 MiB of pages faulted back in per step: glibc returned them to the kernel
  assert kept < 0.5 * default, (kept, default)
