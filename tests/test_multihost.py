"""Two local CPU processes (jax.distributed over gloo) train the losses of one process with the same global batch,
and resume with each process's own data state."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from lm2_jax.train import trainer
from test_trainer import small_config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train_two_processes(workdir, steps):
  """launch.train as processes 0 and 1 of one run, one CPU device each, the data axis split over the two
  processes as over the slices of a multi-slice run (mesh.dcn_data=2)."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "launch.train", f"--config=tests/test_trainer.py:{steps}", f"--workdir={workdir}",
       "--config.checkpoint.every=100", f"--config.distributed.coordinator_address=localhost:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
       "--config.mesh.dcn_data=2"],  # data parallel across the two processes as across two slices
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for proc in procs:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def test_two_processes_train_and_resume_like_one(tmp_path):
  workdir = tmp_path / "two"
  _train_two_processes(workdir, steps=2)  # (the learning rates of its 2 steps are those of a 6-step run)
  _train_two_processes(workdir, steps=6)  # resumes at step 2, each process from its own data state
  data = json.loads((workdir / "checkpoints" / "6" / "data" / "metadata").read_text())
  assert [state["next_index"] for state in data["processes"]] == [6, 6]  # each process's own: 6 batches of its shard
  trainer.train(small_config(steps=6), str(tmp_path / "one"))  # one process, the same global batch of 8
  losses = [[json.loads(line)["loss"] for line in open(tmp_path / run / "metrics.jsonl")] for run in ("two", "one")]
  np.testing.assert_allclose(losses[0], losses[1], rtol=2e-5)
