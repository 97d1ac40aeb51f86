"""Titans neural memory (Behrouz et al. 2025, arXiv 2501.00663): an MLP whose weights are the memory, trained at
test time by gradient steps on its own prediction error, with momentum (surprise) and forgetting.

Letters: B batch, L positions in the segment, D d_model, R memory heads (num_heads), E = D / R, c chunk_size,
N = ceil(L / c) chunks, P persistent tokens, K kv heads and F head_dim of self-attention.

memory    per memory layer and head an MLP  M_W(x) = W_d phi(... phi(W_2 phi?(W_1 x)))  of `depth` layers
          (dims E -> xE -> ... -> E with x = expansion; depth 1: a linear map E -> E), phi = gelu. Its weights
          are per-row state:  W = W0 + dW,  W0 a learned parameter (the memory every row starts from), the
          state {dW_i, S_i} float32 (also under bfloat16 compute), zero in a fresh memory.
keys      k_t = l2norm(h_t Wk), v_t = h_t Wv, q_t = l2norm(h_t Wq)   per head, float32 (h: the layer's normed input)
chunks    the segment splits into chunks of c tokens. For chunk n (tokens T_n, write weights w_t in {0, 1}):
            g_n     = grad_W  (1/c) sum_{t in T_n} w_t ||M_W(k_t) - v_t||^2    at W = W_{n-1}, all tokens at once
            g_n    <- g_n * min(1, tau / ||g_n||)        per head, the norm over all its weight matrices
            eta_n, theta_n, alpha_n = sigmoid(mean_{t in T_n} w_t h_t  W_{eta,theta,alpha} + b)    per head
            S_n     = eta_n S_{n-1} - theta_n g_n        momentum: the surprise
            W_n     = (1 - alpha_n) W_{n-1} + S_n        forgetting (weight decay towards 0)
          in the state:  dW_n = (1 - alpha_n) dW_{n-1} - alpha_n W0 + S_n. A chunk with no written token leaves
          S and W as they were. ||S|| <= theta tau / (1 - eta) and ||W|| <= max(||W0||, ||S|| / alpha): updates
          stay bounded whatever the data (initial rates eta 0.88, theta 0.018, alpha 0.018).
read      token t of chunk n reads  r_t = rms(M_{W_{n-1}}(q_t))  (the memory as updated by the chunks before its
          own; W_{-1} the memory that entered the segment): no token reads what its own chunk or a later one wrote.
          rms(x) = x / sqrt(mean(x^2) + 1e-6) per head: the read's size does not grow with the weights' (the
          projections after it learn the scale).
          The state after the last chunk is the next segment's.
variants  mac  memory as context: r_t and P learned persistent keys/values become extra keys/values of the
               layer's self-attention (out.kv): [p_1..p_P ; r_1 Wk', r_1 Wv' .. r_L Wk', r_L Wv'], query t sees
               all persistent ones and the retrieved ones of tokens s <= t of its own document.
          mag  memory as gate: residual  sigmoid(h_t Wg + bg) * (r_t Wo)  beside the segment-local attention
               (attention never crosses a segment: a block-sliding window). The paper multiplies the attention
               output by the memory's; here the gate scales the memory branch, which is added beside attention.
          mal  memory as a layer: residual r_t Wo is added to the stream BEFORE the layer's attention, which reads
               RMSNorm(x + r Wo) (`residual_before_attention`; the decoder applies it), so each memory layer is
               [memory sublayer ; attention ; MLP], the paper's [memory layer ; SWA] per layer.

Backward (first order): the training gradient treats W inside the inner gradient g_n = grad L(W_{n-1}; k, v) as
a constant (stop_gradient), as first-order MAML does: the forward is exactly the equations above and the
gradient still reaches k, v (what is written), the rates, W0 and everything read, but not through the Hessian of
the inner loss. dW_n / dW_{n-1} is then (1 - alpha_n) I (and eta_n through S), a contraction, so the gradient
through many chunks cannot grow. With the full second-order term (the Jacobian (1 - alpha) I - theta H of
the update, H the inner loss's Hessian) the training gradient norm grew to 1.8e6 within 550 steps at depth 4 on
4K-token rows (benchmarks/titans_stability.py; benchmarks/titans_stability_d32_second_order.log).

Documents (protocol.Documents): the tokens of the memory's document read and write the carried memory; the
others read a fresh memory into which only the segment's last document writes (its earlier chunks update it for
its later tokens); a document that starts and ends inside one segment reads the fresh memory without
in-segment updates. MAC's retrieved keys are also restricted to the query's document.

Cached decoding: a token's read depends on the chunks of the segment before it, which a cache of attention keys
does not hold; `decode_by_segment` tells lm2_jax.sessions.decoding to run the segment so far (the ordinary
forward, from the memory that entered it) for each new token instead of `extend`.

Differences from the paper / titans-pytorch: eta, theta, alpha per chunk and head (from the chunk's mean input),
keys and queries L2-normalised, the gradient clipped per head, the memory weights per head E x xE (titans-pytorch:
one head of width D, expansion 4).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.model.config import ModelConfig, as_dict, check, positive_int
from lm2_jax.model.layers import INIT_STD, dense
from lm2_jax.model.memory import parse_layers, register
from lm2_jax.model.memory.protocol import Documents, ExtraKV, LayerMemory, MemoryOut

VARIANTS = ("mac", "mag", "mal")


@dataclasses.dataclass(frozen=True)
class TitansMemoryConfig:
  kind: str
  layers: tuple[int, ...]
  variant: str             # mac | mag | mal
  num_heads: int           # R
  head_dim: int            # E = d_model / R
  depth: int               # layers of the memory MLP, 1-4
  expansion: int           # hidden width of the memory MLP, in multiples of E
  chunk_size: int          # c, tokens per memory update
  persistent_tokens: int   # P (mac)
  max_update_norm: float   # tau

  @property
  def dims(self) -> tuple[int, ...]:
    """Widths of the memory MLP: E -> xE -> ... -> E."""
    return (self.head_dim, *((self.expansion * self.head_dim,) * (self.depth - 1)), self.head_dim)

  @classmethod
  def parse(cls, cfg: Any, *, num_layers: int, d_model: int) -> "TitansMemoryConfig":
    v = as_dict(cfg, "model.memory")
    f = "model.memory"
    variant = v.get("variant", "mac")
    check(variant in VARIANTS, f"{f}.variant", variant, f"use one of {VARIANTS}")
    num_heads = positive_int(v, "num_heads", f) if "num_heads" in v else 4
    check(d_model % num_heads == 0, f"{f}.num_heads", num_heads, f"must divide d_model={d_model}")
    depth = v.get("depth", 2)
    check(isinstance(depth, int) and 1 <= depth <= 4, f"{f}.depth", depth, "must be an integer in 1..4")
    tau = v.get("max_update_norm", 1.0)
    check(isinstance(tau, (int, float)) and tau > 0, f"{f}.max_update_norm", tau, "must be > 0")
    persistent = v.get("persistent_tokens", 4)
    check(isinstance(persistent, int) and persistent >= 0, f"{f}.persistent_tokens", persistent, "must be >= 0")
    check(not v.get("share_across_layers", False), f"{f}.share_across_layers", True,
          "only memory kind 'lm2' shares one memory across layers; set it to False for 'titans'")
    ints = {n: positive_int({n: v.get(n, d)}, n, f) for n, d in (("expansion", 2), ("chunk_size", 32))}
    return cls(kind=v["kind"], layers=parse_layers(v.get("layers", "all"), num_layers), variant=variant,
               num_heads=num_heads, head_dim=d_model // num_heads, depth=depth, persistent_tokens=persistent,
               max_update_norm=float(tau), **ints)


def memory_mlp(ws, x_BRTE):
  """M_W(x) per row and head: ws[i] [B, R, in, out], x [B, R, T, E] -> [B, R, T, E]."""
  for i, w in enumerate(ws):
    if i:
      x_BRTE = jax.nn.gelu(x_BRTE)
    x_BRTE = jnp.einsum("brti,brio->brto", x_BRTE, w)
  return x_BRTE


def chunk_update(w0, dw, s, k_BRcE, v_BRcE, w_Bc, eta_BR, theta_BR, alpha_BR, tau):
  """One chunk's write (module docstring): -> (dW', S', the gradient's norm before clipping [B, R])."""
  c = k_BRcE.shape[2]

  def loss(ws):
    err = memory_mlp(ws, k_BRcE) - v_BRcE
    return jnp.sum(w_Bc[:, None, :, None] * err * err) / c

  # First order: W is a constant inside the inner gradient (module docstring, "Backward").
  g = jax.grad(loss)([jax.lax.stop_gradient(a[None] + b) for a, b in zip(w0, dw)])
  # A chunk with no written token has g = 0; sqrt's derivative at 0 would turn its zero cotangent into NaN.
  sq_BR = sum(jnp.sum(x * x, axis=(-2, -1)) for x in g)
  nonzero_BR = sq_BR > 0
  norm_BR = jnp.where(nonzero_BR, jnp.sqrt(jnp.where(nonzero_BR, sq_BR, 1.0)), 0.0)
  clip_BR = jnp.minimum(1.0, tau / jnp.maximum(norm_BR, 1e-12))
  col = lambda x_BR: x_BR[..., None, None]
  new_s = [col(eta_BR) * si - col(theta_BR * clip_BR) * gi for si, gi in zip(s, g)]
  new_dw = [col(1 - alpha_BR) * di - col(alpha_BR) * a[None] + si for di, a, si in zip(dw, w0, new_s)]
  return new_dw, new_s, norm_BR


def _rms(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _l2norm(x):
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)


@register("titans")
class TitansMemory(LayerMemory):
  """step = chunked read-and-write (module docstring); statistics: `surprise` [B], the mean gradient norm of the
  written chunks (before clipping)."""
  cfg: ModelConfig

  Config = TitansMemoryConfig
  decode_by_segment = True

  @property
  def emits_kv(self) -> bool:
    return self.cfg.memory.variant == "mac"

  @property
  def residual_before_attention(self) -> bool:
    return self.cfg.memory.variant == "mal"

  @staticmethod
  def init_state(mcfg: TitansMemoryConfig, batch: int) -> dict[str, jax.Array]:
    R, dims = mcfg.num_heads, mcfg.dims
    zeros = lambda i: jnp.zeros((batch, R, dims[i], dims[i + 1]), jnp.float32)
    return {**{f"w{i}": zeros(i) for i in range(mcfg.depth)}, **{f"s{i}": zeros(i) for i in range(mcfg.depth)}}

  @staticmethod
  def state_axes(mcfg: TitansMemoryConfig) -> dict[str, tuple[str, ...]]:
    return {f"{n}{i}": ("batch", None, None, None) for n in "ws" for i in range(mcfg.depth)}

  def setup(self):
    c, m, dt = self.cfg, self.cfg.memory, self.cfg.dtype
    R, E = m.num_heads, m.head_dim
    for name in ("q_proj", "k_proj", "v_proj"):
      setattr(self, name, dense((R, E), ("embed", "heads", "head_dim"), name, dt))
    xavier = lambda fan_in: nn.initializers.normal(1 / np.sqrt(fan_in))
    self.w0 = [self.param(f"init_w{i}", nn.with_logical_partitioning(xavier(m.dims[i]), (None, None, None)),
                          (R, m.dims[i], m.dims[i + 1]), jnp.float32) for i in range(m.depth)]
    rate = lambda name, b: dense(R, ("embed", None), name, jnp.float32, use_bias=True,
                                 bias_init=nn.initializers.constant(b))
    self.eta, self.theta, self.alpha = rate("eta", 2.0), rate("theta", -4.0), rate("alpha", -4.0)
    if m.variant == "mac":
      kv = ((c.num_kv_heads, c.head_dim), ("heads", None, "kv_heads", "head_dim"))
      self.kv_k, self.kv_v = (dense(*kv, name, dt, n_in=2) for name in ("kv_k", "kv_v"))
      persist = nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), (None, "kv_heads", "head_dim"))
      shape = (m.persistent_tokens, c.num_kv_heads, c.head_dim)
      self.persist_k, self.persist_v = (self.param(n, persist, shape, jnp.float32) for n in ("persist_k", "persist_v"))
    else:
      self.o = dense(c.d_model, ("heads", "head_dim", "embed"), "o_proj", dt, n_in=2)
    if m.variant == "mag":
      self.gate = dense(c.d_model, ("embed", None), "gate", dt, use_bias=True)

  def step(self, state, h_BLD, read_BL=None, write_BL=None, write_state=None):
    del read_BL  # every token reads; the document rules pick whose read each token uses
    if write_state is not None:
      raise ValueError("memory kind 'titans' keeps a memory per layer (no share_across_layers)")
    m = self.cfg.memory
    B, L, _ = h_BLD.shape
    c, R = m.chunk_size, m.num_heads
    N = -(-L // c)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, N * c - L)) + ((0, 0),) * (x.ndim - 2))
    q, k, v = (pad(p(h_BLD).astype(jnp.float32)) for p in (self.q_proj, self.k_proj, self.v_proj))
    q, k = _l2norm(q), _l2norm(k)
    w_BL = jnp.ones((B, L), jnp.float32) if write_BL is None else write_BL.astype(jnp.float32)
    w_BNc = pad(w_BL).reshape(B, N, c)
    count_BN = w_BNc.sum(-1)
    mean_h_BND = jnp.einsum("bnc,bncd->bnd", w_BNc, pad(h_BLD.astype(jnp.float32)).reshape(B, N, c, -1))
    mean_h_BND = mean_h_BND / jnp.maximum(count_BN, 1.0)[..., None]
    eta, theta, alpha = (nn.sigmoid(p(mean_h_BND)) for p in (self.eta, self.theta, self.alpha))  # [B, N, R]
    chunks = lambda x_BLRE: x_BLRE.reshape(B, N, c, R, -1).transpose(1, 0, 3, 2, 4)  # [N, B, R, c, E]
    xs = (chunks(q), chunks(k), chunks(v), w_BNc.swapaxes(0, 1), eta.swapaxes(0, 1), theta.swapaxes(0, 1),
          alpha.swapaxes(0, 1), count_BN.swapaxes(0, 1) > 0)
    w0 = list(self.w0)

    def one_chunk(carry, x):
      dw, s = carry
      q_BRcE, k_BRcE, v_BRcE, w_Bc, eta_BR, theta_BR, alpha_BR, written_B = x
      read_BRcE = _rms(memory_mlp([a[None] + b for a, b in zip(w0, dw)], q_BRcE))
      new_dw, new_s, norm_BR = chunk_update(w0, dw, s, k_BRcE, v_BRcE, w_Bc, eta_BR, theta_BR, alpha_BR,
                                            m.max_update_norm)
      keep = lambda new, old: [jnp.where(written_B[:, None, None, None], a, b) for a, b in zip(new, old)]
      return (keep(new_dw, dw), keep(new_s, s)), (read_BRcE, norm_BR.mean(-1) * written_B)

    init = ([state[f"w{i}"] for i in range(m.depth)], [state[f"s{i}"] for i in range(m.depth)])
    (dw, s), (read_NBRcE, norm_NB) = jax.lax.scan(one_chunk, init, xs)
    read_BLRE = read_NBRcE.transpose(1, 0, 3, 2, 4).reshape(B, N * c, R, -1)[:, :L].astype(self.cfg.dtype)
    new_state = {**{f"w{i}": a for i, a in enumerate(dw)}, **{f"s{i}": a for i, a in enumerate(s)}}
    surprise_B = norm_NB.sum(0) / jnp.maximum((count_BN > 0).sum(-1), 1)
    return self._output(h_BLD, read_BLRE, jax.lax.stop_gradient(surprise_B)), new_state

  def read_only(self, state, h_BLD) -> MemoryOut:
    raise NotImplementedError(
        "memory kind 'titans': a token's read depends on the tokens of its segment before it, which a decoding "
        "cache does not hold; decode with lm2_jax.sessions.decoding, which runs the segment so far instead "
        "(decode_by_segment)")

  def _output(self, h_BLD, read_BLRE, surprise_B) -> MemoryOut:
    m, stats = self.cfg.memory, {"surprise": surprise_B}
    if m.variant == "mag":
      return MemoryOut(residual_BLD=nn.sigmoid(self.gate(h_BLD)) * self.o(read_BLRE), stats=stats)
    if m.variant == "mal":
      return MemoryOut(residual_BLD=self.o(read_BLRE), stats=stats)
    B, L = h_BLD.shape[:2]
    P, dt = m.persistent_tokens, self.cfg.dtype
    persist = lambda p: jnp.broadcast_to(p.astype(dt), (B, *p.shape))
    k_BMKF = jnp.concatenate([persist(self.persist_k), self.kv_k(read_BLRE)], axis=1)
    v_BMKF = jnp.concatenate([persist(self.persist_v), self.kv_v(read_BLRE)], axis=1)
    mask_BLM = jnp.concatenate([jnp.ones((B, L, P), bool), jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool)),
                                                                            (B, L, L))], axis=-1)
    return MemoryOut(kv=ExtraKV(k_BMKF, v_BMKF, mask_BLM), stats=stats)

  def __call__(self, state, h_BLD, docs: Documents | None = None, write_state=None):
    """LayerMemory's document rules; MAC's retrieved keys are then also limited to the query's document (the
    merged keys are [persistent ; retrieved] of the carried memory, then of the fresh one)."""
    out, new_state = super().__call__(state, h_BLD, docs, write_state)
    if docs is None or out.kv is None:
      return out, new_state
    B, L = docs.ids_BL.shape
    same_BLL = docs.ids_BL[:, :, None] == docs.ids_BL[:, None, :]
    keep_BLM = jnp.concatenate([jnp.ones((B, L, self.cfg.memory.persistent_tokens), bool), same_BLL] * 2, axis=-1)
    return out.replace(kv=out.kv.replace(mask_BLM=out.kv.mask_BLM & keep_BLM)), new_state
