"""Llama building blocks: RMSNorm, rotary embeddings (with Llama-3 frequency scaling), attention, SwiGLU.

Dimension letters in names: B batch, L positions in a segment, D d_model, H query heads, K kv heads,
E head_dim, F d_ff, V vocab. Parameters are float32; computation runs in `dtype`. Every parameter and
activation carries logical axis names (lm2_jax.parallel maps them to mesh axes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.model.config import ModelConfig, RopeScaling

INIT_STD = 0.02  # Llama's initializer_range


class Dense(nn.Module):
  """y[..., *features] = x[..., *in] . kernel[*in, *features] (+ bias[*features]), contracting the last `n_in`
  dims of x. Kernel (and bias) carry the logical `axes` (input axes first, then output axes)."""
  features: tuple[int, ...]
  axes: tuple[str, ...]
  n_in: int = 1
  dtype: Any = "float32"
  use_bias: bool = False
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[x.ndim - self.n_in:]
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), self.axes),
                        (*in_shape, *self.features), jnp.float32)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.axes[self.n_in:]), self.features,
                        jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def dense(features, axes: tuple[str, ...], name: str, dtype, n_in: int = 1, use_bias: bool = False,
          bias_init=nn.initializers.zeros) -> Dense:
  """Dense with `features` an int or a tuple of output dims."""
  features = features if isinstance(features, tuple) else (features,)
  return Dense(features, axes, n_in=n_in, dtype=dtype, use_bias=use_bias, bias_init=bias_init, name=name)


class RMSNorm(nn.Module):
  eps: float
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BLD):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x_BLD.shape[-1],), jnp.float32)
    x = x_BLD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale).astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
  """Inverse frequencies [E/2] of rotary embeddings, with Llama-3 scaling when given.

  Llama 3.1 scaling: wavelengths shorter than original_len/high_freq_factor are kept, those longer than
  original_len/low_freq_factor are stretched by `factor`, and the band between interpolates linearly in
  original_len/wavelength.
  """
  inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is None:
    return inv.astype(np.float32)
  wavelen = 2 * math.pi / inv
  ratio = scaling.original_max_position_embeddings / wavelen
  smooth = np.clip((ratio - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor), 0, 1)
  return ((1 - smooth) * inv / scaling.factor + smooth * inv).astype(np.float32)


def rope_tables(cfg: ModelConfig, positions_L: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin tables [L, E] for the rotate-half convention (the one Hugging Face Llama weights use)."""
  inv = jnp.asarray(rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
  angles = positions_L.astype(jnp.float32)[:, None] * inv[None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BLHE, cos_LE, sin_LE):
  x = x_BLHE.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_LE[None, :, None, :] + rotated * sin_LE[None, :, None, :]
  return out.astype(x_BLHE.dtype)


class Attention(nn.Module):
  """Causal grouped-query self-attention within a segment (any kv-head count dividing the head count).

  `mask_B1LL` (optional, bool): which keys each query may see besides causality (tokens of its own document)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD, cos_LE, sin_LE, mask_B1LL=None):
    c, dt = self.cfg, self.cfg.dtype
    q_BLHE = dense((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), "q_proj", dt)(x_BLD)
    k_BLKE = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "k_proj", dt)(x_BLD)
    v_BLKE = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "v_proj", dt)(x_BLD)
    q_BLHE = nn.with_logical_constraint(apply_rope(q_BLHE, cos_LE, sin_LE), ("batch", "length", "heads", "head_dim"))
    k_BLKE = nn.with_logical_constraint(apply_rope(k_BLKE, cos_LE, sin_LE),
                                        ("batch", "length", "kv_heads", "head_dim"))
    out_BLHE = jax.nn.dot_product_attention(q_BLHE, k_BLKE, v_BLKE, mask=mask_B1LL, is_causal=True)
    out_BLHE = nn.with_logical_constraint(out_BLHE, ("batch", "length", "heads", "head_dim"))
    return dense(c.d_model, ("heads", "head_dim", "embed"), "o_proj", dt, n_in=2)(out_BLHE)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD):
    c, dt = self.cfg, self.cfg.dtype
    gate_BLF = dense(c.d_ff, ("embed", "mlp"), "gate_proj", dt)(x_BLD)
    up_BLF = dense(c.d_ff, ("embed", "mlp"), "up_proj", dt)(x_BLD)
    h_BLF = nn.with_logical_constraint(nn.silu(gate_BLF) * up_BLF, ("batch", "length", "mlp"))
    return dense(c.d_model, ("mlp", "embed"), "down_proj", dt)(h_BLF)
