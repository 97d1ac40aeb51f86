"""The decoder with segment recurrence: LM2Model.

    logits_BTV, new_memory, aux = LM2Model(config.model).apply({"params": p}, tokens_BT, memory)

`tokens_BT` holds T = num_segments * segment_len tokens (or T <= segment_len: one segment). The decoder runs
segment by segment under `nn.scan`, carrying the memory state; inside a segment, ordinary causal attention. A
token reads only memory written by earlier segments, so the model is causal across segments too.

The memory state is a pytree whose arrays have a leading axis over the memory-bearing layers (`layers`), then
`batch`; its layout is the same whether layers are scanned or not. Gradients flow through the carried memory
within windows of `bptt_segments` segments: the memory entering segment s is cut from the graph when
s % bptt_segments == 0 (and always at s = 0, so memory passed in from a previous call is a constant).

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


class DecoderLayer(nn.Module):
  """Pre-norm Llama layer; the memory read is added beside self-attention, and the memory written after."""
  cfg: ModelConfig
  has_memory: bool

  @nn.compact
  def __call__(self, x_BLD, mem_state, cos_LE, sin_LE):
    c = self.cfg
    h_BLD = RMSNorm(c.norm_eps, c.dtype, name="attn_norm")(x_BLD)
    y_BLD = x_BLD + Attention(c, name="attn")(h_BLD, cos_LE, sin_LE)
    stats = None
    if self.has_memory:
      memory = memory_lib.module_class(c.memory)(c, name="memory")
      delta_BLD, stats = memory.read(mem_state, h_BLD)
      y_BLD = y_BLD + delta_BLD
      mem_state = memory.write(mem_state, h_BLD, stats)
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
  """Logical axis names of each memory array: ('layers', *the kind's state axes)."""
  if not cfg.memory_layers:
    return {}
  axes = memory_lib.module_class(cfg.memory).state_axes(cfg.memory)
  return jax.tree.map(lambda a: ("layers", *a), axes, is_leaf=lambda a: isinstance(a, tuple))


def _pin_memory(memory, cfg: ModelConfig):
  return nn.with_logical_constraint(memory, memory_axes(cfg))


class SegmentDecoder(nn.Module):
  """All decoder layers on one segment: (memory, segment index), x_BLD -> (memory', index + 1), (y_BLD, stats)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, x_BLD, cos_LE, sin_LE):
    c = self.cfg
    memory, seg = carry
    cut = (seg % c.bptt_segments == 0) if c.bptt_segments else (seg == 0)
    # The carried memory keeps its logical sharding through every segment (batch over data x fsdp).
    memory = _pin_memory(memory, c)
    memory = jax.tree.map(lambda m: jnp.where(cut, jax.lax.stop_gradient(m), m), memory)
    new_memory, stats = [], []
    for g in layer_groups(c):
      states = _take(memory, g.mem_start, g.mem_start + g.size) if g.has_memory else None
      if c.scan_layers:
        scanned = nn.scan(_layer_class(c, True), variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(0, nn.broadcast, nn.broadcast), length=g.size,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        x_BLD, (g_states, g_stats) = scanned(c, g.has_memory, name=g.scanned_name)(x_BLD, states, cos_LE, sin_LE)
      else:
        outs = []
        for i in range(g.start, g.stop):
          state = jax.tree.map(lambda a: a[i - g.start], states) if g.has_memory else None
          x_BLD, out = _layer_class(c, False)(c, g.has_memory, name=f"layer_{i}")(x_BLD, state, cos_LE, sin_LE)
          outs.append(out)
        g_states, g_stats = jax.tree.map(lambda *a: jnp.stack(a), *outs) if g.has_memory else (None, None)
      if g.has_memory:
        new_memory.append(g_states)
        stats.append(g_stats)
    return (_pin_memory(_concat(new_memory), c), seg + 1), (x_BLD, _concat(stats))


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
    """A fresh memory state: arrays [num_memory_layers, batch_size, ...]; {} for memory kind 'none'."""
    c = self.config
    if not c.memory_layers:
      return {}
    state = memory_lib.module_class(c.memory).init_state(c.memory, batch_size)
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (len(c.memory_layers), *a.shape)), state)

  def memory_axes(self) -> dict[str, tuple[str, ...]]:
    """Logical axis names of each memory array (same pytree structure as `init_memory`)."""
    return memory_axes(self.config)

  def _check_inputs(self, tokens_BT, memory):
    if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
      raise ConfigError(f"tokens: expected integer ids of shape [batch, length], got {tokens_BT.dtype} "
                        f"{tokens_BT.shape}")
    expected = jax.eval_shape(lambda: self.init_memory(tokens_BT.shape[0]))
    got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), memory)
    if jax.tree.structure(expected) != jax.tree.structure(got) or jax.tree.leaves(expected) != jax.tree.leaves(got):
      raise ConfigError(
          f"memory: the state does not match config.model.memory (kind={self.config.memory.kind!r}) and batch "
          f"{tokens_BT.shape[0]}: expected {expected}, got {got}. Make it with model.init_memory(batch_size).")

  @nn.compact
  def __call__(self, tokens_BT, memory=None):
    """tokens_BT int [B, T] -> (logits_BTV float32, new memory, aux).

    aux["memory_stats"]: the memory kind's read statistics averaged over segments (lm2: `read_mass`
    [num_memory_layers, B, num_slots]); aux["losses"]: the kind's auxiliary losses (scalars, may be empty).
    """
    c = self.config
    B, T = tokens_BT.shape
    if memory is None:
      memory = self.init_memory(B)
    self._check_inputs(tokens_BT, memory)
    S = c.num_segments(T)
    L = T // S

    embed = nn.Embed(c.vocab_size, c.d_model, dtype=c.dtype, param_dtype=jnp.float32, name="embed",
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD),
                                                                 ("vocab", "embed")))
    x_BTD = nn.with_logical_constraint(embed(tokens_BT), ("batch", "length", "embed"))
    x_SBLD = x_BTD.reshape(B, S, L, c.d_model).swapaxes(0, 1)
    cos_LE, sin_LE = rope_tables(c, jnp.arange(L))

    segments = nn.scan(SegmentDecoder, variable_broadcast="params", split_rngs={"params": False},
                       in_axes=(0, nn.broadcast, nn.broadcast), length=S)
    (memory, _), (y_SBLD, stats) = segments(c, name="decoder")((memory, jnp.int32(0)), x_SBLD, cos_LE, sin_LE)

    y_BTD = y_SBLD.swapaxes(0, 1).reshape(B, T, c.d_model)
    y_BTD = RMSNorm(c.norm_eps, c.dtype, name="final_norm")(y_BTD)
    if c.tie_embeddings:
      logits_BTV = embed.attend(y_BTD)
    else:
      logits_BTV = dense(c.vocab_size, ("embed", "vocab"), "lm_head", c.dtype)(y_BTD)
    logits_BTV = nn.with_logical_constraint(logits_BTV.astype(jnp.float32), ("batch", "length", "vocab"))
    aux = {"memory_stats": jax.tree.map(lambda a: a.mean(axis=0), stats), "losses": {}}
    return logits_BTV, memory, aux
