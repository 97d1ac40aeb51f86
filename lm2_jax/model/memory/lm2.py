"""LM2 memory (Kang et al. 2025, arXiv 2502.06049, sections 2.1-2.2), made causal.

Per memory-bearing layer the state holds `N` slots of width `S` (slot_dim), independent of the sequence length
and of d_model. Letters: B batch, L positions in the segment, D d_model, N slots, S slot_dim, R memory heads,
E memory head dim (= S / R).

read  (tokens of the current segment read the memory written by earlier segments):
    scores = (H Wq)(M~ Wk)^T / sqrt(E)         per head, [B, R, L, N]; M~ = RMSNorm(M), as H is normalised
    E_mem  = softmax_N(scores) (M~ Wv)
    delta  = sigmoid(E_mem Wg + bg) * (E_mem Wo)  the layer adds this beside self-attention
write (after the segment; each token writes into the slots it addresses):
    X_l     = H_l + H_{l-1}                       token shift within the segment (H_{-1} = 0)
    wscores = (X Wq)(M~ Wk)^T / sqrt(E)           the read's projections, applied to X
    U       = softmax_N(wscores)^T (X Wu)         [B, N, S]: a sum over tokens, not a mean
    g_in    = sigmoid([M, U] W_in + b_in)         b_in starts at 0
    g_f     = sigmoid([M, U] W_f + b_f)           b_f starts at memory.forget_bias (default +1)
    M'      = g_in * tanh(U) + g_f * M
  with memory.write_gate, each token also scales its own write, per head:
    w       = sigmoid(X Ww + bw)                  [B, L, R]; bw starts at 0
    U       = softmax_N(wscores)^T (w * X Wu)     so text that should not be kept can write nothing

The gates g_in and g_f are per slot: they see what the segment wrote into a slot, not which token wrote it, so
without the write gate every token of a long distractor text writes into the memory at every segment, and at
initialisation a slot keeps about sigmoid(b_f) ~ 0.73 of itself per segment with the default bias (~0.08 after 8
segments). The write gate (as
ARMT's beta and Titans' theta) lets a token's content decide whether it is written; a larger forget bias (a
"chrono" initialisation, Tallec & Ollivier 2018) starts the slots out keeping what they hold.

A token writes where it would read: its write distribution is a softmax over slots, like the read's, so the
memory is content-addressed in both directions. A slot no token addresses gets U ~ 0 and only decays by g_f; a
slot one token addresses takes that token alone. Normalising over tokens instead (each slot a softmax-weighted
mean of the segment) forces every slot to take a blend of the whole segment at every write; with it the
quickstart model learnt which values a sample held but not which key each belonged to (recall ~1/3). The
token shift lets a token's write carry the token before it (a key with its value) even in the first layer,
whose input knows nothing of its neighbours.

The official code's input gate mean-pools the whole sequence, which lets every position see the future; here a
token only ever reads memory written by earlier segments (the write may look at the whole segment: it is read
only by later ones).

Kernels: with `model.attention_kernel='cudnn'` (GPU) the read is cuDNN flash attention and the write's sum
U = P^T (w * X Wu) runs on flash attention's backward pass (`layers.attention_transpose`), so neither materialises
the [B, R, L, N] probabilities (as large as self-attention's scores when N ~ L); the read statistics are then a
separate softmax outside the gradient. Otherwise both are einsums over explicit probabilities. The gates' matmuls
run in the model dtype, the slots and gate values in float32.

share_across_layers (the official code threads one memory through all layers): one state [B, N, S] instead of
one per memory layer. Within a segment every memory layer reads the memory that entered the segment, and writes
into what the memory layers before it wrote: M^(l+1) = write_l(M^l, H_l), M^0 the entering memory; the last
memory layer's M is the next segment's. Reading the layer-by-layer updated memory instead, as the official code
does, would let a token read what later tokens of its own segment wrote. Each layer keeps its own projections
and gates (the official code shares one module); `read_mass` adds up every layer's read, decayed per layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.model.config import ModelConfig, as_dict, check, positive_int
from lm2_jax.model.layers import RMSNorm, attention_transpose, dense
from lm2_jax.model.memory import parse_layers, register
from lm2_jax.model.memory.protocol import MemoryOut, ReadWriteMemory


@dataclasses.dataclass(frozen=True)
class LM2MemoryConfig:
  kind: str
  layers: tuple[int, ...]
  num_slots: int      # N
  num_heads: int      # R, heads of the read/write cross-attention
  slot_dim: int       # S; 0 in the config means d_model
  read_decay: float   # per-segment decay of the read statistics kept in the state
  share_across_layers: bool = False  # one memory threaded through the memory layers (module docstring)
  forget_bias: float = 1.0  # initial b_f
  write_gate: bool = False  # a per-token, per-head write strength w (module docstring)

  @classmethod
  def parse(cls, cfg: Any, *, num_layers: int, d_model: int) -> "LM2MemoryConfig":
    v = as_dict(cfg, "model.memory")
    for name in ("num_slots", "num_heads", "layers"):
      check(name in v, f"model.memory.{name}", None, "required for memory kind 'lm2'")
    slot_dim = v.get("slot_dim", 0) or d_model
    num_heads = positive_int(v, "num_heads", "model.memory")
    check(isinstance(slot_dim, int) and slot_dim > 0 and slot_dim % num_heads == 0, "model.memory.slot_dim",
          slot_dim, f"must be a positive multiple of memory.num_heads={num_heads} (0 means d_model)")
    check(d_model % num_heads == 0, "model.memory.num_heads", num_heads, f"must divide d_model={d_model}")
    decay = v.get("read_decay", 0.99)
    check(isinstance(decay, (int, float)) and 0 <= decay <= 1, "model.memory.read_decay", decay,
          "must be in [0, 1]")
    shared, write_gate = v.get("share_across_layers", False), v.get("write_gate", False)
    for name, flag in (("share_across_layers", shared), ("write_gate", write_gate)):
      check(isinstance(flag, bool), f"model.memory.{name}", flag, "must be True or False")
    forget_bias = v.get("forget_bias", 1.0)
    check(isinstance(forget_bias, (int, float)) and not isinstance(forget_bias, bool) and abs(forget_bias) <= 20,
          "model.memory.forget_bias", forget_bias, "must be a number in [-20, 20], e.g. 1 (keeps 0.73 per segment)")
    return cls(kind=v["kind"], layers=parse_layers(v["layers"], num_layers),
               num_slots=positive_int(v, "num_slots", "model.memory"), num_heads=num_heads, slot_dim=slot_dim,
               read_decay=float(decay), share_across_layers=shared, forget_bias=float(forget_bias),
               write_gate=write_gate)


def identity_like_slots(num_slots: int, slot_dim: int) -> np.ndarray:
  """Initial slots [N, S]: rows of the identity when N <= S (orthonormal, as in LM2); otherwise unit-norm
  random directions from a fixed seed, which are nearly orthogonal in high dimension."""
  if num_slots <= slot_dim:
    return np.eye(num_slots, slot_dim, dtype=np.float32)
  x = np.random.default_rng(0).standard_normal((num_slots, slot_dim))
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


_AXES = {"b": "batch", "l": "length", "n": "mem_slots", "r": "heads", "e": "head_dim", "s": "embed", "d": "embed"}


def _pin(x, dims: str):
  """Constrains x to the logical axes its dimension letters name.

  Every intermediate is pinned, and the gate kernels' [M, U] input dim is left unsharded: without both, XLA's
  partitioner (jaxlib 0.10.2, CPU, mesh data=2 x fsdp=2 x tensor=2) computed wrong memory updates and wrong
  gradients through the carried memory, while every other mesh shape was right
  (tests/test_sharding.py checks this mesh)."""
  return nn.with_logical_constraint(x, tuple(_AXES[c] for c in dims))


def token_shift(h_BL_, mask_BL=None):
  """x_l = h_l + h_{l-1} (h_{-1} = 0) along axis 1 of h [B, L, ...], without reaching across the mask: the token
  before a masked run's first token (another document's) adds nothing."""
  prev = jnp.pad(h_BL_[:, :-1], ((0, 0), (1, 0)) + ((0, 0),) * (h_BL_.ndim - 2))
  if mask_BL is not None:
    keep_BL = jnp.pad(mask_BL[:, :-1], ((0, 0), (1, 0))).astype(prev.dtype)
    prev = prev * keep_BL.reshape(*keep_BL.shape, *(1,) * (h_BL_.ndim - 2))
  return h_BL_ + prev


@register("lm2")
class LM2Memory(ReadWriteMemory):
  """step = read then write (module docstring); statistics of this segment: `read_mass` [B, N], and from the
  write (`_write`) the mean input and forget gates [B] and each token's write strength [B, L]."""
  cfg: ModelConfig

  Config = LM2MemoryConfig

  @staticmethod
  def init_state(mcfg: LM2MemoryConfig, batch: int) -> dict[str, jax.Array]:
    slots_NS = jnp.asarray(identity_like_slots(mcfg.num_slots, mcfg.slot_dim))
    return {"slots": jnp.broadcast_to(slots_NS, (batch, *slots_NS.shape)),
            "read_mass": jnp.zeros((batch, mcfg.num_slots), jnp.float32)}

  @staticmethod
  def state_axes(mcfg: LM2MemoryConfig) -> dict[str, tuple[str, ...]]:
    return {"slots": ("batch", "mem_slots", "embed"), "read_mass": ("batch", "mem_slots")}

  def setup(self):
    c, m, dt = self.cfg, self.cfg.memory, self.cfg.dtype
    e = m.slot_dim // m.num_heads
    self.q = dense((m.num_heads, e), ("embed", "heads", "head_dim"), "q_proj", dt)
    self.k = dense((m.num_heads, e), ("embed", "heads", "head_dim"), "k_proj", dt)
    self.v = dense((m.num_heads, e), ("embed", "heads", "head_dim"), "v_proj", dt)
    self.o = dense(c.d_model, ("heads", "head_dim", "embed"), "o_proj", dt, n_in=2)
    self.out_gate = dense(c.d_model, ("heads", "head_dim", "embed"), "out_gate", dt, n_in=2,
                          use_bias=True)
    self.slot_norm = RMSNorm(c.norm_eps, dt)
    self.u = dense((m.num_heads, e), ("embed", "heads", "head_dim"), "u_proj", dt)
    self.in_gate = dense(m.slot_dim, (None, "embed"), "in_gate", dt, use_bias=True)
    self.forget_gate = dense(m.slot_dim, (None, "embed"), "forget_gate", dt, use_bias=True,
                             bias_init=nn.initializers.constant(m.forget_bias))
    if m.write_gate:
      self.write_gate = dense(m.num_heads, ("embed", "heads"), "write_gate", dt, use_bias=True)

  def _queries(self, h_BLD):
    """q_BLRE = H Wq, the tokens' queries of the read (the write's are these, token-shifted)."""
    return _pin(self.q(h_BLD), "blre")

  def _keys(self, slots_BNS):
    """k_BNRE = M~ Wk, the slots' keys, shared by read and write."""
    return _pin(self.k(self.slot_norm(slots_BNS)), "bnre")

  def _scores(self, slots_BNS, q_BLRE):
    """Query-key affinities [B, R, L, N] in float32 of the queries q_BLRE = Wq-projected tokens, with the same
    key projection for read and write."""
    k_BNRE = self._keys(slots_BNS)
    scores = jnp.einsum("blre,bnre->brln", q_BLRE, k_BNRE, preferred_element_type=jnp.float32)
    return _pin(scores / np.sqrt(q_BLRE.shape[-1]).astype(np.float32), "brln")

  def step(self, state, h_BLD, read_BL=None, write_BL=None, write_state=None):
    """read, then write (ReadWriteMemory.step) with one query projection: the write's queries (X Wq) are the
    read's (H Wq) token-shifted, as the shift and Wq (no bias) are linear. Saves a [L, D] x [D, S] matmul per
    segment and layer; the rounding differs from projecting X (float32: ~1e-7 relative)."""
    q_BLRE = self._queries(h_BLD)
    out = self._read(state, q_BLRE, read_BL)
    new, stats = self._write(state if write_state is None else write_state, h_BLD, q_BLRE, out.stats, write_BL)
    return dataclasses.replace(out, stats=stats), new

  def read(self, state, h_BLD, mask_BL=None) -> MemoryOut:
    """-> residual delta_BLD, stats {'read_mass': [B, N]}; the mass sums to 1 over slots, averaged over the
    tokens of `mask_BL` (all tokens when None; 0 where a row has none)."""
    return self._read(state, self._queries(h_BLD), mask_BL)

  def write_with_stats(self, state, h_BLD, stats, mask_BL=None):
    """-> (the new state, `stats` with the gates' statistics added); only the tokens of `mask_BL` (all when None)
    write, and the token shift never reaches across the mask (the token before a document's first one belongs to
    another document)."""
    return self._write(state, h_BLD, self._queries(h_BLD), stats, mask_BL)

  def _read(self, state, q_BLRE, mask_BL) -> MemoryOut:
    slots_BNS = state["slots"]
    v_BNRE = _pin(self.v(self.slot_norm(slots_BNS)), "bnre")
    if self.cfg.attention_kernel == "cudnn":  # flash attention; the statistics' softmax is not differentiated
      k_BNRE = self._keys(slots_BNS)
      read_BLRE = _pin(jax.nn.dot_product_attention(q_BLRE, k_BNRE, v_BNRE, implementation="cudnn"), "blre")
      p_BRLN = jax.nn.softmax(self._scores(*jax.lax.stop_gradient((slots_BNS, q_BLRE))), axis=-1)
    else:
      p_BRLN = jax.nn.softmax(self._scores(slots_BNS, q_BLRE), axis=-1)
      read_BLRE = _pin(jnp.einsum("brln,bnre->blre", p_BRLN.astype(v_BNRE.dtype), v_BNRE), "blre")
    delta_BLD = nn.sigmoid(self.out_gate(read_BLRE)) * self.o(read_BLRE)
    B, R, L, _ = p_BRLN.shape
    w_BL = jnp.ones((B, L), jnp.float32) if mask_BL is None else mask_BL.astype(jnp.float32)
    mass_BN = jnp.einsum("brln,bl->bn", p_BRLN, w_BL) / (R * jnp.maximum(w_BL.sum(axis=1, keepdims=True), 1.0))
    return MemoryOut(residual_BLD=_pin(delta_BLD, "bld"), stats={"read_mass": jax.lax.stop_gradient(mass_BN)})

  def _write(self, state, h_BLD, q_BLRE, stats, mask_BL):
    """write_with_stats() given the tokens' queries q_BLRE = H Wq -> (new state, `stats` and the gates'
    statistics: `in_gate` and `forget_gate` [B], the mean of g_in and g_f over slots and width; `write_strength`
    [B, L], each token's write gate w averaged over heads (1 without memory.write_gate))."""
    slots_BNS = state["slots"]
    x_BLD = _pin(token_shift(h_BLD, mask_BL), "bld")
    xq_BLRE = _pin(token_shift(q_BLRE, mask_BL), "blre")  # = X Wq
    u_BLRE = _pin(self.u(x_BLD), "blre")
    strength_BL = jnp.ones(h_BLD.shape[:2], jnp.float32)
    if self.cfg.memory.write_gate:
      w_BLR = nn.sigmoid(self.write_gate(x_BLD))
      u_BLRE = u_BLRE * w_BLR[..., None]
      strength_BL = w_BLR.astype(jnp.float32).mean(-1)
    if self.cfg.attention_kernel == "cudnn":  # P^T u by flash attention's backward pass (attention_transpose)
      if mask_BL is not None:
        u_BLRE = u_BLRE * mask_BL[:, :, None, None].astype(u_BLRE.dtype)
      u_BNRE = attention_transpose(xq_BLRE, self._keys(slots_BNS), u_BLRE, "cudnn").astype(jnp.float32)
    else:
      p_BRLN = jax.nn.softmax(self._scores(slots_BNS, xq_BLRE), axis=-1)  # each token addresses the slots
      if mask_BL is not None:
        p_BRLN = p_BRLN * mask_BL[:, None, :, None].astype(p_BRLN.dtype)
      u_BNRE = jnp.einsum("brln,blre->bnre", p_BRLN.astype(u_BLRE.dtype), u_BLRE, preferred_element_type=jnp.float32)
    u_BNS = _pin(u_BNRE.reshape(*u_BNRE.shape[:2], -1), "bns")
    mu_BN2S = jnp.concatenate([slots_BNS, u_BNS], axis=-1)
    g_in = _pin(nn.sigmoid(self.in_gate(mu_BN2S).astype(jnp.float32)), "bns")
    g_f = _pin(nn.sigmoid(self.forget_gate(mu_BN2S).astype(jnp.float32)), "bns")
    new_slots = _pin(g_in * jnp.tanh(u_BNS) + g_f * slots_BNS, "bns")
    read_mass = self.cfg.memory.read_decay * state["read_mass"] + stats["read_mass"]
    gates = {"in_gate": g_in.mean(axis=(1, 2)), "forget_gate": g_f.mean(axis=(1, 2)), "write_strength": strength_BL}
    return {"slots": new_slots, "read_mass": read_mass}, {**stats, **jax.lax.stop_gradient(gates)}
