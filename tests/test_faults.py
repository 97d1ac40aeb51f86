"""Runs that survive: bad settings are refused before anything is written, damaged checkpoints fall back to the
newest good one, non-finite steps stop (or are skipped) without losing the last good checkpoint, SIGTERM saves
and resumes bitwise, and the launchers print one line."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import defaults
from lm2_jax.data import recall, sources
from lm2_jax.data.pipeline import batches
from lm2_jax.model import ConfigError
from lm2_jax.train import trainer
from lm2_jax.train.checkpoint import CheckpointError
from lm2_jax.train.config import check_known_fields
from lm2_jax.train.guards import NonFiniteError
from lm2_jax.train.optimizer import learning_rate_schedule
from test_trainer import packed_config, small_config

BAD_SETTINGS = [
    ("train.batch_size", -8, "must be a positive integer"),
    ("train.batch_size", 0, "must be a positive integer"),
    ("train.log_every", 0, "must be a positive integer"),
    ("checkpoint.every", 0, "must be a positive integer"),
    ("checkpoint.keep", 0, "must be a positive integer"),
    ("train.learning_rate", float("nan"), "must be a finite number >= 0"),
    ("train.learning_rate", float("inf"), "must be a finite number >= 0"),
    ("train.learning_rate", -1e-3, "must be a finite number >= 0"),
    ("train.b2", 1.0, "must be a finite number in [0, 1)"),
    ("train.nonfinite", "ignore", "use one of ('stop', 'skip')"),
    ("train.window_tokens", -1, "must be an integer >= 0"),
]


@pytest.mark.parametrize("field,value,fix", BAD_SETTINGS, ids=[f"{f}={v}" for f, v, _ in BAD_SETTINGS])
def test_bad_run_setting_is_refused_before_anything_is_written(tmp_path, field, value, fix):
  config = small_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError) as e:
    trainer.train(config, str(tmp_path / "run"))
  assert str(e.value).startswith(f"config.{field}={value!r}: {fix}"), str(e.value)
  assert not os.path.exists(tmp_path / "run")


def test_warmup_longer_than_the_run_is_clipped():
  """A 4-step run of a config with 100 warmup steps warms up over 3 steps, then decays for 1 (optax's cosine)."""
  config = small_config(steps=4)
  config.train.update(dict(warmup_steps=100, learning_rate=0.1, final_lr_fraction=0.1))
  schedule = learning_rate_schedule(config.train)
  np.testing.assert_allclose([float(schedule(s)) for s in range(5)], [0.0, 0.1 / 3, 0.2 / 3, 0.1, 0.01],
                             rtol=1e-6)


def test_unknown_field_of_a_config_file_is_named():
  config = defaults.get_config()
  config.train.learning_rat = 1e-3  # what a typo in a config file makes: ConfigDicts accept new fields
  with pytest.raises(ConfigError, match=r"^config.train.learning_rat=0.001: unknown field; the fields of "
                     r"config.train are \['b1', 'b2', 'batch_size'"):
    check_known_fields(config, defaults.get_config())
  config = defaults.get_config()
  config.trian = {"steps": 3}
  with pytest.raises(ConfigError, match=r"^config.trian=.*unknown section"):
    check_known_fields(config, defaults.get_config())
  for name in ("tiny", "quickstart", "babilong_lm2", "babilong_full", "recall_capacity", "lm2_1b"):
    check_known_fields(__import__(f"configs.{name}", fromlist=["x"]).get_config(), defaults.get_config())


def test_binary_file_is_not_trained_on_as_text(tmp_path):
  (tmp_path / "good.txt").write_text("plain text, with an accent: café\n")
  (tmp_path / "model.bin").write_bytes(np.arange(1000, dtype=np.int32).tobytes())
  (tmp_path / "latin1.txt").write_bytes("na\xefve caf\xe9 ".encode("latin-1") * 10)  # 2 of 11 characters invalid
  assert sources.TextFiles(str(tmp_path / "good.txt")).docs == ["plain text, with an accent: café"]
  with pytest.raises(ConfigError, match=r"model.bin is not UTF-8 text \(it holds NUL bytes\)"):
    sources.TextFiles(f"{tmp_path / 'good.txt'},{tmp_path / 'model.bin'}")
  with pytest.raises(ConfigError, match=r"latin1.txt is not UTF-8 text \(18% of it is not valid UTF-8\)"):
    sources.TextFiles(str(tmp_path / "latin1.txt"))


# --- checkpoints -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("docs")


def twelve_steps(data_dir):
  """small_config on packed documents with a memory carried between batches, 12 steps, checkpoints every 4."""
  config = packed_config(data_dir, steps=12)
  config.checkpoint.every = 4
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """The uninterrupted run of twelve_steps: checkpoints at steps 4, 8 and 12."""
  workdir = tmp_path_factory.mktemp("trained")
  trainer.train(twelve_steps(data_dir), str(workdir))
  return workdir


def _array_files(step_dir):
  return glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*")


def _truncate(step_dir):
  for path in _array_files(step_dir):
    os.truncate(path, os.path.getsize(path) // 2)


def _flip_bit(step_dir):
  for path in _array_files(step_dir):
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) // 3, len(data), 97):  # bit rot in many places: one flip alone can land on padding
      data[i] ^= 0x04
    open(path, "wb").write(bytes(data))


FAULTS = {
    "truncated array files": (_truncate, "item 'state'"),
    "flipped bits": (_flip_bit, "item 'state'"),
    "missing state": (lambda d: shutil.rmtree(f"{d}/state"), "item 'state' is missing"),
    "missing data": (lambda d: shutil.rmtree(f"{d}/data"), "item 'data' is missing"),
    "garbage config": (lambda d: open(f"{d}/config/metadata", "wb").write(b"\x93{not json" * 20),
                       "item 'config' is not readable JSON"),
}


def _plain_orbax_state(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


@pytest.mark.parametrize("fault", FAULTS)
def test_damaged_checkpoint_falls_back_to_the_newest_good_one(trained, tmp_path, capfd, fault):
  damage, why = FAULTS[fault]
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  damage(workdir / "checkpoints" / "12")
  _, _, state = trainer.restore(str(workdir))  # what launch.evaluate does
  assert int(state.step) == 8
  chex.assert_trees_all_equal(state.params, _plain_orbax_state(trained, 8)["params"])
  err = capfd.readouterr().err
  assert f"checkpoint step 12 in {workdir}/checkpoints is damaged: {why}" in err, err
  assert "using step 8, the newest good checkpoint" in err
  with pytest.raises(CheckpointError, match=f"checkpoint step 12 .* is damaged: {why}"):
    trainer.restore(str(workdir), step=12)  # a step asked for is not replaced by another
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "4", "8"]  # evaluation moves nothing


def test_training_resumes_from_the_newest_good_checkpoint(trained, data_dir, tmp_path):
  """Step 12 truncated: the run resumes at step 8, sets step 12 aside (not deleted), and trains the same step 12."""
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  _truncate(workdir / "checkpoints" / "12")
  state = trainer.train(twelve_steps(data_dir), str(workdir))
  chex.assert_trees_all_equal(state.params, _plain_orbax_state(trained, 12)["params"])
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "4", "8"]
  assert os.listdir(workdir / "damaged_checkpoints") == ["12"]


