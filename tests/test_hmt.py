"""hmt: one segment against a NumPy transcription of the module docstring (recall attention, eviction, the learned
eviction loss), the eviction rule against a brute-force cache, statistics, what the eviction loss trains, and
config errors. Causality, documents, truncated BPTT, decoding, sessions, the mesh and hf_llama.load are in the
kind-parametrized tests."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import build, random_tokens, tiny_config
from lm2_jax.model import LM2Model
from lm2_jax.model.config import ConfigError
from lm2_jax.model.memory.hmt import HMTMemory, eviction_slot, insert

K, J, N, L, D = 2, 3, 3, 8, 32  # sensory, summary tokens, cache size, segment_len, d_model (tiny_config)


def _np_rms(x, scale, eps=1e-5):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale


def _np_slot(valid, age, score, rule):
  """Brute force: the first free slot, else the oldest (fifo) or lowest-scored (learned) one."""
  free = [i for i in range(len(valid)) if valid[i] == 0]
  if free:
    return free[0], False
  key = (lambda i: -age[i]) if rule == "fifo" else (lambda i: score[i])
  return min(range(len(valid)), key=key), True


def _state(rng, B):
  """A state whose first row has a full cache with distinct ages, second row one free slot."""
  valid = np.ones((B, N), np.float32)
  valid[1, 1] = 0
  age = np.stack([rng.permutation(N) + 1 for _ in range(B)]).astype(np.float32) * valid
  return {"sensory": rng.normal(size=(B, K, D)).astype(np.float32), "recalled": rng.normal(size=(B, D)).astype(np.float32),
          "cache": rng.normal(size=(B, N, D)).astype(np.float32) * valid[..., None], "valid": valid, "age": age}


@pytest.mark.parametrize("rule", ["fifo", "learned"])
def test_one_segment_matches_numpy(rule):
  """The whole segment step with stand-in layers y = tanh(x R) (position-wise): the sequence the layers get, the new
  memory embedding, eviction, recall, the new state, statistics and the eviction loss, all from NumPy."""
  cfg = LM2Model(tiny_config("hmt", memory_sensory_tokens=K, memory_summary_tokens=J, memory_cache_size=N,
                             memory_eviction=rule)).config
  rng = np.random.default_rng(0)
  B = 2
  state = _state(rng, B)
  x = rng.normal(size=(B, L, D)).astype(np.float32)
  R = rng.normal(size=(D, D)).astype(np.float32) / np.sqrt(D)
  seen = {}

  def run_layers(x_BXD, docs, layer_states):
    seen["x"], seen["ids"], seen["layer_states"] = x_BXD, docs.ids_BL, layer_states
    return jnp.tanh(x_BXD @ R), layer_states

  mod = HMTMemory(cfg)
  params = nn.unbox(mod.init(jax.random.key(1), state, x, None, run_layers)["params"])
  params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape), params)  # not the init
  y, new, stats, losses = mod.apply({"params": params}, state, x, None, run_layers)
  p = jax.tree.map(np.asarray, params)

  memory_token = p["initial"] + state["recalled"]
  X = np.concatenate([state["sensory"], memory_token[:, None], x, memory_token[:, None], x[:, L - J:],
                      np.broadcast_to(p["summary"], (B, 1, D))], axis=1)
  np.testing.assert_allclose(seen["x"], X, atol=1e-6)
  assert (np.asarray(seen["ids"])[:, -J - 1:] != 0).all() and (np.asarray(seen["ids"])[:, :-J - 1] == 0).all()
  Y = np.tanh(X @ R)
  np.testing.assert_allclose(y, Y[:, K + 1:K + 1 + L], atol=1e-5)
  m = _np_rms(Y[:, K + 1 + L], p["write_norm"]["scale"])
  q = _np_rms(Y[:, -1], p["summary_norm"]["scale"])
  score = lambda c: c @ p["scorer"]["kernel"][:, 0] + p["scorer"]["bias"][0] if rule == "learned" else None
  cache, valid, age = state["cache"].copy(), state["valid"].copy(), state["age"].copy()
  evicted = np.zeros((B, N))
  for b in range(B):
    slot, full = _np_slot(valid[b], age[b], None if rule == "fifo" else score(cache[b]), rule)
    evicted[b, slot] = full
    age[b] = (age[b] + 1) * valid[b]
    cache[b, slot], valid[b, slot], age[b, slot] = m[b], 1, 0
  logits = np.einsum("bh,bnh->bn", q @ p["recall_q"]["kernel"], cache @ p["recall_k"]["kernel"]) / np.sqrt(D)
  logits = np.where(valid > 0, logits, -np.inf)
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  np.testing.assert_allclose(stats["recall"], a, atol=1e-5)
  np.testing.assert_allclose(new["recalled"], np.einsum("bn,bnd->bd", a, cache), atol=1e-5)
  np.testing.assert_allclose(new["cache"], cache, atol=1e-5)
  np.testing.assert_array_equal(new["valid"], valid)
  np.testing.assert_array_equal(new["age"], age)
  np.testing.assert_array_equal(new["sensory"], x[:, L - K:])
  np.testing.assert_array_equal(stats["evicted"], evicted)
  assert evicted[0].sum() == 1 and evicted[1].sum() == 0  # row 1 had a free slot
  np.testing.assert_array_equal(stats["evicted_age"], (evicted * state["age"]).sum(-1))
  if rule == "fifo":
    assert losses == {} and "scorer" not in p
  else:
    s = score(cache)
    logp = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1, keepdims=True)
    np.testing.assert_allclose(losses["eviction"], -(a * logp).sum(-1).mean(), rtol=1e-5)


@pytest.mark.parametrize("rule", ["fifo", "learned"])
def test_eviction_rule_matches_a_brute_force_cache(rule):
  """Fixed scores per embedding: 40 insertions into a cache of 4 keep, after each, exactly the embeddings a Python
  list keeps (fifo: drop the oldest; learned: drop the lowest-scored), with their ages."""
  rng = np.random.default_rng(3)
  B, n, steps = 3, 4, 40
  scores = rng.normal(size=(B, steps))
  cache = {"cache": jnp.zeros((B, n, 1)), "valid": jnp.zeros((B, n)), "age": jnp.zeros((B, n))}
  kept = [[] for _ in range(B)]  # (item, time written)
  for t in range(steps):
    items = cache["cache"][..., 0].astype(int)
    score = jnp.take_along_axis(jnp.asarray(scores, jnp.float32), items, axis=1)
    slot, full = eviction_slot(cache["valid"], cache["age"], score, rule)
    cache = insert(cache, jnp.full((B, 1), t, jnp.float32), slot)
    for b in range(B):
      if len(kept[b]) == n:
        drop = min(kept[b], key=(lambda e: e[1]) if rule == "fifo" else (lambda e: scores[b, e[0]]))
        kept[b].remove(drop)
      assert bool(full[b]) == (t >= n)
      kept[b].append((t, t))
      got = {(int(i), int(t - a)) for i, a, v in zip(np.asarray(cache["cache"][b, :, 0]), np.asarray(cache["age"][b]),
                                                       np.asarray(cache["valid"][b])) if v}
      assert got == set(kept[b]), (t, b)


@functools.lru_cache(maxsize=None)
def _model(eviction="fifo"):
  """(model, params, jit (params, tokens, document ids) -> model.apply's outputs): one compilation per rule."""
  model, params = build(tiny_config("hmt", memory_cache_size=N, memory_eviction=eviction, bptt_segments=0))
  return model, params, jax.jit(lambda p, toks, ids: model.apply({"params": p}, toks, segment_ids=ids))


def test_statistics_count_evictions_and_ages_and_a_new_document_starts_a_fresh_cache():
  """From a fresh state, S segments into a cache of N evict S - N embeddings in all; FIFO ages end as 0..N-1. A
  document that starts at the last segment boundary writes into a fresh cache: one valid embedding after it."""
  _, params, f = _model()
  S = 5
  tokens = random_tokens(0, (2, S * L))
  _, mem, aux = f(params, tokens, jnp.ones((2, S * L), jnp.int32))
  np.testing.assert_allclose(np.asarray(aux["memory_stats"]["evicted"]).sum(-1) * S, S - N, atol=1e-5)
  np.testing.assert_array_equal(np.sort(np.asarray(mem["age"]), axis=-1), np.tile(np.arange(N), (2, 1)))
  np.testing.assert_array_equal(mem["valid"], 1)
  np.testing.assert_allclose(np.asarray(aux["memory_stats"]["recall"]).sum(-1), 1.0, atol=1e-5)
  _, mem, _ = f(params, tokens, jnp.where(jnp.arange(S * L) < (S - 1) * L, 1, 2)[None].repeat(2, 0))
  np.testing.assert_array_equal(np.asarray(mem["valid"]).sum(-1), 1)


def test_eviction_loss_trains_the_scorer_only():
  model, params, _ = _model("learned")
  tokens = random_tokens(0, (2, 4 * L))
  w = jax.random.normal(jax.random.key(1), (2, 4 * L, 64))

  @jax.jit
  def grads(p):
    evict = jax.grad(lambda p: model.apply({"params": p}, tokens)[2]["losses"]["eviction"])(p)
    lm = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, tokens)[0] * w))(p)
    return evict, lm

  evict, lm = grads(params)
  for path, g in jax.tree_util.tree_flatten_with_path(evict)[0]:
    name = jax.tree_util.keystr(path)
    assert (np.abs(np.asarray(g)).max() > 0) == ("scorer" in name), name
  # and the language-model loss reaches the recall projections and the memory parameters, not the scorer
  g = lm["decoder"]["memory"]
  for name in ("initial", "summary", "recall_q", "recall_k", "write_norm", "summary_norm"):
    assert max(np.abs(np.asarray(a)).max() for a in jax.tree.leaves(g[name])) > 0, name
  assert not np.asarray(g["scorer"]["kernel"]).any()


