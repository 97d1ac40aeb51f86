"""The sleep phase: distillation lowers the KL, adapters touch only their layers, consolidated slots are fresh,
writes are atomic, an empty session writes nothing, and the output restores with plain Orbax into a Session.

Models read token ids (IdTokenizer) and the general text is random ids: no tokenizer to train. All consolidations
of the lm2 model share one setup (`_SLEEP`), so its training step compiles once.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import build, tiny_config
from lm2_jax.consolidate import NothingToConsolidate, distill, output
from lm2_jax.data.id_tokenizer import IdTokenizer
from lm2_jax.sessions import Session
from lm2_jax.sessions.export import export, load_export

TOK = IdTokenizer(64)
GENERAL = np.random.default_rng(1).integers(0, 64, 400)
_SLEEP = dict(general=GENERAL, steps=3, learning_rate=3e-4, general_weight=0.0)


def _text(seed, n):
  return " ".join(map(str, np.random.default_rng(seed).integers(2, 64, n)))


def _session(kind="lm2", n=36, **overrides):
  """A session of a tiny random model with n tokens injected (8-token segments: n // 8 of them in memory)."""
  config = tiny_config(kind, **overrides)
  _, params = build(config)
  s = Session(params, config, TOK)
  s.inject(_text(0, n))
  return s


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _fresh_logp(model, params, rows, prefix=None):
  """log p(. | rows) from a fresh memory (into which the tokens `prefix` [P] were written first, as whole segments
  before every row: a segment sees only its own tokens and the memory)."""
  if prefix is None:
    return _log_softmax(model.apply({"params": params}, rows)[0])
  full = np.concatenate([np.tile(prefix, (len(rows), 1)), rows], axis=1)
  return _log_softmax(model.apply({"params": params}, full)[0][:, len(prefix):])


def _kl(t, s):
  return float(np.mean(np.sum(np.exp(t) * (t - s), axis=-1)))


def _kl_numpy(model, params, memory, rows, prefix=None):
  """KL(teacher || student) per position, averaged: teacher = `params` of the session with its memory (fixed
  teacher logits), student = `params` with a fresh memory (holding `prefix`); NumPy on the logits of plain
  forwards."""
  tiled = jax.tree.map(lambda x, ax: np.repeat(x, len(rows), axis=ax.index("batch")), memory, model.memory_axes(),
                       is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x))
  teacher = _log_softmax(model.apply({"params": params}, rows, tiled)[0])
  return lambda student: _kl(teacher, _fresh_logp(model, student, rows, prefix))


def test_a_consolidation_lowers_the_kl_on_the_replay_set():
  s = _session()
  params0, memory0 = s.params, s.state.memory
  rows = np.asarray(s.tokens[:32], np.int32).reshape(4, 8)  # the 4 complete segments: the replay set
  kl = _kl_numpy(s.model, params0, memory0, rows)
  report = s.sleep(**_SLEEP)
  assert report["segments"]["spans"] == [[0, 8], [8, 16], [16, 24], [24, 32]]
  assert kl(params0) > 0
  np.testing.assert_allclose(report["kl_before"], kl(params0), rtol=1e-3)
  assert kl(s.params) < 0.9 * kl(params0), (kl(s.params), kl(params0))
  np.testing.assert_allclose(report["kl_after"], kl(s.params), rtol=1e-3)


