"""Test set-up (must come before jax is imported): 8 virtual CPU devices for the sharding tests, and XLA's LLVM
backend at optimisation level 0. The tests' programs are tiny, so their time is compilation: level 0 halves it
(the slowest model tests: 130 s -> 66 s) and leaves the programs XLA builds (HLO passes) as they are; only the
machine code is less optimised. Set LM2_TEST_XLA_OPT=1 to test with XLA's default backend optimisation."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
if os.environ.get("LM2_TEST_XLA_OPT") != "1":
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def recall_workdir(tmp_path_factory):
  """configs/tiny.py on the recall task (token ids): started by launch.import_hf from a Llama checkpoint (random
  weights, written by hf_llama.save into ../llama), then trained 2 steps by trainer.train. Checkpoints 0 (the
  import) and 2."""
  import jax  # pylint: disable=import-outside-toplevel  (after the environment above)
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from lm2_jax.interop import hf_llama  # pylint: disable=import-outside-toplevel
  from lm2_jax.model import LM2Model, init_params  # pylint: disable=import-outside-toplevel
  from lm2_jax.train import trainer  # pylint: disable=import-outside-toplevel

  tmp = tmp_path_factory.mktemp("recall")
  train = dict(steps=2, batch_size=8, log_every=1, warmup_steps=1)
  config = tiny.get_config()
  config.train.update(train)
  config.checkpoint.every = 2
  llama = config.model.copy_and_resolve_references()
  llama.memory.kind = "none"
  hf_llama.save(init_params(LM2Model(llama), jax.random.key(7)), llama, str(tmp / "llama"))
  out = subprocess.run([sys.executable, "-m", "launch.import_hf", f"--hf_dir={tmp / 'llama'}",
                        "--config=configs/tiny.py", f"--workdir={tmp / 'workdir'}",
                        *[f"--config.train.{k}={v}" for k, v in train.items()]],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  trainer.train(config, str(tmp / "workdir"))
  return str(tmp / "workdir")
