"""Llama building blocks: RMSNorm, rotary embeddings (with Llama-3 frequency scaling), attention, SwiGLU.

Dimension letters in names: B batch, L positions in a segment, D d_model, H query heads, K kv heads,
E head_dim, F d_ff, V vocab. Parameters are float32; computation runs in `dtype`. Every parameter and
activation carries logical axis names (lm2_jax.parallel maps them to mesh axes).
"""

from __future__ import annotations

import functools
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
  kernel_init: Callable = nn.initializers.normal(INIT_STD)

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[x.ndim - self.n_in:]
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                        (*in_shape, *self.features), jnp.float32)
    # One [rows, *in] x [*in, *features] matmul: with the leading dims folded into one, XLA:CPU hands the weight
    # gradient's dot to YNNPACK without layout copies (1.06-1.13x faster train steps, benchmarks/PERF_NOTES.md).
    lead = x.shape[:x.ndim - self.n_in]
    x_RI = x.reshape(math.prod(lead), *in_shape) if len(lead) > 1 else x
    contract = (tuple(range(x_RI.ndim - self.n_in, x_RI.ndim)), tuple(range(self.n_in)))
    y = jax.lax.dot_general(x_RI.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    y = y.reshape(*lead, *self.features)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.axes[self.n_in:]), self.features,
                        jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def dense(features, axes: tuple[str, ...], name: str, dtype, n_in: int = 1, use_bias: bool = False,
          bias_init=nn.initializers.zeros, kernel_init=nn.initializers.normal(INIT_STD)) -> Dense:
  """Dense with `features` an int or a tuple of output dims."""
  features = features if isinstance(features, tuple) else (features,)
  return Dense(features, axes, n_in=n_in, dtype=dtype, use_bias=use_bias, bias_init=bias_init,
               kernel_init=kernel_init, name=name)


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


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin tables [..., E] of positions [...] ([L] or [B, L]) for the rotate-half convention (the one Hugging
  Face Llama weights use)."""
  inv = jnp.asarray(rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
  angles = positions.astype(jnp.float32)[..., None] * inv
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BLHE, cos_LE, sin_LE):
  """Rotates x by the tables of its positions: [L, E] (shared by the batch) or [B, L, E] (a position per row)."""
  x = x_BLHE.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = (t[None, :, None, :] if t.ndim == 2 else t[:, :, None, :] for t in (cos_LE, sin_LE))
  out = x * cos + rotated * sin
  return out.astype(x_BLHE.dtype)


def attend(q_BLHE, k_BSKE, v_BSKE, mask_BLS, bias_BLS=None):
  """Softmax attention of L queries over S keys with grouped-query heads (H = G * K), where mask_BLS (bool) says
  which keys each query sees; every query sees at least one key; bias_BLS (float, optional) is added to the
  scaled scores. float32 scores and softmax (the 'xla' kernel)."""
  B, L, H, E = q_BLHE.shape
  K = k_BSKE.shape[2]
  q_BLKGE = q_BLHE.reshape(B, L, K, H // K, E)
  scores = jnp.einsum("blkge,bske->bkgls", q_BLKGE, k_BSKE, preferred_element_type=jnp.float32)
  scores = scores / np.sqrt(E).astype(np.float32)
  if bias_BLS is not None:
    scores = scores + bias_BLS[:, None, None].astype(jnp.float32)
  scores = jnp.where(mask_BLS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(scores, axis=-1).astype(v_BSKE.dtype)
  return jnp.einsum("bkgls,bske->blkge", p, v_BSKE).reshape(B, L, H, E)


def causal_attention(q_BLHE, k_BLKE, v_BLKE, ids_BL, kernel: str):
  """Causal attention within documents (ids_BL None: one document) by `kernel`: 'xla' or 'cudnn'
  (jax.nn.dot_product_attention's XLA and cuDNN flash attention implementations), 'splash' (Pallas splash
  attention on TPU, document ids as its segment ids)."""
  if kernel in ("xla", "cudnn"):
    mask = None if ids_BL is None else (ids_BL[:, :, None] == ids_BL[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_BLHE, k_BLKE, v_BLKE, mask=mask, is_causal=True, implementation=kernel)
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  B, L, H, E = q_BLHE.shape
  kernel_fn = sk.make_splash_mha(sm.MultiHeadMask([sm.CausalMask((L, L))] * H), head_shards=1, q_seq_shards=1)
  k_BHLE, v_BHLE = (jnp.repeat(x, H // x.shape[2], axis=2).swapaxes(1, 2) for x in (k_BLKE, v_BLKE))
  q_BHLE = q_BLHE.swapaxes(1, 2) / np.sqrt(E).astype(q_BLHE.dtype)
  ids = jnp.zeros((B, L), jnp.int32) if ids_BL is None else ids_BL
  one = lambda q, k, v, i: kernel_fn(q, k, v, segment_ids=sk.SegmentIds(q=i, kv=i))
  return jax.vmap(one)(q_BHLE, k_BHLE, v_BHLE, ids).swapaxes(1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention_transpose(q_BLHE, k_BSHE, u_BLHE, implementation: str):
  """U_BSHE = P^T u: every query l adds its u_l into the keys it attends to, weighted by its attention P_ls =
  softmax_s(q_l . k_s / sqrt(E)) (no mask; LM2's write: tokens write into the slots they address).

  P^T u is the value gradient of attention P v for the output gradient u, so jax.nn.dot_product_attention's
  `implementation` ('cudnn': flash attention, P never materialised) computes it by its backward pass. The
  gradients are attention again: with v := dU and output gradient u, the forward gives du = P dU, and the
  backward's query and key gradients are dq and dk (dS_ls = P_ls (u_l . dU_s - u_l . du_l) in both)."""
  _, vjp = jax.vjp(lambda v: jax.nn.dot_product_attention(q_BLHE, k_BSHE, v, implementation=implementation),
                   jnp.zeros_like(k_BSHE))
  return vjp(u_BLHE)[0]


def _attention_transpose_fwd(q, k, u, implementation):
  return attention_transpose(q, k, u, implementation), (q, k, u)


def _attention_transpose_bwd(implementation, residuals, dU_BSHE):
  q, k, u = residuals
  du, vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=implementation), q, k,
                    dU_BSHE.astype(k.dtype))
  dq, dk, _ = vjp(u)
  return dq, dk, du.astype(u.dtype)


