"""armt (lm2_jax/model/memory/armt.py): the associative write and read against a NumPy transcription of the
paper's equations, the normaliser correction, the integration with rmt's tokens, and every layer's read.
Causality, documents, truncated BPTT, decoding, sessions, the mesh and hf_llama.load are in the kind-parametrized
tests of test_model, test_decoding, test_session, test_sharding and test_hf_llama."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import build, random_tokens, tiny_config
from lm2_jax.model import LM2Model, init_params
from lm2_jax.model.memory.armt import AssociativeMemory
from lm2_jax.model.memory.protocol import Documents

SEG = 8


def np_dpfp(x):
  r = np.maximum(np.concatenate([x, -x], axis=-1), 0.0)
  f = np.concatenate([r * np.roll(r, j, axis=-1) for j in (1, 2, 3)], axis=-1)
  return f / np.linalg.norm(f, axis=-1, keepdims=True)


def np_read(p, A, z, x):
  q = np_dpfp(x @ p["q_proj"]["kernel"])
  out = np.zeros(x.shape)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      out[b, t] = A[b].T @ q[b, t] / (z[b] @ q[b, t] + 1e-5)
  return out


def np_write(p, A, z, y, M, correction):
  """Every write token computes its old value and correction from A, z as they entered (one parallel step)."""
  m = y[:, -M:]
  k = np_dpfp(m @ p["k_proj"]["kernel"])
  v = m @ p["v_proj"]["kernel"]
  beta = 1 / (1 + np.exp(-(m @ p["beta"]["kernel"] + p["beta"]["bias"])[..., 0]))
  A2, z2, gammas = A.copy(), z.copy(), []
  for b in range(y.shape[0]):
    for i in range(M):
      norm = z[b] @ k[b, i] + 1e-5
      vbar = A[b].T @ k[b, i] / norm
      gamma = np.clip(1 - norm / (k[b, i] @ k[b, i]), 0, 1) if correction else 1.0
      gammas.append(gamma)
      A2[b] += beta[b, i] * np.outer(k[b, i], v[b, i] - vbar)
      z2[b] += gamma * k[b, i]
  return A2, z2, np.array(gammas)


def _module(correction=True, **fields):
  cfg = LM2Model(tiny_config("armt", memory_key_dim=4, memory_gamma_correction=correction, **fields)).config
  return cfg, AssociativeMemory(cfg)


def _init(mod, state, x):
  p = nn.unbox(mod.init(jax.random.key(0), state, x, method=lambda m, s, x: (m.read(s, x), m.write(s, x))))["params"]
  p = jax.tree.map(np.array, p)
  p["v_proj"]["kernel"] = np.random.default_rng(5).normal(size=p["v_proj"]["kernel"].shape).astype(np.float32)
  return p


def _random_state(rng, B, F, D):
  """A random A, and z a positive mix of a few unit feature vectors (so that z . k spans (0, 1) and beyond)."""
  feats = np_dpfp(rng.normal(size=(B, 3, 4)))
  z = np.einsum("bj,bjf->bf", rng.uniform(0, 4.0, (B, 3)), feats)
  return {"A": rng.normal(size=(B, F, D)).astype(np.float32), "z": z.astype(np.float32)}


@pytest.mark.parametrize("correction", [True, False])
def test_write_and_read_equal_numpy_transcription(correction):
  cfg, mod = _module(correction)
  rng = np.random.default_rng(0)
  B, X, D, M = 2, 14, cfg.d_model, cfg.memory.num_slots
  state = _random_state(rng, B, cfg.memory.feature_dim, D)
  y = rng.normal(size=(B, X, D)).astype(np.float32)
  p = _init(mod, state, y)
  new = mod.apply({"params": p}, state, y, method="write")
  A, z, gammas = np_write(p, state["A"], state["z"], y, M, correction)
  if correction:  # the corrections cover the clipped and the unclipped range
    assert (gammas == 0).any() and ((gammas > 0.05) & (gammas < 0.95)).any(), gammas
  np.testing.assert_allclose(new["A"], A, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(new["z"], z, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(mod.apply({"params": p}, state, y, method="read"), np_read(p, state["A"], state["z"], y),
                             rtol=2e-4, atol=2e-4)


def test_documents_read_fresh_and_write_fresh():
  """Positions of another document than the memory's read a fresh memory (o = 0); a row whose last document is
  new writes into a fresh A, z."""
  cfg, mod = _module()
  rng = np.random.default_rng(1)
  B, X, D, M = 2, 14, cfg.d_model, cfg.memory.num_slots
  state = _random_state(rng, B, cfg.memory.feature_dim, D)
  y = rng.normal(size=(B, X, D)).astype(np.float32)
  p = _init(mod, state, y)
  read_BX = np.arange(X)[None] < np.array([[5], [X]])  # row 0: a new document from position 5 on
  docs = Documents(ids_BL=jnp.asarray(1 + ~read_BX, jnp.int32), read_BL=jnp.asarray(read_BX),
                   write_BL=jnp.asarray(~read_BX | (np.arange(B) == 1)[:, None]), reset_B=jnp.array([True, False]))
  o = mod.apply({"params": p}, state, y, docs, method="read")
  want = np_read(p, state["A"], state["z"], y) * read_BX[..., None]
  np.testing.assert_allclose(o, want, rtol=2e-4, atol=2e-4)
  new = mod.apply({"params": p}, state, y, docs, method="write")
  fresh = {"A": state["A"].copy(), "z": state["z"].copy()}
  fresh["A"][0], fresh["z"][0] = 0, 0
  A, z, _ = np_write(p, fresh["A"], fresh["z"], y, M, True)
  np.testing.assert_allclose(new["A"], A, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(new["z"], z, rtol=2e-4, atol=2e-5)


def _same_key_writes(correction, n=8):
  """One write token per segment, always with the same key and a new value (beta ~ 1): what the key reads back
  after each write, and the values written."""
  cfg, mod = _module(correction, memory_num_slots=1)
  D, K, F = cfg.d_model, cfg.memory.key_dim, cfg.memory.feature_dim
  state = {"A": np.zeros((1, F, D), np.float32), "z": np.zeros((1, F), np.float32)}
  p = _init(mod, state, np.zeros((1, 1, D), np.float32))
  p["k_proj"]["kernel"] = np.eye(D, K, dtype=np.float32)       # the key: the first K dims
  p["q_proj"]["kernel"] = p["k_proj"]["kernel"]                # queried with the same projection
  p["v_proj"]["kernel"] = np.diag((np.arange(D) >= K).astype(np.float32))  # the value: the other dims
  p["beta"]["kernel"][:] = 0
  p["beta"]["bias"][:] = 30.0
  key = np.array([1.0, -0.5, 0.3, 2.0], np.float32)
  rng = np.random.default_rng(2)
  reads, values = [], []
  for _ in range(n):
    y = np.concatenate([key, rng.normal(size=D - K).astype(np.float32)])[None, None]
    values.append(y[0, 0] * (np.arange(D) >= K))
    state = mod.apply({"params": p}, state, y, method="write")
    reads.append(np.asarray(mod.apply({"params": p}, state, np.pad(key, (0, D - K))[None, None], method="read"))[0, 0])
  return np.array(reads), np.array(values)


def test_gamma_correction_makes_a_rewritten_key_read_its_latest_value():
  """The delta rule replaces the value under a key; with the corrected normaliser the key then reads the latest
  value back exactly, however often it was written. With the plain normaliser (z grows by the key at every write)
  the read after the second write is already off, and the error grows with the number of writes."""
  reads, values = _same_key_writes(correction=True)
  np.testing.assert_allclose(reads, values, atol=1e-4 * np.abs(values).max())
  plain, values = _same_key_writes(correction=False)
  np.testing.assert_allclose(plain[0], values[0], atol=1e-4 * np.abs(values).max())  # one write: no difference
  err = np.linalg.norm(plain - values, axis=-1) / np.linalg.norm(values, axis=-1)
  assert err[1] > 0.3 and err[-1] > err[1], err


def test_zero_values_make_armt_rmt():
  """A fresh armt (value projections at zero, as initialised) computes exactly what rmt computes with the same
  parameters: the associative path adds o = 0 and nothing else changes."""
  armt = LM2Model(tiny_config("armt"))
  rmt = LM2Model(tiny_config("rmt"))
  p_armt = init_params(armt, jax.random.key(0))
  p_rmt = init_params(rmt, jax.random.key(0))
  mixed = jax.tree.map(lambda a: a, p_rmt)
  for name, group in p_armt["decoder"].items():
    if name != "memory":
      mixed["decoder"][name] = {**p_rmt["decoder"][name], "memory": group["memory"]}
  tokens = random_tokens(0, (2, 3 * SEG))
  ids = jnp.where(jnp.arange(3 * SEG) < SEG + 3, 1, 2)[None].repeat(2, 0)  # a document starts mid-segment
  la, ma, _ = jax.jit(armt.apply)({"params": mixed}, tokens, segment_ids=ids)
  lr, mr, _ = jax.jit(rmt.apply)({"params": p_rmt}, tokens, segment_ids=ids)
  np.testing.assert_allclose(la, lr, atol=1e-6, rtol=0)
  np.testing.assert_allclose(ma["tokens"], mr["tokens"], atol=1e-6, rtol=0)
  assert np.abs(np.asarray(ma["A"])).max() == 0 and np.abs(np.asarray(ma["z"])).max() > 0


def test_every_token_reads_every_layers_matrix():
  """After a segment, changing one layer's A (or z) changes the logits of every position of the next call."""
  model, params = build(tiny_config("armt"))
  apply = jax.jit(lambda toks, mem: model.apply({"params": params}, toks, mem)[0])
  _, memory, _ = jax.jit(model.apply)({"params": params}, random_tokens(0, (2, 2 * SEG)))
  tokens = random_tokens(1, (2, SEG))
  base = np.asarray(apply(tokens, memory))
  for name in ("A", "z"):
    for layer in range(2):
      changed = dict(memory, **{name: memory[name].at[:, layer].mul(1.5)})
      diff = np.abs(np.asarray(apply(tokens, changed)) - base).max(axis=-1)
      assert (diff > 1e-6).all(), (name, layer, diff.min())


def test_gradients_reach_every_armt_parameter():
  model, params = build(tiny_config("armt", bptt_segments=2))
  tokens = random_tokens(0, (2, 3 * SEG))
  w = jax.random.normal(jax.random.key(1), (2, 3 * SEG, 64))
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, tokens)[0] * w)))(params)
  leaves = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(grads)[0]
            if "'memory'" in jax.tree_util.keystr(k)}
  assert len(leaves) == 7  # initial, write norm; per layer q, k, v, beta kernel and bias
  for name, g in leaves.items():
    assert np.abs(np.asarray(g)).max() > 0, name
