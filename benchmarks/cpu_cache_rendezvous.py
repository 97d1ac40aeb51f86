"""How often an 8-virtual-CPU-device training run aborts in XLA's all-reduce rendezvous, with its programs loaded
from the persistent compilation cache against compiled afresh (why launch/compile_cache.py keeps the cache off
there; PERF_NOTES.md section 6 has the measurements).

  python -m benchmarks.cpu_cache_rendezvous --runs=8

Each run is a fresh process with --xla_force_host_platform_device_count=8 that trains configs/tiny.py for
`--steps` steps on the recall task with a checkpoint every step. The cache is written by one cold run first; the
runs then alternate between the warm cache and no cache. An abort is XLA's "Termination timeout ... exceeded"
(exit by SIGABRT after 40 s of waiting). Rerun it after a jax upgrade: when the cached column shows no abort
either, the guard in compile_cache.py can go.
"""

import os
import subprocess
import sys
import tempfile

from absl import app, flags

_RUNS = flags.DEFINE_integer("runs", 8, "Runs per mode (cached, fresh).")
_STEPS = flags.DEFINE_integer("steps", 12, "Training steps per run.")

CHILD = """
import sys, tempfile
import jax
if sys.argv[1]:
  jax.config.update("jax_compilation_cache_dir", sys.argv[1])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
from configs import tiny
from lm2_jax.train import trainer
config = tiny.get_config()
config.train.update(steps=int(sys.argv[2]), batch_size=8, log_every=1, warmup_steps=1)
config.checkpoint.every = 1
trainer.train(config, tempfile.mkdtemp())
"""


def _one(cache_dir: str) -> tuple[bool, str]:
  """(aborted in the rendezvous, last stderr line) of one run."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", CHILD, cache_dir, str(_STEPS.value)], capture_output=True, text=True,
                       env=env, timeout=900, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  aborted = "Termination timeout" in out.stderr
  if out.returncode != 0 and not aborted:
    raise RuntimeError(f"run failed for another reason (exit {out.returncode}): {out.stderr[-2000:]}")
  return aborted, (out.stderr.strip().splitlines() or [""])[-1][:120]


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as cache:
    cold, _ = _one(cache)
    print(f"cold run (writes the cache): {'aborted' if cold else 'ok'}", flush=True)
    aborts = {"cached": 0, "fresh": 0}
    for i in range(_RUNS.value):
      for mode, directory in (("cached", cache), ("fresh", "")):
        aborted, _ = _one(directory)
        aborts[mode] += aborted
        print(f"run {i + 1} {mode}: {'ABORTED in the rendezvous' if aborted else 'ok'}", flush=True)
  for mode, count in aborts.items():
    print(f"{mode}: {count} of {_RUNS.value} runs aborted")


if __name__ == "__main__":
  app.run(main)
