"""Hierarchical Memory Transformer memory (He et al. 2024, arXiv 2405.06067) with an eviction manager.

A segment kind like `rmt` (it wraps the layer stack; `memory.layers` does not apply). Letters: B batch, L positions
in the segment, D d_model, k sensory tokens (`sensory_tokens`), N cached memory embeddings (`cache_size`),
j summary tokens (`summary_tokens`), X = k + 1 + L + 1 + j + 1 positions the layers process per segment.

state     sensory [B, k, D]   the embeddings of the last k tokens of the previous segment (HMT's sensory memory)
          recalled [B, D]     the memory embedding recalled for the segment
          cache [B, N, D]     past memory embeddings; valid [B, N] (1: filled), age [B, N] (segments since written)
          All zeros in a fresh state.
segment   one call of the layers on (rotary positions 0 .. X-1)
              [sensory ; P + recalled ; segment ; P + recalled ; x_{L-j} .. x_{L-1} ; Q]
          P, Q [D] learned (the memory token's start, as rmt's `initial`; the summary token). The first k + 1 are
          the prefix the segment's tokens read (cached decoding puts them before the segment); the write token
          after the segment gives the new memory embedding  m = RMSNorm_w(y_write)  (HMT takes the output at the
          memory position after the segment). The last j + 1 positions are the summary pass, kept apart from the
          rest by document ids: Q reads the segment's last j tokens and gives the query  q = RMSNorm_q(y_Q).
          HMT summarises the first half of the segment about to be read, which lets that segment's first tokens
          read a memory recalled with the tokens after them; here the summary is of the tail of the segment just
          read and the recall is for the next segment, so every token reads only memory of earlier tokens.
cache     m enters the first free slot; when the cache is full, slot e leaves first (`eviction`):
              fifo     e = argmax_i age_i      (HMT's own cache)
              learned  e = argmin_i s_i,  s_i = w . sg(C_i) + b   (the scorer; sg: stop-gradient)
          then the ages of the kept embeddings grow by one and m's is 0.
recall    over the cache after m entered (HMT's memory search; values are the cached embeddings themselves):
              a_i = softmax_{i valid}((q Wq) . (C_i Wk) / sqrt(D)),     recalled' = sum_i a_i C_i
learned eviction loss  (weight `eviction_loss_weight`, trains the scorer only): eviction must keep what later
          recalls attend to, so the scorer is trained to predict, from an embedding alone, its share of recall
          attention:  loss = - sum_{i valid} sg(a_i) log softmax_{i valid}(s)_i  at every recall (a cross-entropy
          between the recall attention and the scorer's distribution over the cache), averaged over rows and
          segments. It is differentiable end to end through the scorer; the eviction itself (an argmin) is not.
          An embedding that recalls attend to in many segments gets a high score and stays; FIFO drops it after N.
stats     per segment, averaged by the decoder: `evicted` [B, N] (one-hot of the slot that left, zeros while the
          cache was not full), `evicted_age` [B] (its age, 0 when none left), `age` [B, N] and `recall` [B, N] (a).

Documents (as rmt): the prefix belongs to the segment's first document and holds a fresh state where that document
starts at this segment; the write token, the cache update, the summary and the next sensory tokens belong to the
segment's last document and start from a fresh state where it is new. Sensory tokens and summary tokens of other
documents are zeroed / hidden from Q. A document that starts inside a segment (not its first) reads no memory there.
Causality: segment tokens see the prefix (memory of earlier segments) and earlier tokens; write and summary
positions sit after the segment. The decoder cuts gradients through the state at `bptt_segments`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm2_jax.model.config import ModelConfig, as_dict, check, positive_int
from lm2_jax.model.layers import INIT_STD, RMSNorm, dense
from lm2_jax.model.memory import register
from lm2_jax.model.memory.protocol import Documents, select_rows

EVICTION_RULES = ("fifo", "learned")


@dataclasses.dataclass(frozen=True)
class HMTMemoryConfig:
  kind: str
  layers: tuple[int, ...]       # always (): the memory tokens pass through every layer
  sensory_tokens: int           # k
  summary_tokens: int           # j
  cache_size: int               # N
  eviction: str                 # 'fifo' | 'learned'
  eviction_loss_weight: float
  slot_dim: int                 # D = d_model

  @classmethod
  def parse(cls, cfg: Any, *, num_layers: int, d_model: int) -> "HMTMemoryConfig":
    del num_layers
    v = as_dict(cfg, "model.memory")
    f = "model.memory"
    for name in ("sensory_tokens", "summary_tokens", "cache_size", "eviction"):
      check(name in v, f"{f}.{name}", None, "required for memory kind 'hmt'")
    layers = v.get("layers", "all")
    check(layers == "all", f"{f}.layers", layers,
          "memory kind 'hmt' is model-level: its memory tokens pass through every layer; set model.memory.layers='all'")
    check(v["eviction"] in EVICTION_RULES, f"{f}.eviction", v["eviction"], f"use one of {EVICTION_RULES}")
    ints = {n: positive_int(v, n, f) for n in ("sensory_tokens", "summary_tokens", "cache_size")}
    check(v["eviction"] == "fifo" or ints["cache_size"] >= 2, f"{f}.cache_size", ints["cache_size"],
          "learned eviction chooses among the cached embeddings: use cache_size >= 2 (or eviction='fifo')")
    weight = v.get("eviction_loss_weight", 1.0)
    check(isinstance(weight, (int, float)) and weight >= 0, f"{f}.eviction_loss_weight", weight, "must be >= 0")
    return cls(kind=v["kind"], layers=(), **ints, eviction=v["eviction"], eviction_loss_weight=float(weight),
               slot_dim=d_model)


def eviction_slot(valid_BN, age_BN, score_BN, rule: str):
  """-> (slot_B where the new embedding goes, full_B: whether an embedding leaves for it). The first free slot;
  when none is free, the oldest (fifo) or the lowest-scored (learned) embedding's slot."""
  free_BN = valid_BN < 0.5
  if rule == "fifo":
    victim_B = jnp.argmax(jnp.where(free_BN, -1.0, age_BN), axis=-1)
  else:
    victim_B = jnp.argmin(jnp.where(free_BN, jnp.inf, score_BN), axis=-1)
  full_B = ~free_BN.any(-1)
  return jnp.where(full_B, victim_B, jnp.argmax(free_BN, axis=-1)), full_B


