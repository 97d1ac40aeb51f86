"""The decoder with segment recurrence: LM2Model.

    logits_BTV, new_memory, aux = LM2Model(config.model).apply({"params": p}, tokens_BT, memory)

`tokens_BT` holds T = num_segments * segment_len tokens (or T <= segment_len: one segment). The decoder runs
segment by segment under `nn.scan`, carrying the memory state; inside a segment, ordinary causal attention. A
token reads only memory written by earlier segments, so the model is causal across segments too. (Memory kind
'none' carries nothing, so several of its segments run as one step, as more rows.)

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

A memory kind sits in layers or around the layer stack (DESIGN section 4, lm2_jax.model.memory.protocol). A
layer kind is called in each of its layers, `out, new_state = memory(state, h_BLD, docs)`, beside self-attention:
its residual is added to the stream and its extra keys/values are attended to; a kind that writes from the layer's
own output (memoryllm, `self_updates`) gets a second pass of the layer with its update prefix. A segment kind
(`rmt`: memory tokens) runs the layers itself: `y, new_state, stats, losses = memory(state, x_BLD, docs, run_layers)`;
one that also keeps a memory in layers (`armt`) passes its per-layer part to `run_layers`, and each of those
layers adds what it reads to the layer's input and writes it from the layer's output. The document rules are
shared (`Documents`); a segment kind applies them to its own tokens.

Cached decoding (`cache=` in `__call__`, `init_cache`, `extend`): the keys/values of the current segment are kept
per layer ({'k', 'v': [layers, B, C, kv_heads, head_dim]}, C = prefix + segment_len); new tokens are appended at
per-row positions and read the memory that entered the segment without writing it. The caller writes the memory
by running the full segment once it is complete (lm2_jax.sessions.decoding), exactly as the recurrence above.

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

import flax

from lm2_jax.model import memory as memory_lib
from lm2_jax.model.config import ConfigError, ModelConfig
from lm2_jax.model.layers import INIT_STD, MLP, Attention, RMSNorm, dense, rope_tables
from lm2_jax.model.memory.protocol import Documents, select_rows

FOLD_ROWS = 16  # rows of a scan step when memory kind 'none' runs segments together (LM2Model.__call__)
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


@flax.struct.dataclass
class LayerContext:
  """What every layer of a segment shares: rotary tables ([X, E], or [B, X, E] with a cache), the document
  masks (or None), with a cache the per-row position of the first new token in it, and a memory shared across
  layers as it entered the segment (`entering`, which every memory layer reads)."""
  cos: jax.Array
  sin: jax.Array
  docs: Documents | None = None
  cache_index_B: jax.Array | None = None
  entering: Any = None


class DecoderLayer(nn.Module):
  """Pre-norm Llama layer; a layer memory reads (and writes) beside self-attention.

  ((x_BLD, shared), (memory state, cache), ctx) -> ((y_BLD, shared'), (new state, stats, losses, new cache)).
  `shared` is the running state of a memory shared across layers (None otherwise), the per-layer state None
  then. With a cache the memory is read, not written."""
  cfg: ModelConfig
  has_memory: bool

  @nn.compact
  def __call__(self, carry, per_layer, ctx: LayerContext):
    c = self.cfg
    x_BLD, shared = carry
    mem_state, cache = per_layer
    memory = memory_lib.layer_class(c.memory)(c, name="memory") if self.has_memory else None
    around = getattr(memory, "around_layer", False)  # a segment kind's layer memory (armt)
    if around:
      x_BLD = x_BLD + memory.read(mem_state, x_BLD, ctx.docs)
    h_BLD = RMSNorm(c.norm_eps, c.dtype, name="attn_norm")(x_BLD)
    out = memory_lib.MemoryOut()
    if memory is not None and not around:
      if cache is not None:
        out = memory.read_only(mem_state if ctx.entering is None else ctx.entering, h_BLD)
      elif ctx.entering is None:
        out, mem_state = memory(mem_state, h_BLD, ctx.docs)
      else:
        out, shared = memory(ctx.entering, h_BLD, ctx.docs, write_state=shared)
      if memory.residual_before_attention:  # memory as a layer (titans 'mal'): attention reads its output
        x_BLD = x_BLD + out.residual_BLD
        h_BLD = RMSNorm(c.norm_eps, c.dtype, name="post_memory_norm")(x_BLD)
        out = out.replace(residual_BLD=None)
    ids_BL = None if ctx.docs is None else ctx.docs.ids_BL
    attn, mlp_norm, mlp = Attention(c, name="attn"), RMSNorm(c.norm_eps, c.dtype, name="mlp_norm"), MLP(c, name="mlp")

    def block(kv, residual_BLD, cache):
      attn_BLD, cache = attn(h_BLD, ctx.cos, ctx.sin, ids_BL, kv, cache, ctx.cache_index_B)
      y_BLD = x_BLD + attn_BLD
      if residual_BLD is not None:
        y_BLD = y_BLD + residual_BLD
      y_BLD = y_BLD + mlp(mlp_norm(y_BLD))
      return nn.with_logical_constraint(y_BLD.astype(c.dtype), ("batch", "length", "embed")), cache

    y_BLD, cache = block(out.kv, out.residual_BLD, cache)
    if self.has_memory and cache is None and getattr(memory, "self_updates", False):  # MemoryLLM: the layer writes its own memory
      update_BLD, _ = block(memory.update_prefix(mem_state, x_BLD.shape[1]), None, None)
      mem_state = memory.self_update(mem_state, update_BLD, ctx.docs)
    if around and cache is None:
      mem_state = memory.write(mem_state, y_BLD, ctx.docs)
    return (y_BLD, shared), (mem_state, out.stats, out.losses, cache)


def _layer_class(cfg: ModelConfig, scanned: bool):
  if cfg.remat_policy == "none":
    return DecoderLayer
  return nn.remat(DecoderLayer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not scanned)


def _take(tree, start, stop):
  return jax.tree.map(lambda a: a[start:stop], tree)


def _concat(trees):
  return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *trees) if trees else {}


def memory_axes(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
  """Logical axis names of each memory array: ('layers', *the kind's state axes) for a layer kind with a memory
  per layer, the kind's state axes for a segment kind or a memory shared across layers."""
  where = memory_lib.placement(cfg.memory)
  if where is None:
    return {}
  axes = memory_lib.module_class(cfg.memory).state_axes(cfg.memory)
  if not memory_lib.stacked(cfg.memory):
    return axes
  return jax.tree.map(lambda a: ("layers", *a), axes, is_leaf=lambda a: isinstance(a, tuple))


def positions(cfg: ModelConfig, L: int) -> jax.Array:
  """Rotary positions of what the layers process for a segment of L tokens (with a segment kind's tokens)."""
  if memory_lib.placement(cfg.memory) == "segment":
    return memory_lib.module_class(cfg.memory).positions(cfg.memory, L)
  return jnp.arange(L)


def prefix_len(cfg: ModelConfig) -> int:
  """How many positions stand before a segment's tokens in cached decoding (a segment kind's prefix)."""
  if memory_lib.placement(cfg.memory) != "segment":
    return 0
  return memory_lib.module_class(cfg.memory).prefix_len(cfg.memory)


def _pin_memory(memory, cfg: ModelConfig):
  return nn.with_logical_constraint(memory, memory_axes(cfg))


class SegmentDecoder(nn.Module):
  """All decoder layers on one segment.

  (memory, segment index, memory's document [B]), (x_BLD, ids_BL) -> (memory', index + 1, document'),
  (y_BLD, stats, losses). `ids_BL` is None when the rows are single documents.

  With `cache` (cached decoding, see LM2Model): x_BLD are new tokens at per-row positions `cache_index_B` of the
  current segment, or (cache_index_B None) a segment kind's prefix is written at the start of the cache; the
  memory is read, not written; the outputs are (y_BLD, new cache)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, inputs, cache=None, cache_index_B=None):
    c = self.cfg
    memory, seg, mem_doc_B = carry
    x_BLD, ids_BL = inputs
    kind = memory_lib.module_class(c.memory) if c.memory.kind != "none" else None
    segment_kind = kind(c, name="memory") if memory_lib.placement(c.memory) == "segment" else None
    if cache is not None:
      return carry, self._cached(memory, x_BLD, segment_kind, cache, cache_index_B)

    docs = None if ids_BL is None else Documents.make(ids_BL, mem_doc_B)
    cut = (seg % c.bptt_segments == 0) if c.bptt_segments else (seg == 0)
    # The carried memory keeps its logical sharding through every segment (batch over data x fsdp).
    memory = _pin_memory(memory, c)
    memory = jax.tree.map(lambda m: jnp.where(cut, jax.lax.stop_gradient(m), m), memory)
    cos, sin = rope_tables(c, positions(c, x_BLD.shape[1]))
    if segment_kind is not None:
      run = lambda x_BXD, docs, states: self._layers(x_BXD, states, LayerContext(cos, sin, docs))[:2]
      y_BLD, new_memory, stats, losses = segment_kind(memory, x_BLD, docs, run)
    elif kind is not None and not memory_lib.stacked(c.memory):  # shared across layers: all read what entered
      fresh = kind.init_state(c.memory, x_BLD.shape[0])
      running = memory if docs is None else select_rows(docs.reset_B, fresh, memory)  # written layer by layer
      ctx = LayerContext(cos, sin, docs, entering=memory)
      y_BLD, new_memory, stats, losses, _ = self._layers(x_BLD, {}, ctx, shared=running)
    else:
      y_BLD, new_memory, stats, losses, _ = self._layers(x_BLD, memory, LayerContext(cos, sin, docs))
    next_doc_B = mem_doc_B if ids_BL is None else ids_BL[:, -1]
    return (_pin_memory(new_memory, c), seg + 1, next_doc_B), (y_BLD, stats, losses)

  def _cached(self, memory, x_BLD, segment_kind, cache, cache_index_B):
    c = self.cfg
    P = prefix_len(c)
    if cache_index_B is None:  # the prefix, at the start of the cache
      x_BLD = segment_kind.prefix(memory).astype(c.dtype)
      cache_index_B = jnp.zeros((x_BLD.shape[0],), jnp.int32)
    else:
      cache_index_B = cache_index_B + P
    cos, sin = rope_tables(c, cache_index_B[:, None] + jnp.arange(x_BLD.shape[1]))
    stacked = memory_lib.stacked(c.memory)
    ctx = LayerContext(cos, sin, None, cache_index_B, entering=None if stacked or segment_kind else memory)
    states = segment_kind.layer_states(memory) if segment_kind else memory if stacked else {}
    y_BLD, _, _, _, cache = self._layers(x_BLD, states, ctx, cache)
    return y_BLD, cache

  def _layers(self, x_BLD, memory, ctx: LayerContext, cache=None, shared=None):
    """The layer groups on x_BLD -> (y_BLD, new memory, per-layer stats, per-layer losses, cache). `memory`:
    the per-layer states; `shared`: the running state of a memory shared across layers (then the new memory)."""
    c = self.cfg
    outs = {"memory": [], "stats": [], "losses": [], "cache": []}
    carry = (x_BLD, shared)
    for g in layer_groups(c):
      states = _take(memory, g.mem_start, g.mem_start + g.size) if g.has_memory else None
      g_cache = None if cache is None else _take(cache, g.start, g.stop)
      if c.scan_layers:
        scanned = nn.scan(_layer_class(c, True), variable_axes={"params": 0},
                          split_rngs={"params": True, "memory": True}, in_axes=(0, nn.broadcast), length=g.size,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        carry, (g_states, g_stats, g_losses, g_cache) = scanned(c, g.has_memory, name=g.scanned_name)(
            carry, (states, g_cache), ctx)
      else:
        per_layer = []
        for i in range(g.start, g.stop):
          one = lambda tree: None if tree is None else jax.tree.map(lambda a: a[i - g.start], tree)
          carry, out = _layer_class(c, False)(c, g.has_memory, name=f"layer_{i}")(
              carry, (one(states), one(g_cache)), ctx)
          per_layer.append(out)
        g_states, g_stats, g_losses, g_cache = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
      if g.has_memory:
        outs["memory"].append(g_states)
        outs["stats"].append(g_stats)
        outs["losses"].append(g_losses)
      outs["cache"].append(g_cache)
    new_cache = None if cache is None else _concat(outs["cache"])
    x_BLD, shared = carry
    new_memory = _concat(outs["memory"]) if shared is None else shared
    return x_BLD, new_memory, _concat(outs["stats"]), _concat(outs["losses"]), new_cache


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
    """A fresh memory state: arrays [num_memory_layers, batch_size, ...] ([batch_size, ...] for a segment kind:
    rmt's {'tokens': zeros [batch_size, num_slots, d_model]}, which the model reads as its learned initial
    memory); {} for memory kind 'none'."""
    c = self.config
    if memory_lib.placement(c.memory) is None:
      return {}
    state = memory_lib.module_class(c.memory).init_state(c.memory, batch_size)
    if not memory_lib.stacked(c.memory):
      return state
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (len(c.memory_layers), *a.shape)), state)

  def memory_axes(self) -> dict[str, tuple[str, ...]]:
    """Logical axis names of each memory array (same pytree structure as `init_memory`)."""
    return memory_axes(self.config)

  def reset_memory(self, memory, rows_B):
    """The memory with the rows where `rows_B` (bool [B]) is set replaced by a fresh memory."""
    return self.select_memory(rows_B, self.init_memory(rows_B.shape[0]), memory)

  def select_memory(self, rows_B, a, b):
    """Per batch row: memory `a` where rows_B (bool [B]), else `b`."""
    batch_axis = 1 if memory_lib.stacked(self.config.memory) else 0
    return select_rows(rows_B, a, b, batch_axis=batch_axis)

  def empty_cache(self, batch_size: int) -> dict[str, jax.Array]:
    """An all-zero cache {'k', 'v': [num_layers, B, prefix + segment_len, kv_heads, head_dim]} (model dtype)."""
    c = self.config
    shape = (c.num_layers, batch_size, prefix_len(c) + c.segment_len, c.num_kv_heads, c.head_dim)
    return {"k": jnp.zeros(shape, c.dtype), "v": jnp.zeros(shape, c.dtype)}

  def init_cache(self, memory, batch_size: int):
    """The cache at the start of a segment: empty, or holding a segment kind's prefix (rmt's read tokens)."""
    cache = self.empty_cache(batch_size)
    if memory_lib.placement(self.config.memory) != "segment":
      return cache
    tokens = jnp.zeros((batch_size, 0), jnp.int32)
    return self(tokens, memory, cache=cache, cache_index=None)[2]["cache"]

  def extend(self, tokens_BL, memory, cache, cache_index_B):
    """Cached decoding: -> (logits_BLV float32, cache'). Row b's L tokens stand at positions cache_index_B[b] ..
    + L - 1 of the current segment (they must fit in it), after the tokens in `cache`, and read `memory`, the
    memory that entered the segment."""
    logits, _, aux = self(tokens_BL, memory, cache=cache, cache_index=cache_index_B)
    return logits, aux["cache"]

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
  def __call__(self, tokens_BT, memory=None, segment_ids=None, *, memory_document=None, cache=None,
               cache_index=None):
    """tokens_BT int [B, T] -> (logits_BTV float32, new memory, aux).

    segment_ids: optional int [B, T] document id of each token (packed rows); attention and memory stay
    within a document (module docstring). memory_document: optional int [B], the document `memory` belongs to
    (default: the first token's), so that a row continued from the middle of a longer one (the trainer's
    windows) reads and writes exactly as the longer row would.

    aux["memory_stats"]: the memory kind's statistics averaged over segments (lm2: `read_mass`
    [num_memory_layers, B, num_slots], the gates' `in_gate`, `forget_gate` [num_memory_layers, B] and
    `write_strength` [num_memory_layers, B, segment_len]; rmt: none); aux["losses"]: the kind's auxiliary losses
    (weighted scalars, may be empty), averaged over segments and layers.

    With `cache` (cached decoding; use `extend` and `init_cache`): tokens_BT are new tokens of the current
    segment at per-row positions `cache_index` [B]; the memory is returned unchanged and aux is {'cache': the
    updated cache}.
    """
    c = self.config
    B, T = tokens_BT.shape
    if memory is None:
      memory = self.init_memory(B)
    embed = nn.Embed(c.vocab_size, c.d_model, dtype=c.dtype, param_dtype=jnp.float32, name="embed",
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD),
                                                                 ("vocab", "embed")))
    if cache is not None:
      decoder = SegmentDecoder(c, name="decoder")
      _, (y_BTD, cache) = decoder((memory, jnp.int32(0), jnp.zeros((B,), jnp.int32)), (embed(tokens_BT), None),
                                  cache=cache, cache_index_B=cache_index)
      return self._logits(embed, y_BTD), memory, {"cache": cache}

    self._check_inputs(tokens_BT, memory, segment_ids)
    S = c.num_segments(T)
    L = T // S
    x_BTD = nn.with_logical_constraint(embed(tokens_BT), ("batch", "length", "embed"))
    ids_BT = None if segment_ids is None else segment_ids.astype(jnp.int32)
    # Segment by segment over [S, B, L]. Without memory the segments are independent: G of them at a time, as
    # B * G rows (the same attention, positions and weights; larger matmuls, fewer scan steps), G the largest
    # divisor of S with B * G <= FOLD_ROWS (rows b-major within a step, so batch sharding is unchanged).
    G = max(g for g in range(1, S + 1) if S % g == 0 and B * g <= max(B, FOLD_ROWS)) if c.memory.kind == "none" else 1
    split = lambda a: a.reshape(B, S // G, G * L, *a.shape[2:]).swapaxes(0, 1).reshape(S // G, B * G, L, *a.shape[2:])
    x_SBLD = split(x_BTD)
    ids_SBL = None if ids_BT is None else split(ids_BT)
    mem_doc_B = jnp.zeros(B * G, jnp.int32) if ids_BT is None else ids_SBL[0, :, 0]
    if memory_document is not None and ids_BT is not None and G == 1:  # G > 1 only without memory
      mem_doc_B = memory_document.astype(jnp.int32)

    segments = nn.scan(SegmentDecoder, variable_broadcast="params", split_rngs={"params": False, "memory": True},
                       in_axes=0, length=S // G, unroll=min(S // G, c.segment_unroll))
    (memory, _, _), (y_SBLD, stats, losses) = segments(c, name="decoder")(
        (memory, jnp.int32(0), mem_doc_B), (x_SBLD, ids_SBL))

    y_BTD = y_SBLD.reshape(S // G, B, G * L, c.d_model).swapaxes(0, 1).reshape(B, T, c.d_model)
    aux = {"memory_stats": jax.tree.map(lambda a: a.mean(axis=0), stats),  # [segments, memory layers, B, ...]
           "losses": {k: v.mean() for k, v in sorted(losses.items())}}
    return self._logits(embed, y_BTD), memory, aux

  def _logits(self, embed, y_BTD):
    c = self.config
    y_BTD = RMSNorm(c.norm_eps, c.dtype, name="final_norm")(y_BTD)
    if c.tie_embeddings:
      logits_BTV = embed.attend(y_BTD)
    else:
      logits_BTV = dense(c.vocab_size, ("embed", "vocab"), "lm_head", c.dtype)(y_BTD)
    return nn.with_logical_constraint(logits_BTV.astype(jnp.float32), ("batch", "length", "vocab"))