def test_every_checkpoint_damaged_is_an_error(trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  _truncate(workdir / "checkpoints" / "12")
  _flip_bit(workdir / "checkpoints" / "8")
  shutil.rmtree(workdir / "checkpoints" / "4" / "data")
  with pytest.raises(CheckpointError, match=r"every checkpoint in .* is damaged \(steps \[12, 8, 4\]"):
    trainer.train(small_config(steps=16), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "4", "8"]


def test_resuming_with_another_batch_size_names_it(trained):
  config = small_config(steps=16)
  config.train.batch_size = 16
  with pytest.raises(ConfigError, match=r"config.train.batch_size=16: the checkpoint .* \(step 12\) was written "
                     "with 8. Resume with the same train.batch_size, or start in a new --workdir"):
    trainer.train(config, str(trained))


# --- non-finite steps --------------------------------------------------------------------------------------------

class Poisoned:
  """Recall batches with a float loss mask, NaN in one row of batch `at` (1-based): that step's loss is NaN."""

  def __init__(self, config, at):
    self.it, self.at, self.n = batches(recall.from_config(config), config.train.batch_size), at, 0

  def __next__(self):
    batch = next(self.it)
    self.n += 1
    batch["loss_mask"] = batch["loss_mask"].astype(np.float32)
    if self.n == self.at:
      batch["loss_mask"][0, -1] = np.nan
    return batch

  def get_state(self):
    return {"inner": self.it.get_state(), "n": self.n}

  def set_state(self, state):
    self.it.set_state(state["inner"])
    self.n = state["n"]


def test_nonfinite_loss_stops_with_a_diagnosis_and_keeps_the_good_checkpoint(tmp_path):
  config = small_config(steps=5)
  config.checkpoint.every = 1
  with pytest.raises(NonFiniteError, match=r"training stopped at step 3: the loss is not finite \(non-finite "
                     r"gradients in decoder/.* and \d+ more of \d+ groups\); learning rate 0.00\d+; the last good "
                     "checkpoint is step 2"):
    trainer.train(config, str(tmp_path), Poisoned(config, at=3))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  params = _plain_orbax_state(tmp_path, 2)["params"]
  chex.assert_tree_all_finite(params)


def test_nonfinite_step_is_skipped(tmp_path, capfd):
  config = small_config(steps=4)
  config.checkpoint.every = 1
  config.train.nonfinite = "skip"
  trainer.train(config, str(tmp_path), Poisoned(config, at=3))
  assert "step 3: the loss is not finite" in capfd.readouterr().err
  before, skipped, after = (_plain_orbax_state(tmp_path, s) for s in (2, 3, 4))
  for name in ("params", "opt_state", "memory"):  # the skipped step changed nothing
    chex.assert_trees_all_equal(skipped[name], before[name])
  assert int(skipped["step"]) == 3
  chex.assert_tree_all_finite(after["params"])
  assert not np.array_equal(after["params"]["lm_head"]["kernel"], skipped["params"]["lm_head"]["kernel"])


# --- launchers and signals ---------------------------------------------------------------------------------------

def _launch(*args, **kwargs):
  return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **kwargs)