def test_the_objective_with_interference_and_rehearsal_matches_numpy():
  """The loss of one consolidation step, at parameters away from theta_0, against plain forwards: KL(teacher with
  the memory || student with general text written into a fresh memory) on the replay rows + KL(theta_0 || theta,
  both from such a memory) on the rehearsed rows."""
  s = _session()
  params0, model = s.params, s.model
  rows, rehearsed = (np.asarray(s.tokens[a:a + 16], np.int32).reshape(2, 8) for a in (0, 16))
  prefix = GENERAL[:8].astype(np.int32)
  params1 = jax.tree.map(lambda x: x + 0.05 * np.random.default_rng(x.size).standard_normal(x.shape, np.float32),
                         params0)
  fn = distill._Functions(model.config, 0, 1.0, 1e-3, 0.0, "all", "attn,mlp")
  teacher = fn.teacher(params0, rows, distill._tile(model, s.state.memory, 2))
  tile = lambda x: np.tile(x, (2, 1))
  ones = np.ones((2, 8), np.float32)
  _, _, loss = fn.step(params1, fn.tx.init(params1), params0, params0, teacher, rows, ones, tile(GENERAL[8:24]),
                       tile(prefix), (rehearsed, ones, tile(prefix), None))
  expected = (_kl_numpy(model, params0, s.state.memory, rows, prefix)(params1)
              + _kl(_fresh_logp(model, params0, rehearsed, prefix), _fresh_logp(model, params1, rehearsed, prefix)))
  assert expected > 1e-3
  np.testing.assert_allclose(float(loss), expected, rtol=2e-4)


def test_the_confidence_weighted_objective_against_its_anchor_matches_numpy():
  """weighting 'confidence', general_loss 'kl': sum_t w_t KL_t / sum_t w_t with w_t the teacher's top
  probability, for the replay term (teacher: theta_0 with the memory) plus the general term (teacher: the anchor,
  neither theta nor theta_0), students from a fresh memory."""
  s = _session()
  model, params0 = s.model, s.params
  noise = lambda scale, seed: jax.tree.map(
      lambda x: x + scale * np.random.default_rng(x.size + seed).standard_normal(x.shape, np.float32), params0)
  params1, anchor = noise(0.05, 0), noise(0.5, 1)  # a sharper anchor: weights far from uniform
  fn = distill._Functions(model.config, 0, 1.0, 1e-3, 1.0, "all", "attn,mlp", "kl", "confidence")
  rows = np.asarray(s.tokens[:16], np.int32).reshape(2, 8)
  g_rows = GENERAL[:32].astype(np.int32).reshape(2, 16)
  teacher = fn.teacher(params0, rows, distill._tile(model, s.state.memory, 2))
  mask = np.array([[1] * 8, [1] * 5 + [0] * 3], np.float32)
  _, _, loss = fn.step(params1, fn.tx.init(params1), params0, anchor, teacher, rows, mask, g_rows, None, None)

  def weighted_kl(t, st, m, confidence=True):
    w = m * (np.exp(t.max(-1)) if confidence else np.ones(t.shape[:-1]))
    return float(np.sum(w * np.sum(np.exp(t) * (t - st), -1)) / w.sum())
  terms = lambda confidence: (
      weighted_kl(np.asarray(teacher, np.float64), _fresh_logp(model, params1, rows), mask, confidence)
      + weighted_kl(_fresh_logp(model, anchor, g_rows), _fresh_logp(model, params1, g_rows), 1.0, confidence))
  expected = terms(True)
  assert abs(expected - terms(False)) > 1e-2 * expected  # the weights matter here
  np.testing.assert_allclose(float(loss), expected, rtol=2e-4)


def test_general_anchor_first_keeps_the_params_before_the_first_sleep(tmp_path, monkeypatch):
  """The second sleep's general-text teacher is the params before the first: its result differs from the same
  sleep anchored to the params before it (the session restored from disk, where no first sleep is known)."""
  s = _session()
  params0 = s.params
  budget = dict(_SLEEP, general_weight=1.0, general_loss="kl", general_anchor="first")
  s.sleep(**budget)
  s.inject(_text(1, 32))
  params1 = s.params
  s.save(str(tmp_path / "s"))
  seen = []
  real = distill.consolidate
  monkeypatch.setattr(distill, "consolidate", lambda *a, **k: seen.append(k["first_params"]) or real(*a, **k))
  s.sleep(**budget)
  again = Session.restore(str(tmp_path / "s"), params1, s.config, TOK)
  again.sleep(**budget)
  assert seen[0] is params0 and seen[1] is params1
  diff = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), s.params,
                                      again.params))
  assert max(diff) > 1e-6, diff