@pytest.mark.parametrize("fields,match", [
    ({"memory_cache_size": 0}, r"model.memory.cache_size=0: must be a positive integer"),
    ({"memory_cache_size": 1, "memory_eviction": "learned"}, r"model.memory.cache_size=1: learned eviction.*>= 2"),
    ({"memory_eviction": "lru"}, r"model.memory.eviction='lru': use one of \('fifo', 'learned'\)"),
    ({"memory_layers": "0"}, r"model.memory.layers='0'.*model-level"),
])
def test_bad_config_is_named(fields, match):
  with pytest.raises(ConfigError, match=match):
    LM2Model(tiny_config("hmt", **fields))


def test_tokens_that_do_not_fit_a_segment_and_a_state_of_another_cache_size_are_refused():
  tokens = random_tokens(0, (2, L))
  wide = LM2Model(tiny_config("hmt", memory_sensory_tokens=9))
  with pytest.raises(ConfigError, match=r"model.memory.sensory_tokens=9: must be at most segment_len=8"):
    jax.eval_shape(lambda: wide.init(jax.random.key(0), tokens))
  model, params, _ = _model()
  other = LM2Model(tiny_config("hmt", memory_cache_size=N + 1)).init_memory(2)
  with pytest.raises(ConfigError, match="init_memory"):
    jax.eval_shape(lambda: model.apply({"params": params}, tokens, other))
