"""MemoryLLM (Wang et al. 2024, arXiv 2402.04624) and M+ (Wang et al. 2025, arXiv 2502.00592): a pool of memory
token states per layer that self-attention reads as a prefix, written by the layer itself.

Letters: B batch, L positions in the segment, D d_model, N pool tokens (num_slots), K tokens written per segment
(update_tokens), C device-side long-term store (ltm_capacity), R retriever width, r retrieved tokens, G kv heads,
E head dim.

read  (kind 'memoryllm'): the segment's tokens attend to the pool beside their own keys (`out.kv`):
    k, v = RMSNorm(pool) W_k, RMSNorm(pool) W_v       the kind's own projections (not the layer's: a Linen layer
                                                      memory cannot call its sibling attention's kernels), no rotary:
                                                      memory tokens have no position; empty slots are masked
self-update (after the layer's ordinary pass, `self_updates`): the layer runs once more on the segment with the
    last K pool tokens (the newest) as its prefix; its outputs at the segment's last K positions are the K new
    memory tokens. K pool tokens are dropped at random (RNG stream `memory`; without it, a key folded from the
    row's write count, so decoding and sessions are reproducible), the survivors keep their order and the new
    tokens are appended (the pool is ordered oldest first, empty slots before all):
        pool' = compact([pool ; new], keep = [filled & ~drop ; valid], N)       (`compact`)
    An empty slot is filled before any token is dropped. Gradients flow through the self-update into the layer
    (and through the pool into later segments) within the BPTT window; the drop choice is not differentiable.
M+ (kind 'mplus'), in addition:
    store' = compact([store ; pool], keep = [store_filled ; drop], C)        dropped tokens enter the long-term
                                                                             store; the oldest leave it when full
    s_tc  = (h_t W_q) . (RMSNorm(store_c) W_r) / sqrt(R)                     the co-trained retriever
    token t attends to the r store tokens of highest s_tc (per token, so the model stays causal) beside the pool,
    each with log sigmoid(s_tc) added to its attention score: the retriever learns from the language-model loss
    through that gate (M+ adds the same log-gate to the attention weights; its separate retrieval loss needs
    labels of relevant memory that a language-modelling stream does not have).

Where the long-term store lives. Inside jit (training, evaluation, the decoding functions) the store is this bounded
device-side ring of C tokens per layer, part of the memory state: the state's shapes must be static. Its tokens are
hidden states and carry their write time (`store_age`, in writes of the row). The host store of M+ (NumPy, many
more tokens, capacity and ages kept, search by the same retriever keys) is `lm2_jax.model.memory.ltm_store.
LongTermStore`; sessions save it beside the memory state (lm2_jax.sessions.session).

Documents: the shared rules (protocol.Documents): tokens of a document that starts inside the segment see a fresh
(empty) pool and store; only the segment's last document writes, from a fresh memory when it is new.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.model.config import ModelConfig, as_dict, check, positive_int
from lm2_jax.model.layers import RMSNorm, dense
from lm2_jax.model.memory import parse_layers, register
from lm2_jax.model.memory.protocol import Documents, ExtraKV, LayerMemory, MemoryOut


@dataclasses.dataclass(frozen=True)
class MemoryLLMConfig:
  kind: str
  layers: tuple[int, ...]
  num_slots: int        # N, pool tokens per layer
  update_tokens: int    # K, tokens written (and dropped) per segment
  retrieve_tokens: int  # r, long-term tokens per query (mplus; 0 for memoryllm)
  ltm_capacity: int     # C, device-side long-term store per layer (mplus; 0 for memoryllm)
  retriever_dim: int    # R (mplus; 0 for memoryllm)
  token_dim: int        # D: the pool holds the layer's hidden states (set from model.d_model)

  @classmethod
  def parse(cls, cfg: Any, *, num_layers: int, d_model: int) -> "MemoryLLMConfig":
    v = as_dict(cfg, "model.memory")
    kind = v["kind"]
    for name in ("num_slots", "update_tokens", "layers"):
      check(name in v, f"model.memory.{name}", None, f"required for memory kind {kind!r}")
    n, k = positive_int(v, "num_slots", "model.memory"), positive_int(v, "update_tokens", "model.memory")
    check(k <= n, "model.memory.update_tokens", k, f"must be at most memory.num_slots={n} (the pool it writes into)")
    r = c = dim = 0
    if kind == "mplus":
      r, c = positive_int(v, "retrieve_tokens", "model.memory"), positive_int(v, "ltm_capacity", "model.memory")
      dim = positive_int(v, "retriever_dim", "model.memory")
      check(r <= c, "model.memory.retrieve_tokens", r, f"must be at most memory.ltm_capacity={c}")
    check(v.get("token_dim", d_model) == d_model, "model.memory.token_dim", v.get("token_dim"),
          f"is model.d_model={d_model} (the pool holds hidden states); leave it unset")
    return cls(kind=kind, layers=parse_layers(v["layers"], num_layers), num_slots=n, update_tokens=k,
               retrieve_tokens=r, ltm_capacity=c, retriever_dim=dim, token_dim=d_model)


def compact(tokens_BXD, keep_BX, ages_BX, size: int):
  """The kept entries in their order, right-aligned in `size` slots (empty slots first): -> (tokens_BSD zeros where
  empty, filled_BS float, ages_BS). When more than `size` are kept, the first ones (the oldest) leave."""
  X = keep_BX.shape[1]
  order_BX = jnp.argsort(jnp.where(keep_BX, jnp.arange(X), -1), axis=1, stable=True)[:, X - size:]
  filled_BS = jnp.take_along_axis(keep_BX, order_BX, axis=1)
  tokens_BSD = jnp.take_along_axis(tokens_BXD, order_BX[..., None], axis=1) * filled_BS[..., None]
  ages_BS = jnp.take_along_axis(ages_BX, order_BX, axis=1) * filled_BS
  return tokens_BSD, filled_BS.astype(jnp.float32), ages_BS


def random_drop(keys_B, filled_BN, n_drop_B):
  """Drop mask [B, N]: n_drop_B[b] filled slots of row b, uniformly at random without replacement."""
  u_BN = jax.vmap(lambda k: jax.random.uniform(k, filled_BN.shape[1:]))(keys_B)
  u_BN = jnp.where(filled_BN > 0, u_BN, 2.0)  # empty slots are never dropped
  rank_BN = jnp.argsort(jnp.argsort(u_BN, axis=1), axis=1)
  return rank_BN < n_drop_B[:, None]


def pool_update(state, new_BKD, valid_BK, drop_BN):
  """The pool after the self-update with a given drop mask: survivors in order, then the valid new tokens (age =
  the row's write count after this write); the store (mplus) takes the dropped tokens."""
  N = state["pool"].shape[1]
  clock_B = state["clock"] + valid_BK.any(axis=1)
  keep_old_BN = (state["filled"] > 0) & ~drop_BN
  ages = jnp.concatenate([state["age"], jnp.broadcast_to(clock_B[:, None], valid_BK.shape)], axis=1)
  pool, filled, age = compact(jnp.concatenate([state["pool"], new_BKD.astype(jnp.float32)], axis=1),
                              jnp.concatenate([keep_old_BN, valid_BK], axis=1), ages, N)
  new = {**state, "pool": pool, "filled": filled, "age": age, "clock": clock_B}
  if "store" in state:
    C = state["store"].shape[1]
    keep_BX = jnp.concatenate([state["store_filled"] > 0, drop_BN & (state["filled"] > 0)], axis=1)
    tokens_BXD = jnp.concatenate([state["store"], state["pool"]], axis=1)
    new["store"], new["store_filled"], new["store_age"] = compact(
        tokens_BXD, keep_BX, jnp.concatenate([state["store_age"], state["age"]], axis=1), C)
    dropped_at = jnp.broadcast_to(clock_B[:, None], drop_BN.shape)
    new["store_time"] = compact(tokens_BXD, keep_BX, jnp.concatenate([state["store_time"], dropped_at], axis=1), C)[2]
  return new


def top_r_mask(scores_BLC, filled_BC, r: int):
  """Per query, its r highest-scoring filled store entries (fewer when fewer are filled): bool [B, L, C]."""
  s = jnp.where(filled_BC[:, None, :] > 0, scores_BLC, -jnp.inf)
  threshold_BL = jax.lax.top_k(s, r)[0][..., -1]
  return (s >= threshold_BL[..., None]) & (filled_BC[:, None, :] > 0)


@register("memoryllm")
class MemoryLLM(LayerMemory):
  """Pool read as a prefix (`out.kv`), written by the layer's second pass (`self_update`); module docstring.
  Statistics: `pool_filled` (share of filled slots) [B]; mplus also `store_filled` [B], `retrieval_query`
  [B, R], the mean retriever query of the segment's reading tokens, and `picked` [B, C], the share of them that
  retrieved each store token."""
  cfg: ModelConfig

  Config = MemoryLLMConfig
  emits_kv = True
  self_updates = True

  @staticmethod
  def init_state(mcfg: MemoryLLMConfig, batch: int) -> dict[str, jax.Array]:
    """Empty: no filled slot (a fresh pool is read as nothing), write count 0."""
    z = lambda *shape: jnp.zeros((batch, *shape), jnp.float32)
    state = {"pool": z(mcfg.num_slots, mcfg.token_dim), "filled": z(mcfg.num_slots), "age": z(mcfg.num_slots),
             "clock": z()}
    if mcfg.kind == "mplus":
      state.update(store=z(mcfg.ltm_capacity, mcfg.token_dim), store_filled=z(mcfg.ltm_capacity),
                   store_age=z(mcfg.ltm_capacity), store_time=z(mcfg.ltm_capacity))
    return state

  @staticmethod
  def state_axes(mcfg: MemoryLLMConfig) -> dict[str, tuple[str, ...]]:
    axes = {"pool": ("batch", "mem_slots", "embed"), "filled": ("batch", "mem_slots"),
            "age": ("batch", "mem_slots"), "clock": ("batch",)}
    if mcfg.kind == "mplus":
      axes.update(store=("batch", "mem_slots", "embed"), store_filled=("batch", "mem_slots"),
                  store_age=("batch", "mem_slots"), store_time=("batch", "mem_slots"))
    return axes

  def setup(self):
    c, m, dt = self.cfg, self.cfg.memory, self.cfg.dtype
    check(m.update_tokens <= c.segment_len, "model.memory.update_tokens", m.update_tokens,
          f"must be at most model.segment_len={c.segment_len}: the new memory tokens are the outputs at the "
          "segment's last update_tokens positions")
    self.norm = RMSNorm(c.norm_eps, dt)
    self.k = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "k_proj", dt)
    self.v = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "v_proj", dt)
    if m.kind == "mplus":
      self.query = dense(m.retriever_dim, ("embed", None), "retriever_query", dt)
      self.key = dense(m.retriever_dim, ("embed", None), "retriever_key", dt)

  def _kv(self, tokens_BXD):
    h_BXD = self.norm(tokens_BXD.astype(self.cfg.dtype))
    return self.k(h_BXD), self.v(h_BXD)

  def retriever_keys(self, tokens_BXD):
    """The retriever's keys [B, X, R] of memory tokens (the host store keeps them, lm2_jax.sessions.session)."""
    return self.key(self.norm(tokens_BXD.astype(self.cfg.dtype)))

  def retrieval_scores(self, state, q_BLR):
    """s [B, L, C] float32: each query's (q = h W_q) affinity to each long-term store token (module docstring)."""
    k_BCR = self.retriever_keys(state["store"])
    s = jnp.einsum("blr,bcr->blc", q_BLR, k_BCR, preferred_element_type=jnp.float32)
    return s / np.sqrt(q_BLR.shape[-1]).astype(np.float32)

  def step(self, state, h_BLD, read_BL=None, write_BL=None, write_state=None):
    """The read (the write is `self_update`, after the layer): -> (MemoryOut with kv over [pool ; store] and
    their masks, the state unchanged)."""
    del write_BL
    check(write_state is None, "model.memory.share_across_layers", True, "memoryllm/mplus keep one pool per layer")
    B, L, _ = h_BLD.shape
    read_BL = jnp.ones((B, L), bool) if read_BL is None else read_BL
    k_BNGE, v_BNGE = self._kv(state["pool"])
    mask_BLN = read_BL[:, :, None] & (state["filled"] > 0)[:, None, :]
    stats = {"pool_filled": jax.lax.stop_gradient(state["filled"].mean(-1))}
    if self.cfg.memory.kind != "mplus":
      return MemoryOut(kv=ExtraKV(k_BNGE, v_BNGE, mask_BLN), stats=stats), state
    q_BLR = self.query(h_BLD)
    s_BLC = self.retrieval_scores(state, q_BLR)
    picked_BLC = top_r_mask(s_BLC, state["store_filled"], self.cfg.memory.retrieve_tokens) & read_BL[:, :, None]
    k_BCGE, v_BCGE = self._kv(state["store"])
    bias_BLX = jnp.concatenate([jnp.zeros(mask_BLN.shape, jnp.float32), jax.nn.log_sigmoid(s_BLC)], axis=-1)
    kv = ExtraKV(jnp.concatenate([k_BNGE, k_BCGE], axis=1), jnp.concatenate([v_BNGE, v_BCGE], axis=1),
                 jnp.concatenate([mask_BLN, picked_BLC], axis=-1), bias_BLX)
    stats["store_filled"] = jax.lax.stop_gradient(state["store_filled"].mean(-1))
    stats["picked"] = jax.lax.stop_gradient(  # [B, C] share of the reading tokens that retrieved each store token
        jnp.einsum("blc,bl->bc", picked_BLC.astype(jnp.float32), read_BL.astype(jnp.float32))
        / jnp.maximum(read_BL.sum(1), 1)[:, None])
    w_BL = read_BL.astype(jnp.float32)  # the mean retriever query of the reading tokens: sessions search the host
    stats["retrieval_query"] = jax.lax.stop_gradient(  # store with it (lm2_jax.sessions.session)
        jnp.einsum("blr,bl->br", q_BLR.astype(jnp.float32), w_BL) / jnp.maximum(w_BL.sum(1), 1.0)[:, None])
    return MemoryOut(kv=kv, stats=stats), state

  def update_prefix(self, state, L: int) -> ExtraKV:
    """The last K pool tokens (the newest), which the self-update pass attends to."""
    K = self.cfg.memory.update_tokens
    k_BKGE, v_BKGE = self._kv(state["pool"][:, -K:])
    filled_BK = state["filled"][:, -K:] > 0
    return ExtraKV(k_BKGE, v_BKGE, jnp.broadcast_to(filled_BK[:, None, :], (filled_BK.shape[0], L, K)))

  def self_update(self, state, y_BLD, docs: Documents | None = None):
    """The layer's outputs at the segment's last K positions (of its last document) enter the pool; as many
    pool tokens are dropped at random as make room for them."""
    m = self.cfg.memory
    B = y_BLD.shape[0]
    new_BKD = y_BLD[:, -m.update_tokens:]
    valid_BK = jnp.ones(new_BKD.shape[:2], bool) if docs is None else docs.write_BL[:, -m.update_tokens:]
    n_drop_B = jnp.maximum(state["filled"].sum(-1) + valid_BK.sum(-1) - m.num_slots, 0)
    if self.has_rng("memory"):
      keys_B = jax.random.split(self.make_rng("memory"), B)
    else:
      keys_B = jax.vmap(lambda n: jax.random.fold_in(jax.random.key(0), n))(state["clock"].astype(jnp.int32))
    return pool_update(state, new_BKD, valid_BK, random_drop(keys_B, state["filled"], n_drop_B))


@register("mplus")
class MPlus(MemoryLLM):
  """MemoryLLM with a long-term store and a co-trained retriever (module docstring)."""
