"""memoryllm / mplus: the pool update with a fixed drop mask and the store against NumPy, random drops, the
retriever's top-r against brute force, the self-update against a plain Llama layer, gradients, bad sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import build, random_tokens, tiny_config
from lm2_jax.model import LM2Model
from lm2_jax.model.config import ConfigError
from lm2_jax.model.decoder import DecoderLayer, LayerContext
from lm2_jax.model.layers import rope_tables
from lm2_jax.model.memory.ltm_store import LongTermStore
from lm2_jax.model.memory.memoryllm import pool_update, random_drop, top_r_mask

SEG = 8


def _np_compact(tokens, keep, ages, size):
  """Reference: the kept rows in order, the last `size` of them, right-aligned after empty (zero) slots."""
  idx = [i for i in range(len(keep)) if keep[i]][-size:]
  out, filled, age = np.zeros((size, tokens.shape[1])), np.zeros(size), np.zeros(size)
  start = size - len(idx)
  out[start:], filled[start:], age[start:] = tokens[idx], 1, ages[idx]
  return out, filled, age


def test_pool_update_with_a_fixed_drop_mask_matches_numpy():
  rng = np.random.default_rng(0)
  B, N, K, C, D = 3, 6, 3, 5, 4
  filled = np.array([[0, 0, 1, 1, 1, 1], [1] * 6, [0] * 6], np.float32)
  state = {"pool": rng.normal(size=(B, N, D)).astype(np.float32) * filled[..., None], "filled": filled,
           "age": rng.integers(1, 9, (B, N)).astype(np.float32) * filled, "clock": np.array([4., 9., 0.]),
           "store": rng.normal(size=(B, C, D)).astype(np.float32), "store_filled": np.array([[0, 1, 1, 1, 1]] * B, np.float32),
           "store_age": rng.integers(1, 5, (B, C)).astype(np.float32), "store_time": rng.integers(1, 5, (B, C)).astype(np.float32)}
  new = rng.normal(size=(B, K, D)).astype(np.float32)
  valid = np.array([[1, 1, 1], [0, 1, 1], [1, 1, 1]], bool)  # row 1: the last document has 2 of the last K tokens
  drop = np.zeros((B, N), bool)
  drop[0, [2]] = True        # 4 filled + 3 new: one must go
  drop[1, [1, 4]] = True     # full pool, 2 new: two go
  got = jax.tree.map(np.asarray, pool_update(jax.tree.map(jnp.asarray, state), jnp.asarray(new), jnp.asarray(valid),
                                             jnp.asarray(drop)))
  for b in range(B):
    clock = state["clock"][b] + valid[b].any()
    keep = np.concatenate([(filled[b] > 0) & ~drop[b], valid[b]])
    want = _np_compact(np.concatenate([state["pool"][b], new[b]]), keep,
                       np.concatenate([state["age"][b], np.full(K, clock)]), N)
    for g, w in zip((got["pool"][b], got["filled"][b], got["age"][b]), want):
      np.testing.assert_allclose(g, w, atol=1e-6)
    assert got["clock"][b] == clock
    keep_store = np.concatenate([state["store_filled"][b] > 0, drop[b] & (filled[b] > 0)])
    tokens = np.concatenate([state["store"][b], state["pool"][b]])
    want = _np_compact(tokens, keep_store, np.concatenate([state["store_age"][b], state["age"][b]]), C)
    for g, w in zip((got["store"][b], got["store_filled"][b], got["store_age"][b]), want):
      np.testing.assert_allclose(g, w, atol=1e-6)
    want_time = _np_compact(tokens, keep_store, np.concatenate([state["store_time"][b], np.full(N, clock)]), C)[2]
    np.testing.assert_allclose(got["store_time"][b], want_time)
  assert got["filled"][1].sum() == 6 and got["filled"][2].sum() == 3  # row 2 fills its empty pool, drops nothing


def test_random_drop_takes_exactly_n_filled_slots_uniformly():
  filled = jnp.array([[0, 1, 1, 1, 1, 1, 1, 1]] * 2000, jnp.float32)
  n = jnp.full((2000,), 2)
  drop = np.asarray(random_drop(jax.random.split(jax.random.key(0), 2000), filled, n))
  assert (drop.sum(1) == 2).all() and not drop[:, 0].any()
  share = drop[:, 1:].mean(0)  # each of the 7 filled slots: 2/7 of the time
  np.testing.assert_allclose(share, 2 / 7, atol=0.04)


def test_top_r_matches_brute_force():
  rng = np.random.default_rng(1)
  B, L, C, r = 2, 5, 9, 3
  s = rng.normal(size=(B, L, C)).astype(np.float32)
  filled = (rng.random((B, C)) < 0.7).astype(np.float32)
  filled[1, :] = 0
  filled[1, [2, 7]] = 1  # fewer filled than r: both, no more
  got = np.asarray(top_r_mask(jnp.asarray(s), jnp.asarray(filled), r))
  for b in range(B):
    for t in range(L):
      cands = [c for c in np.argsort(-s[b, t]) if filled[b, c]][:r]
      want = np.zeros(C, bool)
      want[cands] = True
      np.testing.assert_array_equal(got[b, t], want)


def test_self_update_writes_the_outputs_of_the_layer_at_the_last_k_positions():
  """One layer, one segment from an empty pool: the update pass sees no memory, so the K new pool tokens are the
  plain Llama layer's outputs at the segment's last K positions (the same layer without memory)."""
  for kind in ("mplus",):  # memoryllm's update is the same code
    config = tiny_config(kind, num_layers=1, scan_layers=False, memory_num_slots=6, memory_update_tokens=3)
    model, params = build(config)
    tokens = random_tokens(0, (2, SEG))
    memory = jax.jit(lambda p, t: model.apply({"params": p}, t)[1])(params, tokens)
    plain = DecoderLayer(LM2Model(tiny_config("none", num_layers=1)).config, has_memory=False)
    layer_params = {k: v for k, v in params["decoder"]["layer_0"].items() if k != "memory"}
    cos, sin = rope_tables(model.config, jnp.arange(SEG))
    x_BLD = params["embed"]["embedding"][tokens]
    (y_BLD, _), _ = jax.jit(plain.apply)({"params": layer_params}, (x_BLD, None), (None, None), LayerContext(cos, sin))
    np.testing.assert_allclose(memory["pool"][0][:, -3:], y_BLD[:, -3:], atol=1e-5)
    np.testing.assert_array_equal(memory["filled"][0], [[0, 0, 0, 1, 1, 1]] * 2)


def test_memory_reaches_later_segments_and_gradients_reach_every_memory_parameter():
  """N=6, K=4: the second segment's write drops 2 tokens into the store, which the third segment retrieves."""
  model, params = build(tiny_config("mplus", memory_num_slots=6, memory_update_tokens=4, memory_ltm_capacity=8,
                                    memory_retrieve_tokens=2, memory_retriever_dim=8))
  tokens = random_tokens(0, (2, 3 * SEG))
  w = jax.random.normal(jax.random.key(1), (2, 3 * SEG, 64))
  logits, memory, aux = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens)
  np.testing.assert_array_equal(np.asarray(memory["store_filled"]).sum(-1), 6)  # 4 + 4 + 4 written, 6 kept
  assert set(aux["memory_stats"]) == {"pool_filled", "store_filled", "retrieval_query", "picked"}
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, tokens)[0] * w)))(params)
  leaves = jax.tree_util.tree_flatten_with_path(grads["decoder"]["layers_0_2"]["memory"])[0]
  assert len(leaves) == 5  # k, v, retriever query and key kernels, norm scale
  for path, g in leaves:
    assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)
  # the store is read: without the retriever's picks (r masked out by an empty store) the last segment changes
  empty = dict(memory, store_filled=jnp.zeros_like(memory["store_filled"]))
  f = jax.jit(lambda m: model.apply({"params": params}, tokens[:, :SEG], m)[0])
  a, b = f(memory), f(empty)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4


