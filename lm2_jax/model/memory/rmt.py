"""Recurrent Memory Transformer memory (Bulatov et al. 2022, arXiv 2207.06881): memory tokens that the decoder
itself reads and writes.

A model-level kind: instead of living in layers (`memory.layers` does not apply), it wraps the whole layer stack.
Letters: B batch, L positions in the segment, D d_model, M memory tokens (num_slots), X = M + L + M.

state     S = {'tokens': [B, M, D]}, zeros in a fresh state (`init_state`).
memory    the memory tokens of a segment are  P + S,  with P [M, D] a learned parameter (`initial`): a fresh
          memory (S = 0) is the learned P, which in every later segment also tells the slots apart, as a
          position embedding would.
segment   the layers process  [read ; segment ; write]  (X positions) with ordinary causal self-attention and
          rotary positions 0 .. X-1 (read 0..M-1, segment M..M+L-1, write M+L..X-1). Read and write tokens both
          start from the memory P + S, as in RMT's reference code.
write     S' = RMSNorm(y at the write positions), the last layer's outputs normalised by the memory's own norm
          (`write_norm`; the model's final norm sees the segment outputs only, which alone get logits). Without
          it the residual path would add P + S to itself segment after segment; RMT's reference takes the
          final-normed hidden states for the same reason.

Causality: a segment token sees the read tokens (memory written by earlier segments) and the tokens before it;
the write tokens sit after the segment, so what a segment writes is read by later segments only. The decoder
truncates gradients through the carried state S (`bptt_segments`) as for every memory kind; P is a parameter
that every segment uses, not carried state.

Documents (lm2_jax.model.decoder): every position gets a document id (`extended_ids`) and attention stays within
a document. The read tokens belong to the segment's first document and hold the carried memory if that
document owns it, a fresh one if it starts at this segment; the write tokens belong to the segment's last
document and start from the carried memory if it owns it, from a fresh one otherwise, so they write from that
document only (and from the read tokens when those are its memory). A document that starts inside a segment
(not its first) reads no memory in that segment: a fresh one would take a second copy of the memory tokens in
every segment. From its next segment on it reads the memory it wrote.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm2_jax.model.config import ModelConfig, as_dict, check, positive_int
from lm2_jax.model.layers import INIT_STD, RMSNorm
from lm2_jax.model.memory import register
from lm2_jax.model.memory.protocol import Documents, select_rows


@dataclasses.dataclass(frozen=True)
class RMTMemoryConfig:
  kind: str
  layers: tuple[int, ...]  # always (): no layer holds a per-layer memory; the memory tokens pass through all
  num_slots: int           # M, memory tokens read (and written) per segment
  slot_dim: int            # D = d_model: memory tokens live in the residual stream (config slot_dim is not read)

  @classmethod
  def parse(cls, cfg: Any, *, num_layers: int, d_model: int) -> "RMTMemoryConfig":
    del num_layers
    v = as_dict(cfg, "model.memory")
    check("num_slots" in v, "model.memory.num_slots", None, f"required for memory kind {v['kind']!r}")
    layers = v.get("layers", "all")
    check(layers == "all", "model.memory.layers", layers,
          "memory kind 'rmt' is model-level: its memory tokens pass through every layer, so per-layer placement "
          "does not apply; set model.memory.layers='all'")
    return cls(kind=v["kind"], layers=(), num_slots=positive_int(v, "num_slots", "model.memory"), slot_dim=d_model)


@register("rmt")
class RMTMemory(nn.Module):
  """Segment memory: `__call__(state, x_BLD, docs, run_layers) -> (y_BLD, new_state, stats, losses)` runs the layers on
  `wrap`'s [read ; segment ; write] and takes the new state from `unwrap`; cached decoding puts `prefix` (the read
  tokens) before the segment."""
  cfg: ModelConfig

  Config = RMTMemoryConfig
  placement = "segment"

  @staticmethod
  def init_state(mcfg: RMTMemoryConfig, batch: int) -> dict[str, jax.Array]:
    return {"tokens": jnp.zeros((batch, mcfg.num_slots, mcfg.slot_dim), jnp.float32)}

  @staticmethod
  def state_axes(mcfg: RMTMemoryConfig) -> dict[str, tuple[str, ...]]:
    return {"tokens": ("batch", "mem_slots", "embed")}

  @staticmethod
  def positions(mcfg: RMTMemoryConfig, L: int) -> jax.Array:
    """Rotary positions [X] of [read ; segment ; write]: 0 .. M + L + M - 1."""
    return jnp.arange(2 * mcfg.num_slots + L)

  @staticmethod
  def prefix_len(mcfg: RMTMemoryConfig) -> int:
    """Positions before a segment's tokens in cached decoding: the M read tokens."""
    return mcfg.num_slots

  @staticmethod
  def extended_ids(mcfg: RMTMemoryConfig, ids_BL):
    """Document ids [B, X] of [read ; segment ; write]: the segment's first document, the tokens' own, the
    segment's last document."""
    shape = (ids_BL.shape[0], mcfg.num_slots)
    return jnp.concatenate([jnp.broadcast_to(ids_BL[:, :1], shape), ids_BL, jnp.broadcast_to(ids_BL[:, -1:], shape)],
                           axis=1)

  def setup(self):
    c = self.cfg
    # Initialised like the token embeddings (as RMT's reference code does).
    self.initial_MD = self.param("initial", nn.with_logical_partitioning(nn.initializers.normal(INIT_STD),
                                                                        ("mem_slots", "embed")),
                                 (c.memory.num_slots, c.d_model), jnp.float32)
    self.write_norm = RMSNorm(c.norm_eps, jnp.float32)

  @staticmethod
  def layer_states(state) -> dict:
    """The part of the state that lives in layers, [layers, B, ...] (what `run_layers` threads through the
    memory layers of `config.memory.layers`): none for rmt."""
    del state
    return {}

  def __call__(self, state, x_BLD, docs: Documents | None, run_layers):
    """The document rules (module docstring): the read tokens hold a fresh memory where the segment's first
    document is not the memory's, the write tokens where its last one is not."""
    x_BXD, docs_X = self.enter(state, x_BLD, docs)
    y_BXD, _ = run_layers(x_BXD, docs_X, {})
    y_BLD, new_state = self.unwrap(y_BXD)
    return y_BLD, new_state, {}, {}

  def enter(self, state, x_BLD, docs: Documents | None):
    """-> (x_BXD = `wrap` of the read and write memories under the document rules, the documents of the X
    positions or None)."""
    if docs is None:
      return self.wrap(state, state, x_BLD), None
    fresh = self.init_state(self.cfg.memory, x_BLD.shape[0])
    read = select_rows(~docs.read_BL[:, 0], fresh, state)
    write = select_rows(docs.reset_B, fresh, state)
    return self.wrap(read, write, x_BLD), self.extended_docs(docs)

  def extended_docs(self, docs: Documents) -> Documents:
    """The documents of [read ; segment ; write]: the read tokens are the segment's first document's (the
    memory's when its first token's is), the write tokens its last document's (the memory's unless it is new)."""
    B, M = docs.ids_BL.shape[0], self.cfg.memory.num_slots
    ends = lambda first_B1, last_B1: lambda a_BL: jnp.concatenate(
        [jnp.broadcast_to(first_B1, (B, M)), a_BL, jnp.broadcast_to(last_B1, (B, M))], axis=1)
    read = ends(docs.read_BL[:, :1], ~docs.reset_B[:, None])(docs.read_BL)
    write = ends(docs.write_BL[:, :1], jnp.ones((B, 1), bool))(docs.write_BL)
    return Documents(self.extended_ids(self.cfg.memory, docs.ids_BL), read, write, docs.reset_B)

  def prefix(self, state):
    """x_BMD: what stands before a segment's tokens (positions 0..M-1): the read tokens P + S."""
    return self.initial_MD[None] + state["tokens"]

  def wrap(self, read_state, write_state, x_BLD):
    """-> x_BXD = [P + S_read ; x ; P + S_write]: the read tokens hold `read_state`, the write tokens start from
    `write_state` (both the carried state, or a fresh one for rows where a document starts)."""
    memory_BMD = lambda state: self.prefix(state).astype(x_BLD.dtype)
    x_BXD = jnp.concatenate([memory_BMD(read_state), x_BLD, memory_BMD(write_state)], axis=1)
    return nn.with_logical_constraint(x_BXD, ("batch", "length", "embed"))

  def unwrap(self, y_BXD):
    """-> (the segment's outputs y_BLD, the new state {'tokens': RMSNorm(outputs at the write positions)})."""
    M = self.cfg.memory.num_slots
    tokens_BMD = nn.with_logical_constraint(self.write_norm(y_BXD[:, -M:]), self.state_axes(self.cfg.memory)["tokens"])
    return y_BXD[:, M:-M], {"tokens": tokens_BMD}