attention_transpose.defvjp(_attention_transpose_fwd, _attention_transpose_bwd)


class Attention(nn.Module):
  """Grouped-query self-attention within a segment (any kv-head count dividing the head count).

  __call__(x_BLD, cos, sin, ids_BL=None, extra=None, cache=None, cache_index_B=None) -> (out_BLD, cache')

  ids_BL:   document id of every token: a query sees keys of its own document only (None: one document);
  extra:    `ExtraKV` keys/values that the queries see beside the segment's own (memory as context), with an
            optional score bias per query and extra key (M+'s retriever gate);
  cache:    {'k', 'v': [B, C, kv_heads, head_dim]}: the keys/values of the current segment so far. The L new
            tokens of row b go to cache positions cache_index_B[b] + 0..L-1 and see the cache up to their own
            position (rotary tables `cos`, `sin` then [B, L, E]). Without a cache, keys are the L tokens, causal.

  `model.attention_kernel` picks the kernel of the plain causal case (no cache, no extra keys, `causal_attention`):
  'xla', 'cudnn' or 'splash'; with a cache or extra keys (decoding, memory as context) `attend` runs on every
  backend.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD, cos, sin, ids_BL=None, extra=None, cache=None, cache_index_B=None):
    c, dt = self.cfg, self.cfg.dtype
    B, L, _ = x_BLD.shape
    q_BLHE = dense((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), "q_proj", dt)(x_BLD)
    k_BLKE = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "k_proj", dt)(x_BLD)
    v_BLKE = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "v_proj", dt)(x_BLD)
    q_BLHE = nn.with_logical_constraint(apply_rope(q_BLHE, cos, sin), ("batch", "length", "heads", "head_dim"))
    k_BLKE = nn.with_logical_constraint(apply_rope(k_BLKE, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
    if cache is None and extra is None:
      out_BLHE = causal_attention(q_BLHE, k_BLKE, v_BLKE, ids_BL, c.attention_kernel)
    else:
      out_BLHE, cache = self._general(q_BLHE, k_BLKE, v_BLKE, ids_BL, extra, cache, cache_index_B)
    out_BLHE = nn.with_logical_constraint(out_BLHE, ("batch", "length", "heads", "head_dim"))
    return dense(c.d_model, ("heads", "head_dim", "embed"), "o_proj", dt, n_in=2)(out_BLHE), cache

  def _general(self, q_BLHE, k_BLKE, v_BLKE, ids_BL, extra, cache, cache_index_B):
    """Attention over [extra ; the segment's keys or the cache] with an explicit mask (`attend`)."""
    dt = self.cfg.dtype
    B, L = q_BLHE.shape[:2]
    if cache is None:
      k_BSKE, v_BSKE = k_BLKE, v_BLKE
      mask_BLS = jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool)), (B, L, L))
      if ids_BL is not None:
        mask_BLS = mask_BLS & (ids_BL[:, :, None] == ids_BL[:, None, :])
    else:
      put = jax.vmap(lambda buf, new, i: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), i, 0))
      cache = {"k": put(cache["k"], k_BLKE, cache_index_B), "v": put(cache["v"], v_BLKE, cache_index_B)}
      k_BSKE, v_BSKE = cache["k"].astype(dt), cache["v"].astype(dt)
      query_pos_BL = cache_index_B[:, None] + jnp.arange(L)
      mask_BLS = jnp.arange(k_BSKE.shape[1])[None, None, :] <= query_pos_BL[:, :, None]
    if extra is not None:
      k_BSKE = jnp.concatenate([extra.k_BMKE.astype(dt), k_BSKE], axis=1)
      v_BSKE = jnp.concatenate([extra.v_BMKE.astype(dt), v_BSKE], axis=1)
      seen_BLM = jnp.ones((B, L, extra.k_BMKE.shape[1]), bool) if extra.mask_BLM is None else extra.mask_BLM
      mask_BLS = jnp.concatenate([seen_BLM, mask_BLS], axis=-1)
      if extra.bias_BLM is not None:
        bias_BLS = jnp.pad(extra.bias_BLM, ((0, 0), (0, 0), (0, mask_BLS.shape[-1] - extra.bias_BLM.shape[-1])))
        return attend(q_BLHE, k_BSKE, v_BSKE, mask_BLS, bias_BLS), cache
    return attend(q_BLHE, k_BSKE, v_BSKE, mask_BLS), cache


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
