"""Titans memory: one chunk's update against a NumPy transcription of its equations (hand-written backward pass
of the memory MLP), chunk_size=1 against a token-by-token loop, causality inside a segment for every variant,
and bfloat16 compute keeping a float32 memory."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import build, logits_fn, random_tokens, tiny_config
from lm2_jax.model import ModelConfig
from lm2_jax.model.memory.titans import TitansMemory

D = 32  # tiny_config's d_model


def _module(**fields):
  cfg = ModelConfig.from_config(tiny_config("titans", **{f"memory_{k}": v for k, v in fields.items()}))
  mdl = TitansMemory(cfg)
  h = jax.random.normal(jax.random.key(1), (2, 6, D))
  params = nn.unbox(mdl.init(jax.random.key(0), TitansMemory.init_state(cfg.memory, 2), h)["params"])
  return cfg, mdl, params


def _random_state(mcfg, batch, seed=2):
  fresh = TitansMemory.init_state(mcfg, batch)
  keys = jax.random.split(jax.random.key(seed), len(fresh))
  return {n: 0.1 * jax.random.normal(k, a.shape) for k, (n, a) in zip(keys, sorted(fresh.items()))}


def _gelu(z):  # jax.nn.gelu's default (tanh) form, and its derivative
  u = np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)
  t = np.tanh(u)
  return 0.5 * z * (1 + t), 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * z * z)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _numpy_chunk(p, state, h, w, tau):
  """One chunk, depth 2, float64: -> (read [B, L, R, E], new state)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  state = {n: np.asarray(a, np.float64) for n, a in state.items()}
  proj = lambda name: np.einsum("bld,dre->brle", h, p[name]["kernel"])
  unit = lambda x: x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)
  q, k, v = unit(proj("q_proj")), unit(proj("k_proj")), proj("v_proj")
  W1, W2 = p["init_w0"][None] + state["w0"], p["init_w1"][None] + state["w1"]
  read = np.einsum("brlh,brhe->brle", _gelu(np.einsum("brle,breh->brlh", q, W1))[0], W2)
  read = read / np.sqrt((read * read).mean(-1, keepdims=True) + 1e-6)
  z = np.einsum("brle,breh->brlh", k, W1)
  a, da_dz = _gelu(z)
  err = np.einsum("brlh,brhe->brle", a, W2) - v
  dout = 2 * w[:, None, :, None] * err / h.shape[1]                  # d/d out of (1/c) sum_t w_t |err_t|^2
  g2 = np.einsum("brlh,brle->brhe", a, dout)
  g1 = np.einsum("brle,brlh->breh", k, np.einsum("brle,brhe->brlh", dout, W2) * da_dz)
  norm = np.sqrt((g1 ** 2).sum((-2, -1)) + (g2 ** 2).sum((-2, -1)))
  clip = np.minimum(1.0, tau / norm)[..., None, None]
  mean_h = (w[..., None] * h).sum(1) / w.sum(1, keepdims=True)
  eta, theta, alpha = (_sigmoid(mean_h @ p[n]["kernel"] + p[n]["bias"])[..., None, None]
                       for n in ("eta", "theta", "alpha"))
  new = {}
  for i, g in enumerate((g1, g2)):
    new[f"s{i}"] = eta * state[f"s{i}"] - theta * clip * g
    new[f"w{i}"] = (1 - alpha) * state[f"w{i}"] - alpha * p[f"init_w{i}"][None] + new[f"s{i}"]
  return read.transpose(0, 2, 1, 3), new


@pytest.mark.parametrize("tau", [100.0, 0.05], ids=["unclipped", "clipped"])
def test_one_chunk_update_equals_numpy(tau):
  cfg, mdl, params = _module(chunk_size=6, depth=2, variant="mal", max_update_norm=tau)
  state = _random_state(cfg.memory, 2)
  h = np.asarray(jax.random.normal(jax.random.key(3), (2, 6, D)))
  write = np.array([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool)  # a token outside the write mask adds nothing
  out, new = mdl.apply({"params": params}, state, jnp.asarray(h), None, jnp.asarray(write), method=TitansMemory.step)
  want_read, want = _numpy_chunk(params, state, h.astype(np.float64), write.astype(np.float64), tau)
  for name in want:
    np.testing.assert_allclose(new[name], want[name], atol=2e-5, rtol=1e-4, err_msg=name)
  want_residual = np.einsum("blre,red->bld", want_read, np.asarray(params["o_proj"]["kernel"], np.float64))
  np.testing.assert_allclose(out.residual_BLD, want_residual, atol=2e-5, rtol=1e-4)
  assert np.abs(np.asarray(new["s0"]) - np.asarray(state["s0"])).max() > 1e-3  # the update is not trivial


def test_chunk_size_one_equals_token_by_token():
  """chunk_size=1 over a segment: each token reads the memory after the tokens before it, exactly as a loop that
  feeds the tokens one at a time and carries the state."""
  cfg, mdl, params = _module(chunk_size=1, depth=3, variant="mag")
  state = _random_state(cfg.memory, 2)
  h = jax.random.normal(jax.random.key(3), (2, 6, D))
  step = jax.jit(lambda s, x: mdl.apply({"params": params}, s, x, method=TitansMemory.step))
  out, new = step(state, h)
  st, rows = state, []
  for t in range(6):
    o, st = step(st, h[:, t:t + 1])
    rows.append(o.residual_BLD)
  np.testing.assert_allclose(out.residual_BLD, jnp.concatenate(rows, axis=1), atol=1e-5, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), new, st)


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_causal_within_and_across_segments(variant):
  """Chunks of 2 in segments of 8: changing token t changes nothing before it."""
  model, params = build(tiny_config("titans", memory_variant=variant, memory_chunk_size=2))
  f = logits_fn(model, params)
  tokens = random_tokens(0, (2, 24))
  a = np.asarray(f(tokens))
  for t in (3, 8, 13):
    b = np.asarray(f(tokens.at[:, t].set((tokens[:, t] + 1) % 64)))
    np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-6, rtol=0, err_msg=f"t={t}")
    assert np.abs(a[:, t:] - b[:, t:]).max() > 1e-4


def test_bfloat16_compute_keeps_a_float32_memory():
  cfg = ModelConfig.from_config(tiny_config("titans", dtype="bfloat16", memory_chunk_size=2))
  mdl = TitansMemory(cfg)
  state = _random_state(cfg.memory, 2)
  h = jax.random.normal(jax.random.key(1), (2, 6, D)).astype(jnp.bfloat16)
  out, new = jax.jit(lambda s, x: mdl.init_with_output(jax.random.key(0), s, x)[0])(state, h)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new))
  assert out.kv.k_BMKE.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out.kv.v_BMKE, np.float32)).all()
  assert np.abs(np.asarray(new["s0"]) - np.asarray(state["s0"])).max() > 0