def insert(cache, m_BD, slot_B):
  """The cache {'cache', 'valid', 'age'} with m_BD in `slot_B`: age 0 there, the other filled slots one older."""
  at_BN = jax.nn.one_hot(slot_B, cache["valid"].shape[-1], dtype=jnp.float32) > 0
  return {"cache": jnp.where(at_BN[..., None], m_BD[:, None].astype(jnp.float32), cache["cache"]),
          "valid": jnp.where(at_BN, 1.0, cache["valid"]),
          "age": jnp.where(at_BN, 0.0, cache["age"] + cache["valid"])}


def masked_log_softmax(logits_BN, valid_BN):
  return jax.nn.log_softmax(jnp.where(valid_BN > 0.5, logits_BN, -1e30), axis=-1)


@register("hmt")
class HMTMemory(nn.Module):
  """Segment memory: `__call__(state, x_BLD, docs, run_layers) -> (y_BLD, new_state, stats, losses)` (module
  docstring); cached decoding puts `prefix(state)` [sensory ; P + recalled] before the segment."""
  cfg: ModelConfig

  Config = HMTMemoryConfig
  placement = "segment"

  @staticmethod
  def init_state(mcfg: HMTMemoryConfig, batch: int) -> dict[str, jax.Array]:
    B, N, D = batch, mcfg.cache_size, mcfg.slot_dim
    z = lambda *shape: jnp.zeros(shape, jnp.float32)
    return {"sensory": z(B, mcfg.sensory_tokens, D), "recalled": z(B, D), "cache": z(B, N, D), "valid": z(B, N),
            "age": z(B, N)}

  @staticmethod
  def state_axes(mcfg: HMTMemoryConfig) -> dict[str, tuple[str, ...]]:
    return {"sensory": ("batch", "mem_slots", "embed"), "recalled": ("batch", "embed"),
            "cache": ("batch", "mem_slots", "embed"), "valid": ("batch", "mem_slots"), "age": ("batch", "mem_slots")}

  @staticmethod
  def positions(mcfg: HMTMemoryConfig, L: int) -> jax.Array:
    """Rotary positions [X] of [sensory ; memory ; segment ; write ; summary tokens ; Q]: 0 .. X-1."""
    return jnp.arange(mcfg.sensory_tokens + L + mcfg.summary_tokens + 3)

  @staticmethod
  def prefix_len(mcfg: HMTMemoryConfig) -> int:
    """Positions before a segment's tokens in cached decoding: the k sensory tokens and the memory token."""
    return mcfg.sensory_tokens + 1

  @staticmethod
  def extended_ids(mcfg: HMTMemoryConfig, ids_BL, last_BL):
    """Document ids [B, X]: the prefix is the segment's first document, the write token its last; the summary
    block gets ids no token of the segment has (A for the last document's tokens and Q, A + 1 for the others)."""
    B = ids_BL.shape[0]
    a_B1 = ids_BL.max(axis=1, keepdims=True) + 1
    tail_Bj = jnp.where(last_BL[:, -mcfg.summary_tokens:], a_B1, a_B1 + 1)
    return jnp.concatenate([jnp.broadcast_to(ids_BL[:, :1], (B, mcfg.sensory_tokens + 1)), ids_BL, ids_BL[:, -1:],
                            tail_Bj, a_B1], axis=1)

  def setup(self):
    c, m = self.cfg, self.cfg.memory
    for name in ("sensory_tokens", "summary_tokens"):
      check(getattr(m, name) <= c.segment_len, f"model.memory.{name}", getattr(m, name),
            f"must be at most segment_len={c.segment_len}: they are tokens of one segment")
    init = nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("embed",))
    self.initial_D = self.param("initial", init, (c.d_model,), jnp.float32)  # P, as rmt's
    self.summary_D = self.param("summary", init, (c.d_model,), jnp.float32)  # Q
    self.write_norm = RMSNorm(c.norm_eps, jnp.float32)
    self.summary_norm = RMSNorm(c.norm_eps, jnp.float32)
    self.recall_q = dense(c.d_model, ("embed", "mlp"), "recall_q", jnp.float32)
    self.recall_k = dense(c.d_model, ("embed", "mlp"), "recall_k", jnp.float32)
    if m.eviction == "learned":
      self.scorer = dense(1, ("embed", None), "scorer", jnp.float32, use_bias=True)

  @staticmethod
  def layer_states(state) -> dict:
    """No part of hmt's state lives in layers (`run_layers` threads none)."""
    del state
    return {}

  def prefix(self, state):
    """x_BPD: what stands before a segment's tokens: [sensory ; P + recalled]."""
    return jnp.concatenate([state["sensory"], self._memory_token(state)], axis=1)

  def _memory_token(self, state):
    return (self.initial_D + state["recalled"])[:, None]

  def score(self, cache_BND):
    """The scorer's s [B, N] (learned eviction): how much recall attention each embedding will get."""
    return self.scorer(jax.lax.stop_gradient(cache_BND))[..., 0]

  def recall(self, q_BD, cache_BND, valid_BN):
    """-> (recalled_BD, a_BN): attention of the query over the valid cached embeddings (module docstring)."""
    q_BH = self.recall_q(q_BD)
    k_BNH = self.recall_k(cache_BND)
    logits_BN = jnp.einsum("bh,bnh->bn", q_BH, k_BNH) / jnp.sqrt(jnp.float32(q_BH.shape[-1]))
    a_BN = jnp.exp(masked_log_softmax(logits_BN, valid_BN)) * valid_BN
    return jnp.einsum("bn,bnd->bd", a_BN, cache_BND), a_BN

  def __call__(self, state, x_BLD, docs: Documents | None, run_layers):
    m = self.cfg.memory
    B, L, _ = x_BLD.shape
    read, write = state, state
    if docs is None:
      ids_BL, last_BL = jnp.zeros((B, L), jnp.int32), jnp.ones((B, L), bool)
    else:
      fresh = self.init_state(m, B)
      read = select_rows(~docs.read_BL[:, 0], fresh, state)
      write = select_rows(docs.reset_B, fresh, state)
      ids_BL, last_BL = docs.ids_BL, docs.write_BL
    ids_BX = self.extended_ids(m, ids_BL, last_BL)
    dt = x_BLD.dtype
    summary_BjD = x_BLD[:, L - m.summary_tokens:]
    x_BXD = jnp.concatenate([self.prefix(read).astype(dt), x_BLD, self._memory_token(write).astype(dt), summary_BjD,
                             jnp.broadcast_to(self.summary_D.astype(dt), (B, 1, x_BLD.shape[-1]))], axis=1)
    x_BXD = nn.with_logical_constraint(x_BXD, ("batch", "length", "embed"))
    y_BXD, _ = run_layers(x_BXD, Documents.make(ids_BX, ids_BX[:, 0]), {})  # the layers read the ids only
    P = self.prefix_len(m)
    m_BD = self.write_norm(y_BXD[:, P + L])
    q_BD = self.summary_norm(y_BXD[:, -1])

    learned = m.eviction == "learned"
    old = {k: write[k] for k in ("cache", "valid", "age")}
    score_BN = self.score(old["cache"]) if learned else None
    slot_B, full_B = eviction_slot(old["valid"], old["age"], score_BN, m.eviction)
    new = insert(old, m_BD, slot_B)
    recalled_BD, a_BN = self.recall(q_BD, new["cache"], new["valid"])
    sensory_BkD = (x_BLD[:, L - m.sensory_tokens:] * last_BL[:, L - m.sensory_tokens:, None]).astype(jnp.float32)
    new_state = {"sensory": sensory_BkD, "recalled": recalled_BD, **new}
    new_state = nn.with_logical_constraint(new_state, self.state_axes(m))

    evicted_BN = jax.nn.one_hot(slot_B, m.cache_size) * full_B[:, None]
    stats = {"evicted": evicted_BN, "evicted_age": (evicted_BN * old["age"]).sum(-1), "age": new["age"],
             "recall": a_BN}
    losses = {}
    if learned:
      logp_BN = masked_log_softmax(self.score(new["cache"]), new["valid"])
      ce_B = -(jax.lax.stop_gradient(a_BN) * jnp.where(new["valid"] > 0.5, logp_BN, 0.0)).sum(-1)
      losses["eviction"] = m.eviction_loss_weight * ce_B.mean()
    return y_BXD[:, P:P + L], new_state, stats, losses
