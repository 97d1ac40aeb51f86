"""The memory protocol (DESIGN section 4): what a memory kind returns, and the document rules every kind shares.

Layer memory (lm2, hierarchical, ...), one call per segment and layer, read and write together:

    out, new_state = memory(state, h_BLD, docs)

    out.residual_BLD  [B, L, D] added to the residual stream beside self-attention, or None
    out.kv            `ExtraKV`: keys/values that self-attention attends to beside the segment's own, or None
    out.stats         read statistics (dict of arrays with a leading batch axis), e.g. read mass per slot
    out.losses        auxiliary losses: weighted scalars the trainer adds to the loss

A kind implements `step(state, h_BLD, read_BL, write_BL) -> (out, new_state)`: the tokens of `read_BL` read
`state` (the others' residual is ignored), the tokens of `write_BL` are folded into it (None: all tokens).
`LayerMemory.__call__` adds the document rules on top, the same for every kind (`with_documents`).

Segment memory (rmt, ...) wraps the layer stack for one segment:

    y_BLD, new_state, stats, losses = memory(state, x_BLD, docs, run_layers)
    # run_layers(x_BXD, docs_X, layer_states) -> (y_BXD, new layer_states)

and for cached decoding says which tokens stand before the segment's own (`prefix`). `layer_states` is the part
of the state a segment kind keeps in the layers of its `layers` ([layers, B, ...]; {} for rmt): armt's
associative matrices, which each of those layers reads into its input and writes from its output.

Documents (`Documents`, built by the decoder from the document id of every token): the memory entering a segment
belongs to the document of the token just before it. Tokens of that document read it; tokens of a document that
starts inside the segment read a fresh memory; the new memory is written from the segment's last document only,
starting from a fresh memory when that document is not the memory's. Rows without a boundary in the segment
need one call; only when some row of the batch has one (`Documents.any_reset`) is the fresh memory read too, in a
second call of the kind on the fresh state (one `nn.cond`). A kind whose output carries `kv` always makes both
calls: the keys of the carried and of the fresh memory differ in number across the two branches otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class ExtraKV:
  """Keys and values beside a segment's own: k_BMKE, v_BMKE [B, M, kv_heads, head_dim] (no rotary applied),
  which of them each query may see, mask_BLM bool [B, L, M] (None: all), and a bias added to each query's
  attention score of each of them, bias_BLM float [B, L, M] (None: 0; M+'s log retriever gate)."""
  k_BMKE: jax.Array
  v_BMKE: jax.Array
  mask_BLM: jax.Array | None = None
  bias_BLM: jax.Array | None = None


@flax.struct.dataclass
class MemoryOut:
  residual_BLD: jax.Array | None = None
  kv: ExtraKV | None = None
  stats: dict[str, Any] = dataclasses.field(default_factory=dict)
  losses: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


@flax.struct.dataclass
class Documents:
  """Document masks of one segment.

  ids_BL:  the document id of every token (attention stays within a document);
  read_BL: tokens of the memory's document, which read the carried memory (the others read a fresh one);
  write_BL: tokens of the segment's last document, the only ones written into the memory;
  reset_B: the last document is not the memory's, so the write starts from a fresh memory."""
  ids_BL: jax.Array
  read_BL: jax.Array
  write_BL: jax.Array
  reset_B: jax.Array

  @classmethod
  def make(cls, ids_BL, mem_doc_B) -> "Documents":
    """From the document ids [B, L] and the document that owns the entering memory [B]."""
    last_B = ids_BL[:, -1]
    return cls(ids_BL=ids_BL, read_BL=ids_BL == mem_doc_B[:, None], write_BL=ids_BL == last_B[:, None],
               reset_B=last_B != mem_doc_B)

  @property
  def any_reset(self) -> jax.Array:
    """Whether any row of the batch has a document boundary in this segment (scalar bool)."""
    return self.reset_B.any()


def select_rows(rows_B, a, b, batch_axis: int = 0):
  """Per batch row: a where rows_B, else b (pytrees of arrays with a batch axis at `batch_axis`)."""
  def one(x, y):
    shape = [1] * x.ndim
    shape[batch_axis] = -1
    return jnp.where(rows_B.reshape(shape), x, y)
  return jax.tree.map(one, a, b)


def _merge(read_BL, reset_B, carried: MemoryOut, fresh: MemoryOut) -> MemoryOut:
  """One output from a call on the carried and one on the fresh memory: each token takes the residual of the
  memory it reads and sees the keys of that memory only; statistics describe the memory each row writes into;
  losses are the carried call's (over the tokens that read the carried memory)."""
  residual = None
  if carried.residual_BLD is not None:
    residual = jnp.where(read_BL[..., None], carried.residual_BLD, fresh.residual_BLD)
  kv = None
  if carried.kv is not None:
    def visible(kv: ExtraKV, rows_BL):
      mask = jnp.broadcast_to(rows_BL[..., None], (*rows_BL.shape, kv.k_BMKE.shape[1]))
      return mask if kv.mask_BLM is None else mask & kv.mask_BLM
    def bias(kv: ExtraKV, rows_BL):
      return jnp.zeros((*rows_BL.shape, kv.k_BMKE.shape[1]), jnp.float32) if kv.bias_BLM is None else kv.bias_BLM
    biased = carried.kv.bias_BLM is not None or fresh.kv.bias_BLM is not None
    kv = ExtraKV(jnp.concatenate([carried.kv.k_BMKE, fresh.kv.k_BMKE], axis=1),
                 jnp.concatenate([carried.kv.v_BMKE, fresh.kv.v_BMKE], axis=1),
                 jnp.concatenate([visible(carried.kv, read_BL), visible(fresh.kv, ~read_BL)], axis=-1),
                 jnp.concatenate([bias(carried.kv, read_BL), bias(fresh.kv, read_BL)], axis=-1) if biased else None)
  return MemoryOut(residual, kv, select_rows(reset_B, fresh.stats, carried.stats), carried.losses)


class LayerMemory(nn.Module):
  """Base of the layer memory kinds: `__call__(state, h_BLD, docs)` applies the document rules around the
  kind's `step`. Subclasses define `Config`, `init_state`, `state_axes` (static) and `step`."""
  cfg: Any  # ModelConfig

  placement = "layer"
  emits_kv = False  # a kind whose output has `kv` sets this (both document calls are always made)
  # A kind whose write needs the layer's own output (MemoryLLM's self-update) sets this and defines
  # `update_prefix(state, L) -> ExtraKV` and `self_update(state, y_BLD, docs) -> new_state`: after the layer's
  # ordinary pass, the decoder layer runs once more on the segment with `update_prefix` as the extra keys and
  # hands its output to `self_update`, which writes the state that `__call__` returned (not in cached decoding).
  self_updates = False
  residual_before_attention = False  # the residual enters the stream before the layer's attention, which reads it
  decode_by_segment = False  # cached decoding runs the segment so far per token (reads depend on its earlier tokens)

  def step(self, state, h_BLD, read_BL=None, write_BL=None, write_state=None):
    """-> (MemoryOut, new_state): the tokens of `read_BL` read `state`, those of `write_BL` are written into it,
    or into `write_state` when given (a memory shared across layers: read what entered the segment, write into
    what earlier layers wrote) (masks None: all tokens). Every kind defines it."""
    raise NotImplementedError(f"memory kind {type(self).__name__} does not define step()")

  def read_only(self, state, h_BLD) -> MemoryOut:
    """What the tokens read, without a write (cached decoding: the memory is written when the segment is full).
    Kinds whose write needs more tokens than a decoding step holds, or is costly, override it."""
    return self.step(state, h_BLD)[0]

  def __call__(self, state, h_BLD, docs: Documents | None = None, write_state=None):
    """-> (MemoryOut, new_state) under the document rules (module docstring). `write_state`: see `step`; with
    documents it must already start fresh in the rows whose last document is new (`Documents.reset_B`)."""
    if docs is None:
      return self.step(state, h_BLD, write_state=write_state)

    def both(mdl, state, h_BLD, docs, write_state):
      fresh = type(mdl).init_state(mdl.cfg.memory, h_BLD.shape[0])
      # rows without a boundary: every token reads and writes the carried memory
      out_c, new_c = mdl.step(state, h_BLD, docs.read_BL, docs.read_BL, write_state)
      out_f, new_f = mdl.step(fresh, h_BLD, ~docs.read_BL, docs.write_BL, write_state)
      return _merge(docs.read_BL, docs.reset_B, out_c, out_f), select_rows(docs.reset_B, new_f, new_c)

    if self.emits_kv:
      return both(self, state, h_BLD, docs, write_state)

    def one(mdl, state, h_BLD, docs, write_state):
      del docs  # no row has a boundary: every token is the memory's
      return mdl.step(state, h_BLD, write_state=write_state)

    return nn.cond(docs.any_reset, both, one, self, state, h_BLD, docs, write_state)



class ReadWriteMemory(LayerMemory):
  """A layer memory whose tokens read the entering state, after which the segment is written into it: the kind
  defines `read(state, h_BLD, mask_BL) -> MemoryOut` and `write_with_stats(state, h_BLD, stats, mask_BL) ->
  (new_state, stats)` (the read's statistics go into the write: read counts kept in the state; the write returns
  them with its own added, which `step` reports); `write` is its new state alone."""

  def read(self, state, h_BLD, mask_BL=None) -> MemoryOut:
    raise NotImplementedError(f"memory kind {type(self).__name__} does not define read()")

  def write_with_stats(self, state, h_BLD, stats, mask_BL=None):
    raise NotImplementedError(f"memory kind {type(self).__name__} does not define write_with_stats()")

  def write(self, state, h_BLD, stats, mask_BL=None):
    return self.write_with_stats(state, h_BLD, stats, mask_BL)[0]

  def step(self, state, h_BLD, read_BL=None, write_BL=None, write_state=None):
    out = self.read(state, h_BLD, read_BL)
    new, stats = self.write_with_stats(state if write_state is None else write_state, h_BLD, out.stats, write_BL)
    return dataclasses.replace(out, stats=stats), new

  def read_only(self, state, h_BLD) -> MemoryOut:
    return self.read(state, h_BLD)
