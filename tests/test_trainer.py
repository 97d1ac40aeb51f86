"""The training system: sharded steps, resume, plain-Orbax checkpoints, and bad input."""

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import defaults
from lm2_jax.data import recall, sources
from lm2_jax.data.pipeline import batches
from lm2_jax.model import ConfigError
from lm2_jax.parallel import use_mesh
from lm2_jax.train import trainer
from lm2_jax.train.loss import next_token_loss


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


def get_config(steps: str = "4"):
  """small_config for the launchers: --config=tests/test_trainer.py:STEPS."""
  return small_config(steps=int(steps))


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
  chex.assert_trees_all_close((p8, o8), (p1, o1), atol=1e-5, rtol=1e-4)


def packed_config(tmp_path, steps):
  """small_config on documents of token ids (ArrayRecord), packed as continuing streams."""
  config = small_config(steps=steps, continuing=True)
  rng = np.random.default_rng(0)
  path = tmp_path / "docs.array_record"
  if not path.exists():
    sources.write_token_records(str(path), [rng.integers(0, 26, n) for n in rng.integers(3, 40, 25)])
  config.data.update(dict(kind="array_record", paths=str(path), shuffle_seed=1))
  return config


@pytest.mark.parametrize("data", ["recall_fresh", "packed_documents"])
def test_resume_equals_uninterrupted(tmp_path, data):
  """Fresh memory per batch (recall), and memory carried between batches of packed document streams."""
  k = 2
  continuing = data == "packed_documents"
  make = (lambda steps: packed_config(tmp_path, steps)) if continuing else (lambda steps: small_config(steps=steps))
  full = make(2 * k)
  uninterrupted = trainer.train(full, str(tmp_path / "a"))

  half = make(k)
  trainer.train(half, str(tmp_path / "b"))
  resumed = trainer.train(full, str(tmp_path / "b"))  # same workdir, longer run: resumes at step k

  assert int(resumed.step) == int(uninterrupted.step) == 2 * k
  chex.assert_trees_all_equal(resumed, uninterrupted)  # bitwise on CPU: params, optimizer state, memory
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
  chex.assert_trees_all_equal((restored["params"], restored["memory"]), (state.params, state.memory))


