"""Model FLOPs per token from the config, and model FLOPs utilisation (MFU).

A FLOP here is one multiply or one add: a matmul [m, k] x [k, n] is 2mkn FLOPs. Only matmuls and attention are
counted (norms, rotary embeddings, activations, softmax and the loss are elementwise, a few percent at most);
a training step is forward + backward = 3 x forward (the backward computes two matmuls per forward matmul);
recomputation under remat, duplicated work and padding are not model FLOPs and are not counted.

Letters: D d_model, H heads, K kv heads, E = D / H, F d_ff, V vocab, n layers, L tokens per segment (the whole
input when it is one segment), X positions the layers process per segment (L, or L + 2M for `rmt`'s M memory
tokens on each side, or L + k + j + 3 for `hmt`), S slot_dim, R memory heads. Forward FLOPs per token:

    layers      n * X/L * (2 D E (2H + 2K)                q, k, v, o projections
                           + 4 X D                         scores and values over all X keys (dense attention
                                                           computes the whole X x X block; the causal mask
                                                           does not remove work)
                           + 6 D F)                        SwiGLU: gate, up, down
    logits      2 D V
    lm2         per memory layer, N slots:
                  8 D S                                    read q, output gate, o; write u (the write's
                                                           queries are the read's, token-shifted)
                  + 8 N S                                  read scores and values; write scores and U
                  + 12 N S^2 / L                           per segment: slot keys, values (4 N S^2) and the
                                                           input and forget gates on [M, U] (8 N S^2)
                  + 2 D R                                  with memory.write_gate: each token's write strength
    hierarchical  per memory layer: lm2 with N0 general slots, plus
                  10 D S                                   route (read and write), q, o, u
                  + 4 D                                    deep gate, salience
                  + 4 k N1 S + 2 k S                       top-k banks of N1 slots read; the k reads mixed
                  + 2 x 2 K S                              bank scores, read and write; with product keys
                                                           2 x 2 sqrt(K) S + 2 K (the balance loss's routing
                                                           probabilities, read only)
    rmt         the layers' X = L + 2M (above); nothing else
    armt        rmt's X, plus per associative layer, K key_dim, F = 6K features:
                  X/L * (2 D K + 2 F D + 2 F)              every position's read: q, A^T phi(q), z . phi(q)
                  + M/L * (2 D K + 2 D^2 + 2 D + 4 F D + 4 F)   per segment, the M write tokens: k, v, beta,
                                                           the old value and its normaliser, A and z updates
    hmt         the layers' X = L + k + j + 3 (k sensory, j summary tokens; above), plus per segment (/ L) for a
                cache of N: 2 D^2 (N + 1) (recall query and keys) + 4 N D (scores, mix) + 4 N D with learned
                eviction (the scorer before eviction and in its loss)
    memoryllm   per memory layer, N pool tokens, K written per segment, G kv heads:
                  4 N H E                                  the segment's attention over the pool
                  + 4 D G E (N + K) / L                    pool keys and values: the read's N, the update
                                                           prefix's K, per segment
                  + 4 (L + K) H E + 2 D E H + 6 D F        the self-update pass: attention over [the K newest ;
                                                           the segment], o, SwiGLU (its q, k, v projections are
                                                           the first pass's, on the same input: not counted)
    mplus       memoryllm, plus per memory layer, C store tokens, R retriever width:
                  4 C H E + 4 D G E C / L                  attention over the store (dense: the top-r mask does
                                                           not remove work), its keys and values
                  + 2 D R + 2 D R C / L + 2 R C            retriever: query, keys, scores
    titans      per memory layer, memory MLP widths d_0 = D / R .. d_depth per head (R heads), M = sum_i 2 d_i d_{i+1},
                chunks of c tokens, P persistent tokens:
                  6 D^2 + 2 D + 6 D R / c                  q, k, v; each chunk's mean input and its rates
                  + R M                                    the read M_W(q)
                  + R (3M - 2 d_0 d_1)                     the chunk's inner gradient: forward, weight gradients,
                                                           input gradients of every MLP layer but the first
                mac  + 4 D K E + 4 (P + L) H E             the reads' keys and values, attention over them
                mag  + 4 D^2                               gate, o;   mal  + 2 D^2  o

`train_flops_per_token = 3 x` the sum. MFU = train_flops_per_token x tokens/s / peak FLOP/s, where the peak is
`config.train.peak_flops` or, when that is 0, measured by `measure_peak_flops` (a matmul in the model's dtype,
the number `python -m benchmarks.matmul_peak` prints).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lm2_jax.model.config import ModelConfig


def _lm2_memory(d: int, s: int, n: int, length: int, m) -> float:
  return 8 * d * s + 8 * n * s + 12 * n * s * s / length + (2 * d * m.num_heads if m.write_gate else 0)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float] | None:
  """Forward FLOPs per token by part ('layers', 'logits', 'memory') of a model reading rows of `seq_len`
  tokens (module docstring); None for a memory kind without a formula yet."""
  d, h, kv, e = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  length = min(seq_len, cfg.segment_len)
  m = cfg.memory
  x = length  # positions the layers process per segment
  if m.kind in ("rmt", "armt"):
    x += 2 * m.num_slots
  elif m.kind == "hmt":
    x += m.sensory_tokens + m.summary_tokens + 3
  per_position = 2 * d * e * (2 * h + 2 * kv) + 4 * x * h * e + 6 * d * cfg.d_ff
  parts = {"layers": cfg.num_layers * x / length * per_position, "logits": 2.0 * d * cfg.vocab_size,
           "memory": 0.0}
  if m.kind == "lm2":
    parts["memory"] = len(m.layers) * _lm2_memory(d, m.slot_dim, m.num_slots, length, m)
  elif m.kind == "hierarchical":
    s, k = m.slot_dim, m.top_k
    routing = 2 * (math.isqrt(m.num_banks) if m.product_keys else m.num_banks) * s
    balance = 2 * m.num_banks if m.product_keys else 0  # the product of the halves' probabilities, read only
    deep = 10 * d * s + 4 * d + 4 * k * m.bank_slots * s + 2 * k * s + 2 * routing + balance
    parts["memory"] = len(m.layers) * (_lm2_memory(d, s, m.general_slots, length, m) + deep)
  elif m.kind == "armt":
    k, f, M = m.key_dim, m.feature_dim, m.num_slots
    read = 2 * d * k + 2 * f * d + 2 * f
    write = 2 * d * k + 2 * d * d + 2 * d + 4 * f * d + 4 * f
    parts["memory"] = len(m.layers) * (x * read + M * write) / length
  elif m.kind == "hmt":
    n = m.cache_size
    parts["memory"] = (2 * d * d * (n + 1) + 4 * n * d + (4 * n * d if m.eviction == "learned" else 0)) / length
  elif m.kind in ("memoryllm", "mplus"):
    n, k, kv_proj = m.num_slots, m.update_tokens, 2 * d * kv * e  # kv_proj: a token's key (or value) projection
    per_layer = (4 * n * h * e + 2 * kv_proj * (n + k) / length
                 + 4 * (length + k) * h * e + 2 * d * e * h + 6 * d * cfg.d_ff)
    if m.kind == "mplus":
      c, r = m.ltm_capacity, m.retriever_dim
      per_layer += 4 * c * h * e + 2 * kv_proj * c / length + 2 * d * r + 2 * d * r * c / length + 2 * r * c
    parts["memory"] = len(m.layers) * per_layer
  elif m.kind == "titans":
    widths = m.dims
    mlp = sum(2 * a * b for a, b in zip(widths, widths[1:]))
    per_layer = (6 * d * d + 2 * d + 6 * d * m.num_heads / m.chunk_size + m.num_heads * mlp
                 + m.num_heads * (3 * mlp - 2 * widths[0] * widths[1]))
    per_layer += {"mac": 4 * d * kv * e + 4 * (m.persistent_tokens + length) * h * e, "mag": 4 * d * d,
                  "mal": 2 * d * d}[m.variant]
    parts["memory"] = len(m.layers) * per_layer
  elif m.kind not in ("none", "rmt"):
    return None  # a kind without a formula (a new one): the trainer then reports tokens/s without MFU
  return parts


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float | None:
  """Model FLOPs of one training step per token: 3 x forward (forward + backward); None for a memory kind without
  a formula."""
  parts = forward_flops_per_token(cfg, seq_len)
  return None if parts is None else 3 * sum(parts.values())


def measure_peak_flops(size: int = 1024, dtype=jnp.float32, repeats: int = 10) -> float:
  """FLOP/s of a [size, size] x [size, size] matmul on the default device, best of `repeats` after warm-up: the
  attainable matmul peak MFU is measured against."""
  return measure_matmul_flops(size, size, size, dtype, repeats)


def measure_matmul_flops(m: int, k: int, n: int, dtype=jnp.float32, repeats: int = 10) -> float:
  """FLOP/s of a jitted [m, k] x [k, n] matmul on the default device, best of `repeats` after warm-up."""
  a = jax.random.normal(jax.random.key(0), (m, k), dtype)
  b = jax.random.normal(jax.random.key(1), (k, n), dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  return 2 * m * k * n / best_seconds(lambda: jax.block_until_ready(matmul(a, b)), repeats)


def best_seconds(run: Callable[[], Any], repeats: int = 10) -> float:
  """Wall seconds of the fastest of `repeats` calls of `run` (which must block until done), after one warm-up."""
  run()
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - t0)
  return best