def test_rehearsal_replays_the_segments_of_earlier_sleeps_newest_first(tmp_path):
  s = _session()
  s.sleep(**_SLEEP)  # consolidates the segments at [0, 32)
  s.inject(_text(1, 32))
  params1, stream = s.params, list(s.tokens)
  assert distill.rehearsal(stream, s.history, 20) == [stream[16:24], stream[24:32]]  # 3 segments exceed 20 tokens
  assert distill.rehearsal(stream, s.history, 7) == []
  old = np.asarray(stream[:32], np.int32).reshape(4, 8)
  s.save(str(tmp_path / "s"))
  drift = {}
  for rehearse in (0, 32):
    again = Session.restore(str(tmp_path / "s"), params1, s.config, TOK)
    report = again.sleep(**{**_SLEEP, "rehearse": rehearse, "steps": 6, "learning_rate": 3e-3})
    assert report["rehearsed_tokens"] == rehearse
    # how far the second sleep moved what the parameters alone predict for the first sleep's segments
    drift[rehearse] = _kl(_fresh_logp(s.model, params1, old), _fresh_logp(s.model, again.params, old))
  assert drift[32] < 0.8 * drift[0], drift


def test_adapters_leave_every_other_parameter_bit_identical():
  s = _session()
  params0 = jax.tree.map(np.asarray, s.params)
  s.sleep(**{**_SLEEP, "rank": 2, "layers": "1", "targets": "attn"})
  changed = []
  for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(params0)[0], jax.tree.leaves(s.params)):
    name, new = jax.tree_util.keystr(path), np.asarray(new)
    if "['attn']" in name and name.endswith("['kernel']"):  # scanned group layers_0_2: [layer, ...]
      np.testing.assert_array_equal(new[0], old[0])  # layer 0 is not adapted: bit for bit
      changed.append(not np.array_equal(new[1], old[1]))
    else:
      np.testing.assert_array_equal(new, old, err_msg=name)
  assert len(changed) == 4 and all(changed)  # q, k, v, o of layer 1 moved


@pytest.mark.parametrize("kind", ["lm2", "hierarchical"])
def test_consolidated_slots_equal_their_initial_values(kind):
  s = _session(kind, n=52)
  before = jax.tree.map(np.asarray, s.state.memory)
  report = s.sleep(**{**_SLEEP, "slots": 0.5})
  after = jax.tree.map(np.asarray, s.state.memory)
  reset = {(u["array"], tuple(u["index"])) for u in report["units"]["reset_units"]}
  assert 0 < len(reset) <= report["units"]["chosen"] < report["units"]["read"]
  c = tiny_config(kind)
  # Initial values written out independently: LM2 slots start as identity rows (N <= slot_dim), banks as zeros.
  m = c.memory
  arrays = {"lm2": {"read_mass": ("slots", np.eye(m.num_slots, c.d_model))},
            "hierarchical": {"general.read_mass": ("general.slots", np.eye(m.general_slots, c.d_model)),
                             "bank_read_mass": ("bank_slots", np.zeros((m.num_banks, m.bank_slots, c.d_model)))}}[kind]
  get = lambda tree, path: tree[path] if "." not in path else tree[path.split(".")[0]][path.split(".")[1]]
  for mass_name, (slot_name, init) in arrays.items():
    slots, mass = get(after, slot_name), get(after, mass_name)
    for index in np.ndindex(*get(before, mass_name)[:, 0].shape):
      layer, rest = index[0], index[1:]
      if (mass_name, index) in reset:
        np.testing.assert_array_equal(slots[layer, 0][rest], init[rest].astype(np.float32))
        assert mass[layer, 0][rest] == 0
      else:
        np.testing.assert_array_equal(slots[layer, 0][rest], get(before, slot_name)[layer, 0][rest])
        assert mass[layer, 0][rest] == get(before, mass_name)[layer, 0][rest]


