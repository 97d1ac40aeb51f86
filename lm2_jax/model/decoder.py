"""The decoder with segment recurrence: LM2Model.

    logits_BTV, new_memory, aux = LM2Model(config.model).apply({"params": p}, tokens_BT, memory)

`tokens_BT` holds T = num_segments * segment_len tokens (or T <= segment_len: one segment). The decoder runs
segment by segment under `nn.scan`, carrying the memory state; inside a segment, ordinary causal attention. A
token reads only memory written by earlier segments, so the model is causal across segments too.

The memory state is a pytree whose arrays have a leading axis over the memory-bearing layers (`layers`), then
`batch`; its layout is the same whether layers are scanned or not. Gradients flow through the carried memory
within windows of `bptt_segments` segments: the memory entering segment s is cut from the graph when
s % bptt_segments == 0 (and always at s = 0, so memory passed in from a previous call is a constant).

Documents: with `segment_ids` (a document id per token, as packed batches carry them), attention never crosses a
document boundary and neither does memory. The memory entering a segment belongs to the document of the token
just before the segment (for the first segment: the document of the first token; the caller passes a fresh
memory, `reset_memory`, for rows that start a new document). Tokens of that document read it; tokens of a
document that starts inside the segment read a fresh memory instead. After the segment, the memory is written
from the tokens of the segment's last document only, starting from a fresh memory if that document is new.

A model-level memory kind (`rmt`: memory tokens) is not placed in layers: the layers run on the segment with
its memory tokens around it (`[read ; segment ; write]`, lm2_jax.model.memory.rmt), whose outputs at the write
positions are the next memory. The document rules are the same, except that a document starting inside a
segment (not its first) reads no memory there (the memory tokens are the first document's).

Layers: consecutive layers of the same kind (with or without memory) form a group; with `scan_layers` each group
is one `nn.scan` over a stacked `layers` axis (params `decoder/layers_{start}_{stop}`), otherwise each layer
has its own params (`decoder/layer_{i}`). `lm2_jax.model.layout` converts between the two.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm2_jax.model import memory as memory_lib
from lm2_jax.model.config import ConfigError, ModelConfig
from lm2_jax.model.layers import INIT_STD, MLP, Attention, RMSNorm, dense, rope_tables

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class LayerGroup:
  """Layers [start, stop), all with or all without memory; their memory state is [mem_start, mem_start+size)."""
  start: int
  stop: int
  has_memory: bool
  mem_start: int

  @property
  def size(self) -> int:
    return self.stop - self.start

  @property
  def scanned_name(self) -> str:
    return f"layers_{self.start}_{self.stop}"


def layer_groups(cfg: ModelConfig) -> list[LayerGroup]:
  mem = set(cfg.memory_layers)
  groups, start, mem_start = [], 0, 0
  for i in range(1, cfg.num_layers + 1):
    if i == cfg.num_layers or ((i in mem) != (start in mem)):
      groups.append(LayerGroup(start, i, start in mem, mem_start))
      mem_start += (i - start) if start in mem else 0
      start = i
  return groups


def document_masks(ids_BL, mem_doc_B):
  """Masks of one segment from its document ids [B, L] and the document that owns the entering memory [B].

  attn_B1LL: query and key in the same document (causality is added by the attention);
  read_BL:   tokens of the memory's document, which read the carried memory (the others read a fresh one);
  write_BL:  tokens of the segment's last document, the only ones written into the memory;
  reset_B:   the last document is not the memory's, so the write starts from a fresh memory.
  """
  last_B = ids_BL[:, -1]
  return {"attn_B1LL": (ids_BL[:, :, None] == ids_BL[:, None, :])[:, None],
          "read_BL": ids_BL == mem_doc_B[:, None],
          "write_BL": ids_BL == last_B[:, None],
          "reset_B": last_B != mem_doc_B}


def select_rows(rows_B, a, b, batch_axis: int = 0):
  """Per batch row: a where rows_B, else b (pytrees of arrays with a batch axis at `batch_axis`)."""
  def one(x, y):
    shape = [1] * x.ndim
    shape[batch_axis] = -1
    return jnp.where(rows_B.reshape(shape), x, y)
  return jax.tree.map(one, a, b)


class DecoderLayer(nn.Module):
  """Pre-norm Llama layer; the memory read is added beside self-attention, and the memory written after.

  `docs` is None (one document per row) or the segment's `document_masks`."""
  cfg: ModelConfig
  has_memory: bool

  @nn.compact
  def __call__(self, x_BLD, mem_state, cos_LE, sin_LE, docs):
    c = self.cfg
    h_BLD = RMSNorm(c.norm_eps, c.dtype, name="attn_norm")(x_BLD)
    attn_mask = None if docs is None else docs["attn_B1LL"]
    y_BLD = x_BLD + Attention(c, name="attn")(h_BLD, cos_LE, sin_LE, attn_mask)
    stats = None
    if self.has_memory:
      kind = memory_lib.module_class(c.memory)
      memory = kind(c, name="memory")
      if docs is None:
        delta_BLD, stats = memory.read(mem_state, h_BLD)
        mem_state = memory.write(mem_state, h_BLD, stats)
      else:
        fresh = kind.init_state(c.memory, x_BLD.shape[0])
        read_BL, reset_B = docs["read_BL"], docs["reset_B"]
        delta_BLD, stats = memory.read(mem_state, h_BLD, read_BL)
        fresh_delta_BLD, fresh_stats = memory.read(fresh, h_BLD, ~read_BL)
        delta_BLD = jnp.where(read_BL[..., None], delta_BLD, fresh_delta_BLD)
        mem_state = memory.write(select_rows(reset_B, fresh, mem_state), h_BLD,
                                 select_rows(reset_B, fresh_stats, stats), docs["write_BL"])
      y_BLD = y_BLD + delta_BLD
    y_BLD = y_BLD + MLP(c, name="mlp")(RMSNorm(c.norm_eps, c.dtype, name="mlp_norm")(y_BLD))
    y_BLD = nn.with_logical_constraint(y_BLD.astype(c.dtype), ("batch", "length", "embed"))
    return y_BLD, (mem_state, stats)