def test_launcher_prints_one_line_and_exits_nonzero(tmp_path):
  args = ["launch.train", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}", "--config.train.log_every=0"]
  out, err = _launch(*args).communicate(timeout=300)
  assert err.splitlines() == ["error: config.train.log_every=0: must be a positive integer"], err
  out, err = _launch(*args, env=dict(os.environ, LM2_VERBOSE="1")).communicate(timeout=300)
  assert "Traceback (most recent call last)" in err and err.rstrip().endswith(
      "ConfigError: config.train.log_every=0: must be a positive integer")
  assert not os.path.exists(tmp_path / "run")


def _losses(workdir):
  return [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_sigterm_saves_and_the_resumed_run_is_bitwise_the_uninterrupted_one(trained, data_dir, tmp_path):
  """SIGTERM while a checkpoint is being saved (one every step): the run saves its step and exits within seconds;
  resumed, its losses, parameters and carried memory are bitwise those of the uninterrupted run (so the packer's
  state saved is the one after the last completed step)."""
  run = tmp_path / "interrupted"
  data = twelve_steps(data_dir).data
  proc = _launch("launch.train", "--config=tests/test_trainer.py:12", f"--workdir={run}",
                 "--config.checkpoint.every=1", "--config.data.continuing_stream=True",
                 *[f"--config.data.{k}={data[k]}" for k in ("kind", "paths", "shuffle_seed")])
  while not (run / "metrics.jsonl").exists() or len(_losses(run)) < 3:
    assert proc.poll() is None, proc.communicate()[1]
    time.sleep(0.02)
  sent = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert time.monotonic() - sent < 10
  assert proc.returncode == 128 + signal.SIGTERM, err
  stopped = int(err.split("stopped by SIGTERM at step ")[1].split()[0])
  assert 3 <= stopped < 12 and max(int(s) for s in os.listdir(run / "checkpoints")) == stopped
  resumed = trainer.train(twelve_steps(data_dir), str(run))
  assert _losses(run) == _losses(trained)
  final = _plain_orbax_state(trained, 12)
  chex.assert_trees_all_equal((resumed.params, resumed.memory), (final["params"], final["memory"]))