def test_incompatible_checkpoint_is_refused_and_left_alone(tmp_path):
  config = small_config(steps=2)
  trainer.train(config, str(tmp_path))
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  other = small_config(steps=4)
  other.model.d_model = 48
  with pytest.raises(ConfigError, match=r"config.model.d_model=48: the checkpoint .* was written with 32"):
    trainer.train(other, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before
  # Inference-time knobs may differ: the checkpoint restores under a config that only changes them.
  knobs = small_config(steps=2)
  knobs.model.memory.update(dict(skip_threshold=0.5, capacity_factor=1.0))
  _, _, restored = trainer.restore(str(tmp_path), knobs)
  assert int(restored.step) == 2


def test_token_ids_out_of_range_are_refused(tmp_path):
  config = small_config(steps=2)
  data = batches(recall.from_config(config), 8)
  config.model.vocab_size = 16  # the task uses 26 ids
  with pytest.raises(ConfigError, match=r"model.vocab_size=16.*token ids in \[\d+, 2\d\]"):
    trainer.train(config, str(tmp_path / "run"), data)
  assert not os.path.exists(tmp_path / "run")  # nothing written: no checkpoints/, config.json or metrics


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
  """2 accumulated batches of 8 make the same update as one batch of 16 (same samples: every recall sample has
  the same number of answer tokens, so the mean of the two batch losses is the loss of the union)."""
  accumulated = small_config(steps=4)
  accumulated.train.update(dict(grad_accum_steps=2, warmup_steps=2))
  larger = small_config(steps=2)
  larger.train.update(dict(batch_size=16, warmup_steps=1))
  a = trainer.train(accumulated, str(tmp_path / "a"))
  b = trainer.train(larger, str(tmp_path / "b"))
  chex.assert_trees_all_close(a.params, b.params, atol=2e-6, rtol=1e-5)
  assert not np.allclose(a.params["embed"]["embedding"], trainer.init_state(trainer.build(larger)).params["embed"]["embedding"])


def test_batch_that_the_mesh_cannot_split_is_refused():
  config = small_config()
  config.train.batch_size = 4
  with pytest.raises(ConfigError, match=r"config.train.batch_size=4: must be a multiple of .* = 8 devices"):
    trainer.build(config)


def test_missing_data_files_are_refused_before_anything_is_written(tmp_path):
  config = small_config(steps=2)
  config.data.update(dict(kind="text_files", paths=str(tmp_path / "nothing/*.txt"), tokenizer="x.model"))
  with pytest.raises(ConfigError, match=r"config.data.paths=.*matches no file"):
    trainer.train(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_text_launchers_end_to_end(tmp_path):
  """train_tokenizer -> train on packed text with a carried memory -> evaluate, through the absl launchers."""
  from test_data import write_corpus

  train_files = write_corpus(tmp_path / "train", num_files=2, words=800)
  write_corpus(tmp_path / "eval", num_files=1, words=800)
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600)
  out = run("launch.train_tokenizer", f"--input={tmp_path / 'train'}/*.txt", f"--output={tmp_path / 'spm'}",
            "--vocab_size=120")
  assert out.returncode == 0, out.stderr[-2000:]
  workdir = tmp_path / "run"
  flags = ["--config=configs/quickstart.py", f"--workdir={workdir}", "--config.data.kind=text_files",
           f"--config.data.paths={train_files[0]},{train_files[1]}", "--config.data.text_split=paragraph",
           f"--config.data.tokenizer={tmp_path / 'spm.model'}", "--config.data.continuing_stream=True",
           f"--config.data.eval_paths={tmp_path / 'eval'}/*.txt", "--config.model.vocab_size=128",
           "--config.train.steps=4", "--config.train.warmup_steps=1", "--config.train.log_every=2",
           "--config.train.batch_size=8", "--config.checkpoint.every=4"]
  out = run("launch.train", *flags)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  out = run("launch.evaluate", f"--workdir={workdir}", "--num_batches=2")
  assert out.returncode == 0, out.stderr[-2000:]
  results = json.loads((workdir / "eval_4.json").read_text())
  assert results["step"] == 4 and results["batches"] == 2
  assert np.isclose(results["perplexity"], np.exp(results["loss"])) and 1 < results["perplexity"] < 128


@pytest.mark.parametrize("kind", ["lm2", "hierarchical", "rmt"])
def test_windowed_row_equals_the_whole_row(kind):
  """A row of 4 gradient windows (bptt_segments=1, 4 segments of 8 tokens, window_tokens=8) is run window by
  window (`trainer.row_windows`); its loss, accuracy, memory after the row and gradients must equal plain
  autodiff of the row's loss in one model call. Documents start at a window boundary (token 16) and inside a
  window (token 21), so a window that starts a document must start from a fresh memory."""
  config = small_config(kind=kind, continuing=True)
  config.model.update(dict(bptt_segments=1))
  config.train.update(dict(batch_size=2, seq_len=32, window_tokens=8))
  if kind == "hierarchical":
    config.model.memory.update(dict(num_slots=4, num_banks=4, bank_slots=4, top_k=2, write_tokens=4))
  setup = trainer.build(config, jax.devices()[:1])
  assert trainer.row_windows(setup.model.config, 32, 8) == 4
  assert trainer.row_windows(setup.model.config, 32, 20) == 2  # 16 tokens: the most whole windows that fit
  assert trainer.row_windows(setup.model.config, 24, 16) == 3  # 16 does not divide 24: windows of 8
  assert trainer.row_windows(setup.model.config, 32, 32) == 1
  state = trainer.init_state(setup)
  model, params = setup.model, state.params
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.model.vocab_size, (2, 32)).astype(np.int32)
  ids = np.repeat(np.array([[0, 1, 2], [0, 0, 5]]), [16, 5, 11], axis=1).astype(np.int32)
  mask = (ids == np.roll(ids, 1, axis=1)) & (rng.random((2, 32)) < 0.8)
  memory = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(a.dtype), model.init_memory(2))
  batch = {"tokens": tokens, "segment_ids": ids, "loss_mask": mask}

  def whole_row(p):
    logits, new_memory, aux = model.apply({"params": p}, tokens, memory, segment_ids=ids)
    loss, accuracy = next_token_loss(logits, tokens, mask)
    return loss + sum(aux["losses"].values(), 0.0), (loss, accuracy, new_memory)

  grads, (loss, accuracy, new_memory) = jax.grad(whole_row, has_aux=True)(params)
  w_loss, w_accuracy, w_memory, _, w_grads = trainer._loss_and_grads(model, params, batch, memory, window_tokens=8)
  np.testing.assert_allclose(w_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(w_accuracy, accuracy, rtol=1e-6)
  chex.assert_trees_all_close(w_memory, new_memory, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(w_grads, grads, atol=1e-6, rtol=1e-4)
  metrics, e_memory = trainer.make_eval_step(setup)(params, batch, memory)  # the eval step, in windows too
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  chex.assert_trees_all_close(e_memory, new_memory, atol=1e-5, rtol=1e-5)