def _layer_class(cfg: ModelConfig, scanned: bool):
  if cfg.remat_policy == "none":
    return DecoderLayer
  return nn.remat(DecoderLayer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not scanned)


def _take(tree, start, stop):
  return jax.tree.map(lambda a: a[start:stop], tree)


def _concat(trees):
  return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *trees) if trees else {}


def memory_axes(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
  """Logical axis names of each memory array: ('layers', *the kind's state axes), or the kind's state axes for a
  model-level kind."""
  if cfg.memory.kind == "none":
    return {}
  axes = memory_lib.module_class(cfg.memory).state_axes(cfg.memory)
  if memory_lib.is_model_level(cfg.memory):
    return axes
  return jax.tree.map(lambda a: ("layers", *a), axes, is_leaf=lambda a: isinstance(a, tuple))


def positions(cfg: ModelConfig, L: int) -> jax.Array:
  """Rotary positions of what the layers process for a segment of L tokens (with a model-level memory's tokens)."""
  if memory_lib.is_model_level(cfg.memory):
    return memory_lib.module_class(cfg.memory).positions(cfg.memory, L)
  return jnp.arange(L)


def _pin_memory(memory, cfg: ModelConfig):
  return nn.with_logical_constraint(memory, memory_axes(cfg))


class SegmentDecoder(nn.Module):
  """All decoder layers on one segment.

  (memory, segment index, memory's document [B]), (x_BLD, ids_BL) -> (memory', index + 1, document'),
  (y_BLD, stats). `ids_BL` is None when the rows are single documents. `cos_XE`, `sin_XE`: rotary tables of the
  positions the layers process (`positions`)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, inputs, cos_XE, sin_XE):
    c = self.cfg
    memory, seg, mem_doc_B = carry
    x_BLD, ids_BL = inputs
    docs = None if ids_BL is None else document_masks(ids_BL, mem_doc_B)
    cut = (seg % c.bptt_segments == 0) if c.bptt_segments else (seg == 0)
    # The carried memory keeps its logical sharding through every segment (batch over data x fsdp).
    memory = _pin_memory(memory, c)
    memory = jax.tree.map(lambda m: jnp.where(cut, jax.lax.stop_gradient(m), m), memory)
    if memory_lib.is_model_level(c.memory):
      y_BLD, new_memory = self._with_memory_tokens(memory, x_BLD, ids_BL, mem_doc_B, docs, cos_XE, sin_XE)
      stats = {}
    else:
      y_BLD, new_memory, stats = self._layers(x_BLD, memory, cos_XE, sin_XE, docs)
    next_doc_B = mem_doc_B if ids_BL is None else ids_BL[:, -1]
    return (_pin_memory(new_memory, c), seg + 1, next_doc_B), (y_BLD, stats)

  def _layers(self, x_BLD, memory, cos_LE, sin_LE, docs):
    """The layer groups on x_BLD -> (y_BLD, new per-layer memory, per-layer read statistics)."""
    c = self.cfg
    new_memory, stats = [], []
    for g in layer_groups(c):
      states = _take(memory, g.mem_start, g.mem_start + g.size) if g.has_memory else None
      if c.scan_layers:
        scanned = nn.scan(_layer_class(c, True), variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=g.size,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        x_BLD, (g_states, g_stats) = scanned(c, g.has_memory, name=g.scanned_name)(x_BLD, states, cos_LE, sin_LE,
                                                                                    docs)
      else:
        outs = []
        for i in range(g.start, g.stop):
          state = jax.tree.map(lambda a: a[i - g.start], states) if g.has_memory else None
          x_BLD, out = _layer_class(c, False)(c, g.has_memory, name=f"layer_{i}")(x_BLD, state, cos_LE, sin_LE,
                                                                                   docs)
          outs.append(out)
        g_states, g_stats = jax.tree.map(lambda *a: jnp.stack(a), *outs) if g.has_memory else (None, None)
      if g.has_memory:
        new_memory.append(g_states)
        stats.append(g_stats)
    return x_BLD, _concat(new_memory), _concat(stats)

  def _with_memory_tokens(self, memory, x_BLD, ids_BL, mem_doc_B, docs, cos_XE, sin_XE):
    """Model-level memory: the layers run on [read ; segment ; write] -> (y_BLD, new memory).

    With documents, the read tokens belong to the segment's first document and the write tokens to its last:
    each holds the carried memory where its document owns it (`docs`), a fresh one where the document is new;
    attention then follows the document ids of all X positions."""
    c = self.cfg
    kind = memory_lib.module_class(c.memory)
    read, write = memory, memory
    if docs is not None:
      fresh = kind.init_state(c.memory, x_BLD.shape[0])
      read = select_rows(~docs["read_BL"][:, 0], fresh, memory)  # the first document is not the memory's
      write = select_rows(docs["reset_B"], fresh, memory)
      docs = document_masks(kind.extended_ids(c.memory, ids_BL), mem_doc_B)
    tokens = kind(c, name="memory")
    y_BXD, _, _ = self._layers(tokens.wrap(read, write, x_BLD), {}, cos_XE, sin_XE, docs)
    return tokens.unwrap(y_BXD)


class LM2Model(nn.Module):
  """Llama-3-style decoder with segment recurrence and an optional memory (DESIGN sections 3-4).

  Attributes:
    config: `config.model` (ConfigDict or mapping) or a ModelConfig; validated on construction.
  """
  config: Any

  def __post_init__(self):
    object.__setattr__(self, "config", ModelConfig.from_config(self.config))
    super().__post_init__()

  def init_memory(self, batch_size: int) -> dict[str, jax.Array]:
    """A fresh memory state: arrays [num_memory_layers, batch_size, ...] ([batch_size, ...] for a model-level
    kind: rmt's {'tokens': zeros [batch_size, num_slots, d_model]}, which the model reads as its learned initial
    memory); {} for memory kind 'none'."""
    c = self.config
    if c.memory.kind == "none":
      return {}
    state = memory_lib.module_class(c.memory).init_state(c.memory, batch_size)
    if memory_lib.is_model_level(c.memory):
      return state
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (len(c.memory_layers), *a.shape)), state)

  def memory_axes(self) -> dict[str, tuple[str, ...]]:
    """Logical axis names of each memory array (same pytree structure as `init_memory`)."""
    return memory_axes(self.config)

  def reset_memory(self, memory, rows_B):
    """The memory with the rows where `rows_B` (bool [B]) is set replaced by a fresh memory."""
    c = self.config
    if c.memory.kind == "none":
      return memory
    batch_axis = 0 if memory_lib.is_model_level(c.memory) else 1
    return select_rows(rows_B, self.init_memory(rows_B.shape[0]), memory, batch_axis=batch_axis)

  def _check_inputs(self, tokens_BT, memory, segment_ids_BT):
    if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
      raise ConfigError(f"tokens: expected integer ids of shape [batch, length], got {tokens_BT.dtype} "
                        f"{tokens_BT.shape}")
    if segment_ids_BT is not None and (segment_ids_BT.shape != tokens_BT.shape
                                       or not jnp.issubdtype(segment_ids_BT.dtype, jnp.integer)):
      raise ConfigError(f"segment_ids: expected integer document ids of the tokens' shape {tokens_BT.shape}, got "
                        f"{segment_ids_BT.dtype} {segment_ids_BT.shape}")
    expected = jax.eval_shape(lambda: self.init_memory(tokens_BT.shape[0]))
    got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), memory)
    if jax.tree.structure(expected) != jax.tree.structure(got) or jax.tree.leaves(expected) != jax.tree.leaves(got):
      raise ConfigError(
          f"memory: the state does not match config.model.memory (kind={self.config.memory.kind!r}) and batch "
          f"{tokens_BT.shape[0]}: expected {expected}, got {got}. Make it with model.init_memory(batch_size).")

  @nn.compact
  def __call__(self, tokens_BT, memory=None, segment_ids=None):
    """tokens_BT int [B, T] -> (logits_BTV float32, new memory, aux).

    segment_ids: optional int [B, T] document id of each token (packed rows); attention and memory stay
    within a document (module docstring).

    aux["memory_stats"]: the memory kind's read statistics averaged over segments (lm2: `read_mass`
    [num_memory_layers, B, num_slots]; rmt: none); aux["losses"]: the kind's auxiliary losses (scalars, may be
    empty): a kind returns them among its read statistics as `loss_<name>` [B], already weighted; they are
    averaged here.
    """
    c = self.config
    B, T = tokens_BT.shape
    if memory is None:
      memory = self.init_memory(B)
    self._check_inputs(tokens_BT, memory, segment_ids)
    S = c.num_segments(T)
    L = T // S

    embed = nn.Embed(c.vocab_size, c.d_model, dtype=c.dtype, param_dtype=jnp.float32, name="embed",
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD),
                                                                 ("vocab", "embed")))
    x_BTD = nn.with_logical_constraint(embed(tokens_BT), ("batch", "length", "embed"))
    x_SBLD = x_BTD.reshape(B, S, L, c.d_model).swapaxes(0, 1)
    ids_BT = None if segment_ids is None else segment_ids.astype(jnp.int32)
    ids_SBL = None if ids_BT is None else ids_BT.reshape(B, S, L).swapaxes(0, 1)
    mem_doc_B = jnp.zeros((B,), jnp.int32) if ids_BT is None else ids_BT[:, 0]
    cos_XE, sin_XE = rope_tables(c, positions(c, L))

    segments = nn.scan(SegmentDecoder, variable_broadcast="params", split_rngs={"params": False},
                       in_axes=(0, nn.broadcast, nn.broadcast), length=S)
    (memory, _, _), (y_SBLD, stats) = segments(c, name="decoder")(
        (memory, jnp.int32(0), mem_doc_B), (x_SBLD, ids_SBL), cos_XE, sin_XE)

    y_BTD = y_SBLD.swapaxes(0, 1).reshape(B, T, c.d_model)
    y_BTD = RMSNorm(c.norm_eps, c.dtype, name="final_norm")(y_BTD)
    if c.tie_embeddings:
      logits_BTV = embed.attend(y_BTD)
    else:
      logits_BTV = dense(c.vocab_size, ("embed", "vocab"), "lm_head", c.dtype)(y_BTD)
    logits_BTV = nn.with_logical_constraint(logits_BTV.astype(jnp.float32), ("batch", "length", "vocab"))
    stats = dict(stats)  # [segments, memory layers, B, ...] each; entries named loss_* are auxiliary losses
    losses = {k.removeprefix("loss_"): stats.pop(k).mean() for k in sorted(stats) if k.startswith("loss_")}
    aux = {"memory_stats": jax.tree.map(lambda a: a.mean(axis=0), stats), "losses": losses}
    return logits_BTV, memory, aux