def test_the_memory_stream_drives_the_drops():
  """With the `memory` RNG stream the drops follow it (two keys, two pools); without it, the row's write count."""
  model, params = build(tiny_config("memoryllm", memory_num_slots=4, memory_update_tokens=2))
  tokens = random_tokens(0, (1, 6 * SEG))
  with_key = jax.jit(lambda key: model.apply({"params": params}, tokens, rngs={"memory": key})[1]["age"])
  ages = [np.asarray(with_key(jax.random.key(i))) for i in (1, 2, 1)]
  assert not np.array_equal(ages[0], ages[1])
  np.testing.assert_array_equal(ages[0], ages[2])
  without = jax.jit(lambda t: model.apply({"params": params}, t)[1]["age"])
  np.testing.assert_array_equal(without(tokens), without(tokens + 1))  # drops do not depend on the tokens


@pytest.mark.parametrize("fields,match", [
    (dict(memory_num_slots=4, memory_update_tokens=5), r"memory.update_tokens=5: must be at most memory.num_slots=4"),
    (dict(memory_update_tokens=9, memory_num_slots=12), r"memory.update_tokens=9: must be at most model.segment_len=8"),
    (dict(memory_ltm_capacity=3, memory_retrieve_tokens=4), r"memory.retrieve_tokens=4: must be at most memory.ltm_capacity=3"),
])
def test_a_pool_that_does_not_fit_the_config_is_one_clear_error(fields, match):
  with pytest.raises(ConfigError, match=match):
    model, params = build(tiny_config("mplus", **fields))


def test_host_store_search_is_brute_force_top_r_and_keeps_the_latest_capacity():
  rng = np.random.default_rng(2)
  store = LongTermStore(num_layers=2, token_dim=4, key_dim=8, capacity=50)
  tokens, keys, ages = rng.normal(size=(70, 4)), rng.normal(size=(70, 8)), np.arange(70.0)
  store.add(1, tokens[:30], keys[:30], ages[:30])
  store.add(1, tokens[30:], keys[30:], ages[30:])  # 20 of the first 30 leave (first in, first out)
  assert store.size.tolist() == [0, 50] and sorted(store.ages[1]) == list(range(20, 70))
  queries = rng.normal(size=(3, 8))
  kept = keys[20:].astype(np.float32).astype(np.float64)
  want_scores = (1 / (1 + np.exp(-(queries @ kept.T) / np.sqrt(8)))).mean(0)
  got = store.search(1, queries, 5)
  np.testing.assert_array_equal(store.ages[1][got], 20 + np.argsort(-want_scores)[:5])
  assert len(store.search(0, queries, 5)) == 0


def test_host_store_restored_under_another_config_is_one_clear_error(tmp_path):
  config = LM2Model(tiny_config("mplus")).config
  store = LongTermStore.for_config(config, 100)
  store.add(0, np.ones((3, 32)), np.ones((3, 32)), np.arange(3.0))
  store.save(str(tmp_path))
  again = LongTermStore.load(str(tmp_path), config)
  assert again.size.tolist() == [3, 0] and again.ages[0, :3].tolist() == [0, 1, 2]
  other = LM2Model(tiny_config("mplus", memory_retriever_dim=16)).config
  with pytest.raises(ConfigError, match=r"ltm store .*saved under another model config.*'retriever_dim': \(32, 16\)"):
    LongTermStore.load(str(tmp_path), other)
