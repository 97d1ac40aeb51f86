"""How often an 8-virtual-CPU-device training run aborts in XLA's all-reduce rendezvous, with its programs loaded
from the persistent compilation cache against compiled afresh (why launch/compile_cache.py keeps the cache off
there; PERF_NOTES.md section 6 has the measurements).

  python -m benchmarks.cpu_cache_rendezvous --runs=8 [--data=recall]

Each run is a fresh process with --xla_force_host_platform_device_count=8 that trains, for 12 steps with a
checkpoint every step, the config of the test that failed in CI: `tests/test_trainer.py: packed_config`, packed
documents with a memory carried between batches (`--data=packed`), or the same model on a continuing recall
stream (`--data=recall`; it did not abort in 6 cached runs, log cpu_cache_rendezvous_recall_stream.txt). The
cache is written by one cold run first; the runs then alternate between the warm cache and no cache. An abort is
XLA's "Termination timeout ... exceeded" (exit by SIGABRT after 40 s of waiting). Rerun it after a jax upgrade:
when the cached column shows no abort either, the guard in compile_cache.py can go.
"""

import os
import subprocess
import sys
import tempfile

from absl import app, flags

_RUNS = flags.DEFINE_integer("runs", 8, "Runs per mode (cached, fresh).")
_DATA = flags.DEFINE_enum("data", "packed", ["packed", "recall"], "Packed documents, or a continuing recall stream.")

CHILD = """
import importlib.util, pathlib, sys, tempfile
import jax
if sys.argv[1]:
  jax.config.update("jax_compilation_cache_dir", sys.argv[1])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
from lm2_jax.train import trainer
spec = importlib.util.spec_from_file_location("test_trainer", "tests/test_trainer.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)  # the tests' configs (needs the [test] extras)
if sys.argv[2] == "packed":
  config = module.packed_config(pathlib.Path(tempfile.mkdtemp()), steps=12)
else:
  config = module.small_config(steps=12, continuing=True)
config.checkpoint.every = 1
trainer.train(config, tempfile.mkdtemp())
"""


def _one(cache_dir: str) -> bool:
  """Whether one run aborted in the rendezvous (another failure raises)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", CHILD, cache_dir, _DATA.value], capture_output=True, text=True,
                       env=env, timeout=900, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  aborted = "Termination timeout" in out.stderr
  if out.returncode != 0 and not aborted:
    raise RuntimeError(f"run failed for another reason (exit {out.returncode}): {out.stderr[-2000:]}")
  return aborted


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as cache:
    cold = _one(cache)
    print(f"cold run (writes the cache): {'aborted' if cold else 'ok'}", flush=True)
    aborts = {"cached": 0, "fresh": 0}
    for i in range(_RUNS.value):
      for mode, directory in (("cached", cache), ("fresh", "")):
        aborted = _one(directory)
        aborts[mode] += aborted
        print(f"run {i + 1} {mode}: {'ABORTED in the rendezvous' if aborted else 'ok'}", flush=True)
  for mode, count in aborts.items():
    print(f"{mode}: {count} of {_RUNS.value} runs aborted")


if __name__ == "__main__":
  app.run(main)
