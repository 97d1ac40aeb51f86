"""Test set-up: 8 virtual CPU devices for sharding tests (must be set before jax is imported)."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def recall_workdir(tmp_path_factory):
  """A workdir with a checkpoint of configs/tiny.py trained for 2 steps on the recall task (token ids)."""
  from configs import tiny  # pylint: disable=import-outside-toplevel  (jax only after the environment is set)
  from lm2_jax.train import trainer  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config.train.update(dict(steps=2, batch_size=8, log_every=1, warmup_steps=1))
  config.checkpoint.every = 2
  workdir = str(tmp_path_factory.mktemp("recall_workdir"))
  trainer.train(config, workdir)
  return workdir
