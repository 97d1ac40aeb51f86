"""Cached decoding against recomputing everything, sampling filters against NumPy, attention with a cache and
extra keys against a NumPy attention, and compilation counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import build, recompute_everything, tiny_config
from lm2_jax.model import LM2Model
from lm2_jax.model.config import ConfigError
from lm2_jax.model.layers import Attention, rope_tables
from lm2_jax.model.memory.protocol import ExtraKV
from lm2_jax.sessions.decoding import Sampling, decoder_for, filter_logits, generate

NEW = 12
# Segments of 8: prompts ending mid-segment (5, 13, 3), at a boundary (8, 16); 12 new tokens cross 1-2 boundaries.
LENGTHS = (5, 8, 13, 3, 16)


@pytest.mark.parametrize("kind,fields", [("none", {}), ("lm2", {}), ("lm2", {"memory_share_across_layers": True}),
                                         ("hierarchical", {}), ("rmt", {}), ("armt", {}), ("memoryllm", {}),
                                         ("mplus", {"memory_num_slots": 4, "memory_ltm_capacity": 6}), ("titans", {}),
                                         ("titans", {"memory_variant": "mal"}),
                                         ("hmt", {}), ("hmt", {"memory_eviction": "learned"})],
                         ids=["none", "lm2", "lm2_shared", "hierarchical", "rmt", "armt", "memoryllm", "mplus", "titans",
                              "titans_mal", "hmt", "hmt_learned"])
def test_cached_decoding_equals_recomputing_everything_and_a_batch_equals_each_alone(kind, fields):
  model, params = build(tiny_config(kind, **fields))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(4, 64, n).tolist() for n in LENGTHS]
  batch = generate(model, params, prompts, Sampling(max_new_tokens=NEW))
  for prompt, got in zip(prompts, batch):  # the reference runs each prompt alone
    assert got == recompute_everything(model, params, prompt, NEW)
  if kind == "lm2" and not fields:  # and cached decoding of a prompt alone (batch 1) gives what it gives in the batch
    assert [generate(model, params, [p], Sampling(max_new_tokens=NEW))[0] for p in prompts[:2]] == batch[:2]


def test_decoding_compiles_once_for_many_prompt_lengths():
  model, params = build(tiny_config("lm2", segment_len=4))
  dec = decoder_for(model.config)
  rng = np.random.default_rng(1)
  for n in range(1, 14):
    generate(model, params, [rng.integers(4, 64, n).tolist(), rng.integers(4, 64, 14 - n).tolist()],
             Sampling(max_new_tokens=5 + n % 3))
  assert dec.compilations() == {"segment": 1, "start": 1, "extend": 1, "decode": 1}


def test_stop_ids_end_a_row_after_the_stop_token():
  model, params = build(tiny_config("lm2"))
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14]]
  full = generate(model, params, prompts, Sampling(max_new_tokens=8))
  stop = full[0][2]
  stopped = generate(model, params, prompts, Sampling(max_new_tokens=8, stop_ids=(stop,)))
  for out, ref in zip(stopped, full):
    assert out == (ref[:ref.index(stop) + 1] if stop in ref else ref)


def _np_filter(logits, temperature, top_k, top_p):
  x = np.asarray(logits, np.float64) / temperature
  keep = np.ones_like(x, bool)
  for b in range(x.shape[0]):
    order = np.argsort(-x[b], kind="stable")
    if top_k:
      keep[b] &= x[b] >= x[b, order[top_k - 1]]
    p = np.exp(x[b] - x[b][keep[b]].max()) * keep[b]
    p /= p.sum()
    mass, allowed = 0.0, np.zeros_like(keep[b])
    for i in order:
      if keep[b, i] and mass < top_p:
        allowed[i] = True
        mass += p[i]
    keep[b] &= allowed
  return keep


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.5), (4, 0.7), (1, 0.9)])
def test_top_k_top_p_keep_the_tokens_numpy_keeps(top_k, top_p):
  logits = jax.random.normal(jax.random.key(0), (3, 20)) * 2
  got = np.isfinite(np.asarray(filter_logits(logits, 0.7, top_k, top_p)))
  np.testing.assert_array_equal(got, _np_filter(logits, 0.7, top_k, top_p))


def test_sampling_draws_from_the_filtered_distribution():
  model, params = build(tiny_config("none"))
  outs = generate(model, params, [[3, 4, 5]] * 64, Sampling(max_new_tokens=1, temperature=1.0, top_k=2, seed=3))
  logits = model.apply({"params": params}, jnp.asarray([[3, 4, 5]]))[0][0, -1]
  top2 = set(np.argsort(-np.asarray(logits))[:2].tolist())
  firsts = {o[0] for o in outs}
  assert firsts <= top2 and len(firsts) == 2  # both allowed tokens drawn, nothing else


def _np_attention(q, k, v, mask):
  """q [L, H, E], k/v [S, K, E], mask [L, S] -> [L, H, E], head h reading kv head h // (H / K)."""
  H, K = q.shape[1], k.shape[1]
  out = np.zeros_like(q)
  for h in range(H):
    s = q[:, h] @ k[:, h // (H // K)].T / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    out[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, h // (H // K)]
  return out


def test_xla_attention_with_extra_kv_and_cache_equals_numpy_over_the_concatenated_keys():
  cfg = LM2Model(tiny_config("none")).config
  att = Attention(cfg)
  B, L, C, M, K, E = 2, 3, 8, 4, cfg.num_kv_heads, cfg.head_dim
  r = np.random.default_rng(0)
  x = r.standard_normal((B, L, cfg.d_model)).astype(np.float32)
  cache = {"k": r.standard_normal((B, C, K, E)).astype(np.float32), "v": r.standard_normal((B, C, K, E)).astype(np.float32)}
  extra = ExtraKV(r.standard_normal((B, M, K, E)).astype(np.float32), r.standard_normal((B, M, K, E)).astype(np.float32),
                  r.random((B, L, M)) < 0.6)
  index = np.array([2, 5])
  cos, sin = rope_tables(cfg, jnp.asarray(index[:, None] + np.arange(L)))
  params = nn.unbox(att.init(jax.random.key(0), x, cos, sin, None, extra, cache, index))
  out, new_cache = att.apply(params, x, cos, sin, None, extra, cache, index)
  # NumPy: project and rotate the new tokens, put them into the cache, attend over [extra ; cache].
  p = jax.tree.map(np.asarray, params["params"])
  for b in range(B):
    q = np.einsum("ld,dhe->lhe", x[b], p["q_proj"]["kernel"])
    k = np.einsum("ld,dke->lke", x[b], p["k_proj"]["kernel"])
    v = np.einsum("ld,dke->lke", x[b], p["v_proj"]["kernel"])
    c, s = np.asarray(cos[b])[:, None], np.asarray(sin[b])[:, None]
    half = E // 2
    rotate = lambda t: t * c + np.concatenate([-t[..., half:], t[..., :half]], -1) * s
    q, k = rotate(q), rotate(k)
    ks, vs = cache["k"][b].copy(), cache["v"][b].copy()
    ks[index[b]:index[b] + L], vs[index[b]:index[b] + L] = k, v
    np.testing.assert_allclose(new_cache["k"][b], ks, atol=1e-5)
    mask = np.concatenate([extra.mask_BLM[b], np.arange(C)[None] <= (index[b] + np.arange(L))[:, None]], -1)
    want = _np_attention(q, np.concatenate([extra.k_BMKE[b], ks]), np.concatenate([extra.v_BMKE[b], vs]), mask)
    want = np.einsum("lhe,hed->ld", want, p["o_proj"]["kernel"])
    np.testing.assert_allclose(out[b], want, atol=2e-5, rtol=1e-4)


def test_bad_decoding_input_is_named():
  with pytest.raises(ConfigError, match="model.attention_kernel='flash'"):
    LM2Model(tiny_config("lm2", attention_kernel="flash"))
  with pytest.raises(ConfigError, match="model.attention_kernel='splash'.*TPU only"):
    LM2Model(tiny_config("lm2", attention_kernel="splash"))
  model, params = build(tiny_config("lm2"))
  with pytest.raises(ConfigError, match=r"row 0 has ids \[64\] outside the model's vocabulary \[0, 64\)"):
    generate(model, params, [[3, 64]], Sampling(max_new_tokens=1))
  with pytest.raises(ConfigError, match="sampling.top_p=0"):
    Sampling(top_p=0)
