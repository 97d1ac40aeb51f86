"""Hierarchical memory against brute-force references: routing, the deep read, writes, skipping, balance."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import build, random_tokens, tiny_config
from lm2_jax.model import ConfigError, ModelConfig
from lm2_jax.model.memory.hierarchical import HierarchicalMemory

B, L = 2, 8


def _module(**fields):
  cfg = ModelConfig.from_config(tiny_config("hierarchical", **{f"memory_{k}": v for k, v in fields.items()}))
  mem = HierarchicalMemory(cfg)
  h = jax.random.normal(jax.random.key(0), (B, L, cfg.d_model))
  state = mem.init_state(cfg.memory, B)
  m = cfg.memory
  state["bank_slots"] = jax.random.normal(jax.random.key(1), state["bank_slots"].shape)
  state["bank_read_mass"] = jax.random.uniform(jax.random.key(2), state["bank_read_mass"].shape)
  params = nn.unbox(mem.init(jax.random.key(3), state, h, method=HierarchicalMemory.step))
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(4), p.shape), params)  # no zero biases
  return cfg, m, mem, params, state, h


def _np(x):
  return np.asarray(x, np.float64)


def _routing_scores(m, p, h):
  """Brute force: every bank's score [B, L, K] (product keys: all pairs (i, j) with key [key1_i, key2_j])."""
  r = _np(h) @ _np(p["route_proj"]["kernel"])
  keys = _np(p["bank_keys"])
  if m.product_keys:
    side = keys.shape[1]
    keys = np.stack([np.concatenate([keys[0, i], keys[1, j]]) for i, j in itertools.product(range(side), repeat=2)])
  return r @ keys.T / np.sqrt(m.slot_dim)


