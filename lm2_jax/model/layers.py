"""Llama building blocks: RMSNorm, rotary embeddings (with Llama-3 frequency scaling), attention, SwiGLU.

Dimension letters in names: B batch, L positions in a segment, D d_model, H query heads, K kv heads,
E head_dim, F d_ff, V vocab. Parameters are float32; computation runs in `dtype`. Every parameter and
activation carries logical axis names (lm2_jax.parallel maps them to mesh axes).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.model.config import ModelConfig, RopeScaling

INIT_STD = 0.02  # Llama's initializer_range


def dense(features, axes: tuple[str, ...], name: str, dtype, in_axis=-1, use_bias: bool = False,
          bias_init=nn.initializers.zeros) -> nn.DenseGeneral:
  """A DenseGeneral whose kernel (and bias) carry the logical `axes` (inputs first, then outputs)."""
  out_axes = axes[-(len(features) if isinstance(features, tuple) else 1):]
  return nn.DenseGeneral(
      features, axis=in_axis, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), axes),
      bias_init=nn.with_logical_partitioning(bias_init, out_axes))


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
  """Causal grouped-query self-attention within a segment (any kv-head count dividing the head count)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD, cos_LE, sin_LE):
    c, dt = self.cfg, self.cfg.dtype
    q_BLHE = dense((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), "q_proj", dt)(x_BLD)
    k_BLKE = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "k_proj", dt)(x_BLD)
    v_BLKE = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "v_proj", dt)(x_BLD)
    q_BLHE = nn.with_logical_constraint(apply_rope(q_BLHE, cos_LE, sin_LE), ("batch", "length", "heads", "head_dim"))
    k_BLKE = nn.with_logical_constraint(apply_rope(k_BLKE, cos_LE, sin_LE),
                                        ("batch", "length", "kv_heads", "head_dim"))
    out_BLHE = jax.nn.dot_product_attention(q_BLHE, k_BLKE, v_BLKE, is_causal=True)
    out_BLHE = nn.with_logical_constraint(out_BLHE, ("batch", "length", "heads", "head_dim"))
    return dense(c.d_model, ("heads", "head_dim", "embed"), "o_proj", dt, in_axis=(-2, -1))(out_BLHE)


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