def test_rmt_sleep_resets_the_whole_memory_and_none_has_nothing():
  s = _session("rmt")
  report = s.sleep(**_SLEEP)
  assert report["units"]["reset_units"] == [{"array": "", "index": [], "read_mass": 1.0}]
  np.testing.assert_array_equal(np.asarray(s.state.memory["tokens"]), 0)  # rmt's fresh memory: zeros
  with pytest.raises(NothingToConsolidate, match="kind 'none' has no episodic memory"):
    _session("none").sleep(**_SLEEP)


def _files(path):
  """{relative path: bytes} of every file under path."""
  out = {}
  for root, _, names in os.walk(path):
    for n in names:
      with open(os.path.join(root, n), "rb") as f:
        out[os.path.relpath(os.path.join(root, n), path)] = f.read()
  return out


def _export_with_session(tmp_path, n):
  config = tiny_config("lm2")
  full = {"model": config}
  import ml_collections  # pylint: disable=import-outside-toplevel
  full = ml_collections.ConfigDict(full)
  full.data = ml_collections.ConfigDict({"kind": "recall"})
  _, params = build(config)
  s = Session(params, config, TOK)
  s.inject(_text(0, n))
  s.save(str(tmp_path / "session"))
  export(str(tmp_path / "in"), full, params, TOK, session=str(tmp_path / "session"))
  return full, str(tmp_path / "in")


def test_interrupted_write_leaves_the_input_untouched_and_no_output(tmp_path, monkeypatch):
  full, src = _export_with_session(tmp_path, 36)
  before = _files(src)
  config, params, tok = load_export(src)
  s = Session.restore(os.path.join(src, "session"), params, config, tok)
  s.sleep(**_SLEEP)

  def params_then_interrupt(*args):
    real_write_export(*args)
    raise KeyboardInterrupt  # Ctrl-C after the parameters are on disk, before the session and the report

  real_write_export = output.write_export
  monkeypatch.setattr(output, "write_export", params_then_interrupt)
  with pytest.raises(KeyboardInterrupt):
    output.write(str(tmp_path / "out"), full, s, {"x": 1})
  assert sorted(os.listdir(tmp_path)) == ["in", "session"]  # no out, no partial directory beside it
  assert _files(src) == before


def test_written_checkpoint_restores_with_plain_orbax_and_loads_into_a_session(tmp_path):
  full, src = _export_with_session(tmp_path, 36)
  config, params, tok = load_export(src)
  s = Session.restore(os.path.join(src, "session"), params, config, tok)
  report = s.sleep(**_SLEEP)
  output.write(str(tmp_path / "out"), full, s, report)
  restored = ocp.StandardCheckpointer().restore(str(tmp_path / "out" / "params"))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(s.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  again = Session.restore(str(tmp_path / "out" / "session"), restored, config, tok)
  assert again.base_offset == s.base_offset == 32 and again.position == s.position
  for a, b in zip(jax.tree.leaves(again.state.memory), jax.tree.leaves(s.state.memory)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert again.ask("3 4", max_new_tokens=2) == s.ask("3 4", max_new_tokens=2)
  assert os.path.isfile(tmp_path / "out" / output.REPORT)


def test_empty_session_says_so_and_writes_nothing(tmp_path):
  _, src = _export_with_session(tmp_path, 5)  # fewer tokens than a segment: nothing reached the memory
  config, params, tok = load_export(src)
  with pytest.raises(NothingToConsolidate, match="no segment of 8 tokens was completed"):
    Session.restore(os.path.join(src, "session"), params, config, tok).sleep(**_SLEEP)
  before = _files(src)
  run = subprocess.run([sys.executable, "-m", "launch.consolidate", f"--export={src}", f"--out={tmp_path / 'out'}"],
                       capture_output=True, text=True, timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "nothing to consolidate" in run.stdout and "wrote nothing" in run.stdout
  assert not (tmp_path / "out").exists() and _files(src) == before