@pytest.mark.parametrize("product_keys", [False, True])
def test_routing_picks_the_top_k_banks_of_all_scores(product_keys):
  cfg, m, mem, params, state, h = _module(num_banks=9, top_k=2, product_keys=product_keys)
  banks, weights, _ = mem.apply(params, h, method=HierarchicalMemory._route)
  scores = _routing_scores(m, params["params"], h)
  want = np.argsort(-scores, axis=-1)[..., :2]
  np.testing.assert_array_equal(np.sort(np.asarray(banks), -1), np.sort(want, -1))
  top = np.take_along_axis(scores, np.asarray(banks), -1)
  np.testing.assert_allclose(weights, np.exp(top) / np.exp(top).sum(-1, keepdims=True), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("capacity_factor", [100.0, 0.01], ids=["no_drops", "one_per_bank"])
def test_deep_read_matches_attention_over_the_chosen_banks(capacity_factor):
  """Reference: each token attends over the slots of each chosen bank; with a capacity of C = 1 per bank only the
  first pick of each bank (in token order) is read, later picks of it are dropped."""
  cfg, m, mem, params, state, h = _module(num_banks=6, top_k=2, capacity_factor=capacity_factor)
  p = params["params"]
  banks, weights, _ = mem.apply(params, h, method=HierarchicalMemory._route)
  active = jnp.ones((B, L), bool)
  deep, mass, kept = mem.apply(params, state["bank_slots"], h, banks, weights, active,
                               method=HierarchicalMemory._deep_read)
  R, S = m.num_heads, m.slot_dim
  E = S // R
  q = (_np(h) @ _np(p["q_proj"]["kernel"]).reshape(cfg.d_model, -1))
  wo = _np(p["o_proj"]["kernel"]).reshape(S, cfg.d_model)
  for b in range(B):
    seen = set()
    for t in range(L):
      read = np.zeros(S)
      for j in range(m.top_k):
        bank = int(banks[b, t, j])
        want_kept = capacity_factor > 1 or bank not in seen
        seen.add(bank)
        assert bool(kept[b, t, j]) == want_kept
        if not want_kept:
          np.testing.assert_array_equal(mass[b, t, j], 0.0)
          continue
        slots = _np(state["bank_slots"][b, bank])                                     # [N1, S]
        slot_mass = np.zeros(m.bank_slots)
        for r in range(R):
          sl = slice(r * E, (r + 1) * E)
          sc = slots[:, sl] @ q[b, t, sl] / np.sqrt(E)
          a = np.exp(sc - sc.max()) / np.exp(sc - sc.max()).sum()
          read[sl] += float(weights[b, t, j]) * (a @ slots[:, sl])
          slot_mass += a / R
        # the attention mass per slot of this pick, mean over heads, weighted by the pick's routing weight
        np.testing.assert_allclose(mass[b, t, j], float(weights[b, t, j]) * slot_mass, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(deep[b, t], read @ wo, rtol=1e-4, atol=1e-5)


def test_write_replaces_the_least_read_slots_of_the_routed_bank():
  cfg, m, mem, params, state, h = _module(num_banks=3, top_k=1, bank_slots=4, write_tokens=3)
  p = params["params"]
  out, new = mem.apply(params, state, h, method=HierarchicalMemory.step)
  stats = out.stats
  x = _np(h) + np.concatenate([np.zeros_like(_np(h)[:, :1]), _np(h)[:, :-1]], axis=1)  # token shift
  salience = x @ _np(p["salience"]["kernel"])[:, 0] + float(p["salience"]["bias"][0])
  first_bank = np.argmax(_routing_scores(m, p, x), axis=-1)
  mass = m.read_decay * _np(state["bank_read_mass"]) + _np(stats["bank_read_mass"])
  for b in range(B):
    want_slots, want_mass = _np(state["bank_slots"][b]).copy(), mass[b].copy()
    taken = {}
    for t in np.argsort(-salience[b])[:3]:  # most salient first
      k = first_bank[b, t]
      slot = np.argsort(mass[b, k])[taken.get(k, 0)]
      taken[k] = taken.get(k, 0) + 1
      u = np.tanh(x[b, t] @ _np(p["u_proj"]["kernel"]))
      want_slots[k, slot] = u / (1 + np.exp(-salience[b, t]))
      want_mass[k, slot] = mass[b, k].mean()
    np.testing.assert_allclose(new["bank_slots"][b], want_slots, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["bank_read_mass"][b], want_mass, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("queries_per_bank", [5, 50])  # both forms of the slots' gradient (fused, matmuls)
def test_bank_attention_gradients_match_autodiff_of_the_formula(queries_per_bank):
  """The hand-written backward of the deep read's attention against autodiff of a plain transcription, with
  cotangents on both outputs (the read and the attention weights)."""
  from lm2_jax.model.memory.hierarchical import bank_attention

  def formula(q, m):
    p = jax.nn.softmax(jnp.einsum("bkcre,bknre->bkrcn", q, m) / np.sqrt(q.shape[-1]), axis=-1)
    return jnp.einsum("bkrcn,bknre->bkcre", p, m), p

  keys = jax.random.split(jax.random.key(0), 4)
  C = queries_per_bank
  q, m = jax.random.normal(keys[0], (2, 3, C, 4, 8)), jax.random.normal(keys[1], (2, 3, 6, 4, 8))
  w_read, w_p = jax.random.normal(keys[2], (2, 3, C, 4, 8)), jax.random.normal(keys[3], (2, 3, 4, C, 6))
  objective = lambda fn: lambda q, m: (lambda read, p: (read * w_read).sum() + (p * w_p).sum())(*fn(q, m))
  for got, want in zip(jax.grad(objective(bank_attention), (0, 1))(q, m), jax.grad(objective(formula), (0, 1))(q, m)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for got, want in zip(bank_attention(q, m), formula(q, m)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_write_passes_gradient_to_every_slot_it_does_not_replace():
  """d new_slots / d old_slots is 1 for a kept slot and 0 for a replaced one: the replaced (bank, slot) pairs
  computed as in the write reference above (most salient tokens, first bank, least-read slot)."""
  cfg, m, mem, params, state, h = _module(num_banks=3, top_k=1, bank_slots=4, write_tokens=3)
  p = params["params"]
  stats = mem.apply(params, state, h, method=HierarchicalMemory.read).stats
  write = lambda slots: mem.apply(params, {**state, "bank_slots": slots}, h, stats,
                                  method=HierarchicalMemory.write)["bank_slots"]
  grad = jax.grad(lambda slots: write(slots).sum())(state["bank_slots"])
  x = _np(h) + np.concatenate([np.zeros_like(_np(h)[:, :1]), _np(h)[:, :-1]], axis=1)
  salience = x @ _np(p["salience"]["kernel"])[:, 0] + float(p["salience"]["bias"][0])
  first_bank = np.argmax(_routing_scores(m, p, x), axis=-1)
  mass = m.read_decay * _np(state["bank_read_mass"]) + _np(stats["bank_read_mass"])
  for b in range(B):
    want = np.ones(state["bank_slots"].shape[1:])
    taken = {}
    for t in np.argsort(-salience[b])[:3]:
      k = first_bank[b, t]
      want[k, np.argsort(mass[b, k])[taken.get(k, 0)]] = 0.0
      taken[k] = taken.get(k, 0) + 1
    np.testing.assert_array_equal(grad[b], want)


def test_skip_threshold_drops_the_deep_read_and_reports_it():
  cfg, m, mem, params, state, h = _module()
  general = mem.apply(params, state["general"], h, method=lambda mod, s, x: mod.general.read(s, x)).residual_BLD
  cfg_skip, m_skip, mem_skip, *_ = _module(skip_threshold=0.999)
  out = mem_skip.apply(params, state, h, method=HierarchicalMemory.read)
  delta, stats = out.residual_BLD, out.stats
  np.testing.assert_allclose(delta, general, atol=1e-6)
  assert float(stats["deep_tokens"].max()) == 0 and float(stats["deep_banks"].max()) == 0
  stats = mem.apply(params, state, h, method=HierarchicalMemory.read).stats
  np.testing.assert_allclose(stats["deep_tokens"], 1.0)
  assert 0 < float(stats["deep_banks"].min()) <= 1


def test_balance_loss_is_one_for_uniform_routing_and_larger_when_collapsed():
  cfg, m, mem, params, state, h = _module(num_banks=6, top_k=1, balance_loss_weight=1.0)
  uniform = jax.tree.map(lambda x: x, params)
  uniform["params"]["route_proj"]["kernel"] = jnp.zeros_like(params["params"]["route_proj"]["kernel"])
  losses = mem.apply(uniform, state, h, method=HierarchicalMemory.read).losses
  np.testing.assert_allclose(losses["balance"], 1.0, rtol=1e-5)  # P = 1/K everywhere: K * sum f/K = 1
  collapsed = jax.tree.map(lambda x: x, params)
  keys = np.zeros(params["params"]["bank_keys"].shape, np.float32)
  keys[0] = 10.0
  collapsed["params"]["bank_keys"] = jnp.asarray(keys)
  collapsed["params"]["route_proj"]["kernel"] = jnp.ones_like(params["params"]["route_proj"]["kernel"])
  h_pos = jnp.abs(h)
  losses = mem.apply(collapsed, state, h_pos, method=HierarchicalMemory.read).losses
  assert float(losses["balance"].min()) > 5.0  # every token on bank 0: K * 1 * P_0 ~ K


@pytest.mark.parametrize("product_keys", [False, True])
def test_balance_loss_counts_picks_and_probabilities_over_the_same_tokens(product_keys):
  """K * sum_b f_b P_b with both the pick shares f and the mean routing probabilities P over the masked tokens
  (brute force over all bank scores)."""
  cfg, m, mem, params, state, h = _module(num_banks=9, top_k=2, balance_loss_weight=1.0, product_keys=product_keys)
  mask = np.arange(L)[None, :] < np.array([[5], [L]])  # row 0: the first 5 tokens only
  losses = mem.apply(params, state, h, jnp.asarray(mask), method=HierarchicalMemory.read).losses
  scores = _routing_scores(m, params["params"], h)                          # [B, L, K]
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = []
  for b in range(B):
    toks = np.flatnonzero(mask[b])
    picks = np.argsort(-scores[b, toks], axis=-1)[:, :m.top_k].ravel()
    f = np.bincount(picks, minlength=m.num_banks) / (m.top_k * len(toks))
    want.append(m.num_banks * (f * probs[b, toks].mean(0)).sum())
  np.testing.assert_allclose(losses["balance"], np.mean(want), rtol=1e-4)


@pytest.mark.parametrize("write_gate", [False, True])
def test_gradients_reach_every_parameter_and_balance_loss_enters_aux(write_gate):
  """With memory.write_gate and forget_bias, the general level takes them (lm2.py; the equations in
  test_lm2_memory.py)."""
  model, params = build(tiny_config("hierarchical", bptt_segments=3, memory_write_gate=write_gate,
                                    memory_forget_bias=3.0 if write_gate else 1.0))
  biases = [v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
            if "general" in jax.tree_util.keystr(k) and "forget_gate" in jax.tree_util.keystr(k)
            and "bias" in jax.tree_util.keystr(k)]
  assert biases and all(np.all(np.asarray(v) == (3.0 if write_gate else 1.0)) for v in biases)
  tokens = random_tokens(0, (2, 3 * 8))
  w = jax.random.normal(jax.random.key(1), (2, 3 * 8, 64))

  def loss(p):
    logits, _, aux = model.apply({"params": p}, tokens)
    return jnp.sum(logits * w) + aux["losses"]["balance"]

  grads = jax.jit(jax.grad(loss))(params)
  leaves = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(grads)[0]
            if "'memory'" in jax.tree_util.keystr(k)}
  assert any("bank_keys" in k for k in leaves) and any("salience" in k for k in leaves)
  assert any("'general'" in k and "write_gate" in k for k in leaves) == write_gate
  for name, g in leaves.items():
    assert np.abs(np.asarray(g)).max() > 0, name


@pytest.mark.parametrize("fields,match", [
    (dict(top_k=7), "model.memory.top_k=7: must be <= num_banks=6"),
    (dict(write_tokens=9), "model.memory.write_tokens=9: must be <= bank_slots=4"),
    (dict(product_keys=True), "model.memory.num_banks=6: product keys need a square"),
    (dict(skip_threshold=1.0), r"model.memory.skip_threshold=1.0: must be in \[0, 1\)"),
    (dict(general_slots=0), "model.memory.general_slots=0: must be a positive integer"),
])
def test_bad_hierarchical_config_is_named(fields, match):
  with pytest.raises(ConfigError, match=match):
    ModelConfig.from_config(tiny_config("hierarchical", **{f"memory_{k}": v for k, v in fields.items()}))
