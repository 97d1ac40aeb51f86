"""The training system: sharded steps, resume, plain-Orbax checkpoints, and bad input."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import defaults
from lm2_jax.data import recall
from lm2_jax.data.pipeline import batches
from lm2_jax.model import ConfigError
from lm2_jax.parallel import use_mesh
from lm2_jax.train import trainer


def small_config(steps=4, kind="lm2", continuing=False):
  config = defaults.get_config()
  m = config.model
  m.update(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, segment_len=8, bptt_segments=0))
  m.memory.kind, m.memory.num_slots, m.memory.num_heads = kind, 6, 2
  d = config.data
  d.update(dict(num_segments=3, num_pairs=4, num_queries=2, num_keys=8, num_values=8, num_filler=8,
                continuing_stream=continuing))
  m.vocab_size = 2 + 8 + 8 + 8
  t = config.train
  t.update(dict(steps=steps, batch_size=8, seq_len=24, warmup_steps=1, log_every=1, learning_rate=1e-2))
  config.checkpoint.every = 2
  config.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  return config


def _leaves_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_sharded_train_step_matches_one_device():
  config = small_config()
  batch = next(batches(recall.from_config(config), 8))
  results = []
  for mesh, devices in [(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]), (dict(data=2, fsdp=2, tensor=2), None)]:
    config.mesh.update(mesh)
    setup = trainer.build(config, devices)
    state = trainer.init_state(setup)
    with use_mesh(setup.mesh):
      state, metrics = trainer.make_train_step(setup)(state, trainer.put_batch(setup, batch))
    assert len(state.params["embed"]["embedding"].sharding.device_set) == (1 if devices else 8)
    results.append(jax.device_get((metrics, state.params, state.opt_state)))
  (m1, p1, o1), (m8, p8, o8) = results
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  jax.tree.map(close, p8, p1)
  jax.tree.map(close, o8, o1)


@pytest.mark.parametrize("continuing", [False, True])
def test_resume_equals_uninterrupted(tmp_path, continuing):
  k = 2
  full = small_config(steps=2 * k, continuing=continuing)
  uninterrupted = trainer.train(full, str(tmp_path / "a"))

  half = small_config(steps=k, continuing=continuing)
  trainer.train(half, str(tmp_path / "b"))
  resumed = trainer.train(full, str(tmp_path / "b"))  # same workdir, longer run: resumes at step k

  assert int(resumed.step) == int(uninterrupted.step) == 2 * k
  _leaves_equal(resumed.params, uninterrupted.params)  # bitwise on CPU
  _leaves_equal(resumed.opt_state, uninterrupted.opt_state)
  _leaves_equal(resumed.memory, uninterrupted.memory)
  if continuing:  # the memory really is carried: it is not the fresh one
    assert not np.allclose(resumed.memory["slots"], trainer.build(full).model.init_memory(8)["slots"])
  # Both runs saw the same batches: their iterators stand at the same place.
  states = [ocp.CheckpointManager(str(tmp_path / d / "checkpoints")).restore(
      2 * k, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"] for d in ("a", "b")]
  assert states[0] == states[1]
  steps = [int(l.split('"step": ')[1].split(",")[0]) for l in open(tmp_path / "b" / "metrics.jsonl")]
  assert steps == list(range(1, 2 * k + 1))


def test_checkpoint_restores_with_plain_orbax(tmp_path):
  config = small_config(steps=2)
  state = trainer.train(config, str(tmp_path))
  restored = ocp.StandardCheckpointer().restore(os.path.join(tmp_path, "checkpoints", "2", "state"))
  assert set(restored) == {"step", "params", "opt_state", "memory"} and int(restored["step"]) == 2
  _leaves_equal(restored["params"], state.params)
  _leaves_equal(restored["memory"], state.memory)


def test_incompatible_checkpoint_is_refused_and_left_alone(tmp_path):
  config = small_config(steps=2)
  trainer.train(config, str(tmp_path))
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  other = small_config(steps=4)
  other.model.d_model = 48
  with pytest.raises(ConfigError, match=r"config.model.d_model=48: the checkpoint .* was written with 32"):
    trainer.train(other, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_token_ids_out_of_range_are_refused(tmp_path):
  config = small_config(steps=2)
  data = batches(recall.from_config(config), 8)
  config.model.vocab_size = 16  # the task uses 26 ids
  with pytest.raises(ConfigError, match=r"model.vocab_size=16.*token ids in \[\d+, 2\d\]"):
    trainer.train(config, str(tmp_path / "run"), data)
  assert not os.path.exists(tmp_path / "run")  # nothing written: no checkpoints/, config.json or metrics
