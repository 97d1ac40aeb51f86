"""Associative Recurrent Memory Transformer (Rodkin et al. 2024, arXiv 2407.04841): rmt's memory tokens plus, in
each layer of `memory.layers`, an associative matrix written from the memory tokens' outputs with the delta rule.

A segment kind (it wraps the layer stack like `rmt`, whose module it extends: same tokens, positions, documents,
prefix) that also keeps a memory in layers. Letters: B batch, X positions the layers process ([read ; segment ;
write], as rmt), M memory tokens (num_slots), D d_model, K key_dim, F = 2 nu K features (nu = 3), n layers.

state      {'tokens': [B, M, D]} as rmt, and per associative layer the matrix A [B, n, F, D] and the normaliser
           z [B, n, F]; all zeros when fresh.
features   DPFP (Schlag et al. 2021) with nu = 3, normalised to unit length:
               r(x)   = [relu(x) ; relu(-x)]                                      [2K]
               phi(x) = f / |f|,  f = [r * roll(r, 1) ; r * roll(r, 2) ; r * roll(r, 3)]   [F]
           (roll(r, j)_i = r_{i-j}; phi >= 0, so z . phi >= 0 and the reads below are ratios of non-negatives in
           the denominator.)
read       before the layer, every position reads the matrix the earlier segments wrote (in every layer of
           `layers`), and the layer runs on the sum:
               q = phi(x W_q),   o = A^T q / (z . q + eps),   x <- x + o                   eps = 1e-5
write      after the segment, from the layer's outputs y_m at the M write positions, in one step for all m:
               k_m = phi(y_m W_k),  v_m = y_m W_v,  beta_m = sigmoid(y_m w_b + b_b)
               vbar_m  = A^T k_m / (z . k_m + eps)               what A returns for k_m now
               gamma_m = clip(1 - (z . k_m + eps) / |k_m|^2, 0, 1)    (no gradient; 1 without the correction)
               A' = A + sum_m beta_m k_m (v_m - vbar_m)^T          delta rule with importance beta
               z' = z + sum_m gamma_m k_m
           The delta rule replaces the value stored under a key instead of adding to it; gamma keeps the
           normaliser from counting a key again that it already covers (|k| = 1: gamma = 1 - z . k). Written
           twice under one key, the plain sum z' = 2k would halve what the key reads back, and after n writes
           read 1/n of it: the paper's length generalisation fails without it (tests/test_armt.py).
           W_v starts at zero (as in ARMT's code), so a fresh model reads o = 0: it starts as rmt. b_b starts
           at 1.

Causality: the write tokens stand after the segment's tokens, and A, z are written after the segment, so a
token reads only what earlier segments wrote (with the rmt tokens it sees the read tokens, which hold the same).
The decoder truncates gradients through the whole state (tokens, A, z) every `bptt_segments` segments.

Documents (rmt's rules, `RMTMemory.extended_docs`): positions of the memory's document read A, z; the others
(a document that starts inside the segment, and the read/write tokens of a new one) read a fresh memory, which
gives o = 0. The write starts from a fresh A, z where the segment's last document is new, and the write tokens
belong to that document.

Cached decoding: as rmt (the prefix is the read tokens); every new token and the prefix read A, z before each
layer as in the uncached forward; the write happens when the segment is complete.

Differences from ARMT's code: its memory tokens are the learned ones in every segment, appended after the segment
(write tokens only), and only A, z carry information between segments; here rmt's carried tokens [read ; segment
; write] stay, as this kind extends rmt. Its query reads the raw hidden state, as here (the read is invariant to
the scale of x: phi is normalised).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm2_jax.model.config import ModelConfig, as_dict, check, positive_int
from lm2_jax.model.layers import dense
from lm2_jax.model.memory import parse_layers, register
from lm2_jax.model.memory.protocol import Documents, select_rows
from lm2_jax.model.memory.rmt import RMTMemory, RMTMemoryConfig

NU = 3      # DPFP's number of rolls
EPS = 1e-5  # added to the normaliser z . phi


@dataclasses.dataclass(frozen=True)
class ARMTMemoryConfig(RMTMemoryConfig):
  key_dim: int = 32              # K
  gamma_correction: bool = True  # module docstring

  @property
  def feature_dim(self) -> int:
    """F = 2 nu K."""
    return 2 * NU * self.key_dim

  @classmethod
  def parse(cls, cfg: Any, *, num_layers: int, d_model: int) -> "ARMTMemoryConfig":
    v = as_dict(cfg, "model.memory")
    rmt = RMTMemoryConfig.parse({**v, "layers": "all"}, num_layers=num_layers, d_model=d_model)
    correction = v.get("gamma_correction", True)
    check(isinstance(correction, bool), "model.memory.gamma_correction", correction, "must be True or False")
    return cls(**{**dataclasses.asdict(rmt), "layers": parse_layers(v.get("layers", "all"), num_layers)},
               key_dim=positive_int({"key_dim": 32, **v}, "key_dim", "model.memory"), gamma_correction=correction)


def dpfp(x_BLK):
  """phi(x) [..., F]: DPFP features (nu = 3) of unit length (module docstring); float32."""
  r = jax.nn.relu(jnp.concatenate([x_BLK, -x_BLK], axis=-1).astype(jnp.float32))
  f = jnp.concatenate([r * jnp.roll(r, j, axis=-1) for j in range(1, NU + 1)], axis=-1)
  return f * jax.lax.rsqrt(jnp.maximum(jnp.sum(f * f, axis=-1, keepdims=True), 1e-24))


def associative_read(A_BFD, z_BF, phi_BLF):
  """A^T phi / (z . phi + eps) [B, L, D] and the normaliser z . phi + eps [B, L]."""
  norm_BL = jnp.einsum("bf,blf->bl", z_BF, phi_BLF) + EPS
  return jnp.einsum("blf,bfd->bld", phi_BLF, A_BFD) / norm_BL[..., None], norm_BL


class AssociativeMemory(nn.Module):
  """One layer's associative matrix (module docstring): `read` before the layer, `write` from its output.
  state {'A': [B, F, D], 'z': [B, F]} float32."""
  cfg: ModelConfig

  around_layer = True

  def setup(self):
    m, f32 = self.cfg.memory, jnp.float32
    self.q = dense(m.key_dim, ("embed", None), "q_proj", f32)
    self.k = dense(m.key_dim, ("embed", None), "k_proj", f32)
    self.v = dense(self.cfg.d_model, (None, "embed"), "v_proj", f32, kernel_init=nn.initializers.zeros)
    self.beta = dense(1, ("embed", None), "beta", f32, use_bias=True, bias_init=nn.initializers.ones)

  def read(self, state, x_BXD, docs: Documents | None = None):
    """o_BXD (x's dtype): zero at positions that read a fresh memory (docs.read_BL False)."""
    o_BXD, _ = associative_read(state["A"], state["z"], dpfp(self.q(x_BXD)))
    if docs is not None:
      o_BXD = jnp.where(docs.read_BL[..., None], o_BXD, 0.0)
    return o_BXD.astype(x_BXD.dtype)

  def write(self, state, y_BXD, docs: Documents | None = None):
    """The new state from the outputs at the last M (write) positions, starting fresh where docs.reset_B."""
    if docs is not None:
      state = select_rows(docs.reset_B, jax.tree.map(jnp.zeros_like, state), state)
    A_BFD, z_BF = state["A"], state["z"]
    y_BMD = y_BXD[:, -self.cfg.memory.num_slots:].astype(jnp.float32)
    k_BMF = dpfp(self.k(y_BMD))
    v_BMD = self.v(y_BMD)
    beta_BM = jax.nn.sigmoid(self.beta(y_BMD)[..., 0])
    vbar_BMD, norm_BM = associative_read(A_BFD, z_BF, k_BMF)
    gamma_BM = jnp.ones_like(beta_BM)
    if self.cfg.memory.gamma_correction:
      gamma_BM = jax.lax.stop_gradient(jnp.clip(1.0 - norm_BM / jnp.sum(k_BMF * k_BMF, axis=-1), 0.0, 1.0))
    A_BFD = A_BFD + jnp.einsum("bmf,bmd->bfd", k_BMF, beta_BM[..., None] * (v_BMD - vbar_BMD))
    z_BF = z_BF + jnp.einsum("bm,bmf->bf", gamma_BM, k_BMF)
    return {"A": A_BFD, "z": z_BF}


@register("armt")
class ARMTMemory(RMTMemory):
  """rmt (`__call__` as `RMTMemory`'s, with the associative state threaded through `run_layers`) plus an
  `AssociativeMemory` in each layer of `memory.layers`."""
  Config = ARMTMemoryConfig
  layer_memory = AssociativeMemory

  @staticmethod
  def init_state(mcfg: ARMTMemoryConfig, batch: int) -> dict[str, jax.Array]:
    n, F = len(mcfg.layers), mcfg.feature_dim
    return {**RMTMemory.init_state(mcfg, batch), "A": jnp.zeros((batch, n, F, mcfg.slot_dim), jnp.float32),
            "z": jnp.zeros((batch, n, F), jnp.float32)}

  @staticmethod
  def state_axes(mcfg: ARMTMemoryConfig) -> dict[str, tuple[str, ...]]:
    return {**RMTMemory.state_axes(mcfg), "A": ("batch", "layers", None, "embed"), "z": ("batch", "layers", None)}

  @staticmethod
  def layer_states(state) -> dict[str, jax.Array]:
    """{'A': [n, B, F, D], 'z': [n, B, F]}: the layer axis first, as the decoder's layer groups take it."""
    return {name: state[name].swapaxes(0, 1) for name in ("A", "z")}

  def __call__(self, state, x_BLD, docs: Documents | None, run_layers):
    x_BXD, docs_X = self.enter(state, x_BLD, docs)
    y_BXD, new_layers = run_layers(x_BXD, docs_X, self.layer_states(state))
    y_BLD, new_state = self.unwrap(y_BXD)
    return y_BLD, {**new_state, **{name: a.swapaxes(0, 1) for name, a in new_layers.items()}}, {}, {}
