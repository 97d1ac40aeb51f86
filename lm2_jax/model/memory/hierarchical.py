"""Hierarchical memory: a small general level every token reads, and many banks of which a token reads top-k.

Letters: B batch, L positions in the segment, D d_model, S slot_dim, R heads, E = S / R, N0 general slots,
K banks (num_banks), N1 slots per bank (bank_slots), k banks read per token (top_k), m tokens written per
segment (write_tokens).

general level  an LM2 memory of N0 slots (lm2_jax.model.memory.lm2): read by every token, gated update.
routing        r_t = h_t Wr; bank scores s_tb = r_t . key_b / sqrt(|r|); token t reads its top-k banks with
               weights w = softmax(top-k scores). With `product_keys`, K = P^2 and key_(i,j) = [key1_i, key2_j]:
               the top-k of the K scores s1_i + s2_j are found among the k x k pairs of each half's top-k, so
               choosing banks costs O(sqrt(K)) per token instead of O(K) (the balance loss's mean routing
               probability per bank is still O(K) per token, as a product of the halves' softmaxes).
deep read      per chosen bank, attention of the token's query over that bank's slots (the slots are both keys and
               values, heads split S; written slots are bounded by tanh, so they are not normalised), mixed over
               banks by w:
                 read_t = sum_b w_tb sum_n softmax_n(q_t . M_bn / sqrt(E)) M_bn;   deep_t = read_t Wo
               and gated in: delta_t = general_t + g_t deep_t, g_t = sigmoid(h_t Wg + bg). Per token the deep
               read touches k * N1 slots, whatever K is: capacity K * N1 grows without growing the read.
skipping       tokens with g_t < skip_threshold skip the deep read (their deep contribution is dropped; when no
               token of the batch needs it, the deep read is not computed at all). aux reports the fraction of
               tokens and of banks touched.
write          after the segment: the general level updates with LM2's gates; with x_t = h_t + h_{t-1} (LM2's
               token shift), the m most salient tokens (salience s_t = x_t Ws) each write
               tanh(x_t Wu) * sigmoid(s_t) into the bank x_t routes to first,
               replacing that bank's least-read slot (the next least-read for a second token into the same bank).
               A replaced slot's read count restarts at its bank's mean, so a new entry is not the first evicted.
balance loss   switch-style, K * sum_b f_b P_b (f_b: share of top-k picks, P_b: mean routing probability), added
               to the training loss with weight `balance_loss_weight`; it is 1 when routing is uniform.

Causality: routing and reads of token t depend on h_t and on memory written by earlier segments only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.model.config import ModelConfig, as_dict, check, positive_int
from lm2_jax.model.layers import dense
from lm2_jax.model.memory import parse_layers, register
from lm2_jax.model.memory.lm2 import LM2Memory, LM2MemoryConfig, token_shift
from lm2_jax.model.memory.protocol import MemoryOut, ReadWriteMemory


@dataclasses.dataclass(frozen=True)
class HierarchicalMemoryConfig:
  kind: str
  layers: tuple[int, ...]
  num_heads: int
  slot_dim: int
  read_decay: float
  general_slots: int          # N0
  num_banks: int              # K
  bank_slots: int             # N1
  top_k: int                  # banks read per token
  write_tokens: int           # m, tokens written into the banks per segment
  skip_threshold: float       # deep-read gate below which a token skips the deep read (0: never skip)
  balance_loss_weight: float
  product_keys: bool          # route with product keys (num_banks must be a square)
  capacity_factor: float      # per-bank token capacity, as a multiple of the even share L * top_k / num_banks
  forget_bias: float = 1.0    # the general level's (LM2MemoryConfig)
  write_gate: bool = False

  @property
  def general(self) -> LM2MemoryConfig:
    return LM2MemoryConfig(kind="lm2", layers=self.layers, num_slots=self.general_slots, num_heads=self.num_heads,
                           slot_dim=self.slot_dim, read_decay=self.read_decay, forget_bias=self.forget_bias,
                           write_gate=self.write_gate)

  @classmethod
  def parse(cls, cfg: Any, *, num_layers: int, d_model: int) -> "HierarchicalMemoryConfig":
    v = as_dict(cfg, "model.memory")
    f = "model.memory"
    for name in ("general_slots", "num_banks", "bank_slots", "top_k", "write_tokens"):
      check(name in v, f"{f}.{name}", None, "required for memory kind 'hierarchical'")
    ints = {n: positive_int(v, n, f) for n in ("general_slots", "num_banks", "bank_slots", "top_k", "write_tokens")}
    general = LM2MemoryConfig.parse({**v, "num_slots": ints["general_slots"]}, num_layers=num_layers,
                                    d_model=d_model)
    check(ints["top_k"] <= ints["num_banks"], f"{f}.top_k", ints["top_k"],
          f"must be <= num_banks={ints['num_banks']}")
    check(ints["write_tokens"] <= ints["bank_slots"], f"{f}.write_tokens", ints["write_tokens"],
          f"must be <= bank_slots={ints['bank_slots']} (all writes of a segment may go to one bank)")
    check(not v.get("share_across_layers", False), f"{f}.share_across_layers", True,
          "only memory kind 'lm2' shares one memory across layers; set it to False for 'hierarchical'")
    product = v.get("product_keys", False)
    check(isinstance(product, bool), f"{f}.product_keys", product, "must be True or False")
    if product:
      side = math.isqrt(ints["num_banks"])
      check(side * side == ints["num_banks"], f"{f}.num_banks", ints["num_banks"],
            "product keys need a square number of banks (e.g. 256, 1024, 4096)")
      check(ints["top_k"] <= side, f"{f}.top_k", ints["top_k"], f"must be <= sqrt(num_banks)={side} with product keys")
      check(general.slot_dim % 2 == 0, f"{f}.slot_dim", general.slot_dim, "must be even with product keys")
    threshold = v.get("skip_threshold", 0.0)
    check(isinstance(threshold, (int, float)) and 0 <= threshold < 1, f"{f}.skip_threshold", threshold,
          "must be in [0, 1) (0: every token reads the deep level)")
    factor = v.get("capacity_factor", 2.0)
    check(isinstance(factor, (int, float)) and factor > 0, f"{f}.capacity_factor", factor,
          "must be > 0 (2: a bank takes up to twice its even share of a segment's picks)")
    weight = v.get("balance_loss_weight", 0.01)
    check(isinstance(weight, (int, float)) and weight >= 0, f"{f}.balance_loss_weight", weight, "must be >= 0")
    return cls(kind=v["kind"], layers=parse_layers(v["layers"], num_layers), num_heads=general.num_heads,
               slot_dim=general.slot_dim, read_decay=general.read_decay, skip_threshold=float(threshold),
               balance_loss_weight=float(weight), product_keys=product,
               capacity_factor=float(factor), forget_bias=general.forget_bias, write_gate=general.write_gate, **ints)


# Up to this many queries per bank the slots' gradient is a fused multiply-add over them (below); above it, two
# batched matmuls. Measured on CPU at B=8, N1=16, 4 heads of 32: fused 0.23 ms against 0.84 at C=5 (62 banks),
# 0.31 against 0.48 at C=43, 1.62 against 0.27 at C=128.
_FUSED_SLOT_GRADIENT_MAX_C = 48


@jax.custom_vjp
def bank_attention(q_BKCRE, slots_BKNRE):
  """Each bank's C dispatched queries attend over its N1 slots (keys = values), per head:
  p = softmax_n(q . M_n / sqrt(E)), read = sum_n p M_n. -> (read [B, K, C, R, E], p [B, K, R, C, N1] float32).

  The backward is written out so that the slots' gradient, a sum over each bank's C queries, is a fused
  multiply-add over c when C is small, instead of B*K*R tiny batched matmuls (XLA:CPU hands those to Eigen, which
  spent more time on them than on the rest of the deep read):
    dp = dread . M,  ds = p (dp - sum_n p dp) / sqrt(E),  dq = sum_n ds M,  dM = sum_c p dread + ds q."""
  return _bank_attention_fwd(q_BKCRE, slots_BKNRE)[0]


def _bank_attention_fwd(q_BKCRE, slots_BKNRE):
  e = q_BKCRE.shape[-1]
  scores = jnp.einsum("bkcre,bknre->bkrcn", q_BKCRE, slots_BKNRE, preferred_element_type=jnp.float32)
  p_BKRCN = jax.nn.softmax(scores / np.sqrt(e), axis=-1)
  read_BKCRE = jnp.einsum("bkrcn,bknre->bkcre", p_BKRCN.astype(slots_BKNRE.dtype), slots_BKNRE)
  return (read_BKCRE, p_BKRCN), (q_BKCRE, slots_BKNRE, p_BKRCN)


def _bank_attention_bwd(residuals, cotangents):
  q_BKCRE, slots_BKNRE, p_BKRCN = residuals
  dread_BKCRE, dp_BKRCN = cotangents
  e, C = q_BKCRE.shape[-1], q_BKCRE.shape[2]
  f32 = jnp.float32
  dp_BKRCN = dp_BKRCN + jnp.einsum("bkcre,bknre->bkrcn", dread_BKCRE, slots_BKNRE, preferred_element_type=f32)
  ds_BKRCN = p_BKRCN * (dp_BKRCN - (p_BKRCN * dp_BKRCN).sum(-1, keepdims=True)) / np.sqrt(e)
  dq_BKCRE = jnp.einsum("bkrcn,bknre->bkcre", ds_BKRCN.astype(slots_BKNRE.dtype), slots_BKNRE,
                        preferred_element_type=f32)
  # dM[b,k,n,r,:] = sum_c p[b,k,r,c,n] dread[b,k,c,r,:] + ds[b,k,r,c,n] q[b,k,c,r,:]
  if C <= _FUSED_SLOT_GRADIENT_MAX_C:  # c unrolled: one fused loop over the slots
    pn = jnp.swapaxes(p_BKRCN, 2, 4)[..., None]    # [B, K, N, C, R, 1]
    sn = jnp.swapaxes(ds_BKRCN, 2, 4)[..., None]
    dslots_BKNRE = sum(pn[:, :, :, c] * dread_BKCRE[:, :, None, c].astype(f32)
                       + sn[:, :, :, c] * q_BKCRE[:, :, None, c].astype(f32) for c in range(C))
  else:  # few banks with many queries each: matmuls large enough to be efficient
    dslots_BKNRE = (jnp.einsum("bkrcn,bkcre->bknre", p_BKRCN, dread_BKCRE, preferred_element_type=f32)
                    + jnp.einsum("bkrcn,bkcre->bknre", ds_BKRCN, q_BKCRE, preferred_element_type=f32))
  return dq_BKCRE.astype(q_BKCRE.dtype), dslots_BKNRE.astype(slots_BKNRE.dtype)


bank_attention.defvjp(_bank_attention_fwd, _bank_attention_bwd)


def _gather_rows(x_BK, idx_BJ):
  """x[b, idx[b, j]] for every b: [B, K, ...] gathered by [B, ...] indices -> [B, ..., ...]."""
  return jax.vmap(lambda x, i: x[i])(x_BK, idx_BJ)


@register("hierarchical")
class HierarchicalMemory(ReadWriteMemory):
  """step = read then write (module docstring); statistics: the general level's (`general`: LM2's `read_mass` and
  gate statistics), `bank_read_mass` [B, K, N1], `bank_usage` [B, K], `deep_tokens`, `deep_banks`, `deep_dropped`
  [B]; loss: `balance`."""
  cfg: ModelConfig

  Config = HierarchicalMemoryConfig

  @staticmethod
  def init_state(mcfg: HierarchicalMemoryConfig, batch: int) -> dict[str, Any]:
    """General level as LM2's; banks start empty (zero slots read as nothing)."""
    return {"general": LM2Memory.init_state(mcfg.general, batch),
            "bank_slots": jnp.zeros((batch, mcfg.num_banks, mcfg.bank_slots, mcfg.slot_dim), jnp.float32),
            "bank_read_mass": jnp.zeros((batch, mcfg.num_banks, mcfg.bank_slots), jnp.float32)}

  @staticmethod
  def state_axes(mcfg: HierarchicalMemoryConfig) -> dict[str, Any]:
    return {"general": LM2Memory.state_axes(mcfg.general),
            "bank_slots": ("batch", "mem_banks", "mem_slots", "embed"),
            "bank_read_mass": ("batch", "mem_banks", "mem_slots")}

  def setup(self):
    c, m, dt = self.cfg, self.cfg.memory, self.cfg.dtype
    self.general = LM2Memory(dataclasses.replace(c, memory=m.general), name="general")
    e = m.slot_dim // m.num_heads
    keys = (2, math.isqrt(m.num_banks), m.slot_dim // 2) if m.product_keys else (m.num_banks, m.slot_dim)
    axes = (None, "mem_banks", None) if m.product_keys else ("mem_banks", None)
    self.bank_keys = self.param("bank_keys", nn.with_logical_partitioning(nn.initializers.normal(1.0), axes), keys,
                                jnp.float32)
    self.route = dense(m.slot_dim, ("embed", None), "route_proj", jnp.float32)
    self.q = dense((m.num_heads, e), ("embed", "heads", "head_dim"), "q_proj", dt)
    self.o = dense(c.d_model, ("heads", "head_dim", "embed"), "o_proj", dt, n_in=2)
    self.deep_gate = dense(1, ("embed", None), "deep_gate", jnp.float32, use_bias=True)
    self.u = dense(m.slot_dim, ("embed", None), "u_proj", dt)
    self.salience = dense(1, ("embed", None), "salience", jnp.float32, use_bias=True)

  def _route(self, h_BLD, w_BL=None):
    """-> (banks [B, L, k] int32, weights [B, L, k] summing to 1, mean routing probability per bank [B, K] over
    the tokens weighted by w_BL (all tokens when None))."""
    m = self.cfg.memory
    B, L, _ = h_BLD.shape
    w_BL = jnp.ones((B, L), jnp.float32) if w_BL is None else w_BL.astype(jnp.float32)
    w_BL = w_BL / jnp.maximum(w_BL.sum(axis=1, keepdims=True), 1.0)
    r_BLS = self.route(h_BLD.astype(jnp.float32))
    if not m.product_keys:
      scores_BLK = jnp.einsum("bls,ks->blk", r_BLS, self.bank_keys) / np.sqrt(m.slot_dim)
      top_BLk, banks_BLk = jax.lax.top_k(scores_BLK, m.top_k)
      probs_BK = jnp.einsum("blk,bl->bk", jax.nn.softmax(scores_BLK, axis=-1), w_BL)
    else:
      half = m.slot_dim // 2
      s1_BLP = jnp.einsum("bls,ps->blp", r_BLS[..., :half], self.bank_keys[0]) / np.sqrt(m.slot_dim)
      s2_BLP = jnp.einsum("bls,ps->blp", r_BLS[..., half:], self.bank_keys[1]) / np.sqrt(m.slot_dim)
      t1, i1 = jax.lax.top_k(s1_BLP, m.top_k)
      t2, i2 = jax.lax.top_k(s2_BLP, m.top_k)
      pair_scores = (t1[..., :, None] + t2[..., None, :]).reshape(*t1.shape[:2], -1)      # [B, L, k*k]
      top_BLk, pick = jax.lax.top_k(pair_scores, m.top_k)
      side = s1_BLP.shape[-1]
      banks_BLk = jnp.take_along_axis(i1, pick // m.top_k, -1) * side + jnp.take_along_axis(i2, pick % m.top_k, -1)
      # softmax over all K = P^2 pair scores factorises into the two halves' softmaxes.
      p1, p2 = jax.nn.softmax(s1_BLP, axis=-1), jax.nn.softmax(s2_BLP, axis=-1)
      probs_BK = jnp.einsum("blp,blq,bl->bpq", p1, p2, w_BL).reshape(p1.shape[0], -1)
    return banks_BLk, jax.nn.softmax(top_BLk, axis=-1), probs_BK

  def _deep_read(self, bank_slots_BKNS, h_BLD, banks_BLk, w_BLk, active_BL):
    """-> (deep_BLD, attention mass per chosen slot [B, L, k, N1], kept [B, L, k]).

    Tokens are dispatched to the banks they chose, at most C = ceil(capacity_factor * L * k / K) per bank per
    row (mixture-of-experts style; picks beyond a bank's capacity, in token order, are dropped and reported), and
    each bank's slots are read by the queries sent to it as one batched attention. Per token this reads k * N1
    slots whatever K is; each bank's slots are loaded once per segment instead of once per token that chose it.
    Inactive tokens (skipped) are not dispatched; when none is active the read is not computed at all."""
    m, c = self.cfg.memory, self.cfg
    B, L, k = banks_BLk.shape
    K, N1, R = m.num_banks, m.bank_slots, m.num_heads
    e = m.slot_dim // R
    C = max(1, math.ceil(m.capacity_factor * L * k / K))
    A = L * k
    q_BLRE = self.q(h_BLD)

    # Each pick a = t * k + j gets a cell bank * C + (its rank among the picks of that bank); C*K is "dropped".
    bank_BA = jnp.where(active_BL[..., None], banks_BLk, K).reshape(B, A)

    def cells(bank_A):
      order = jnp.argsort(bank_A, stable=True)
      ranked = bank_A[order]
      rank = jnp.zeros(A, jnp.int32).at[order].set(jnp.arange(A) - jnp.searchsorted(ranked, ranked, side="left"))
      kept = (bank_A < K) & (rank < C)
      cell = jnp.where(kept, bank_A * C + rank, K * C)
      owner = jnp.full(K * C + 1, A, jnp.int32).at[cell].set(jnp.arange(A, dtype=jnp.int32))[:K * C]
      return cell, kept, owner

    cell_BA, kept_BA, owner_BQ = jax.vmap(cells)(bank_BA)  # Q = K * C cells

    w_BLk_kept = w_BLk * kept_BA.reshape(B, L, k)
    pad = lambda x: jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)  # one zero row past the end

    def attend(_):
      q_BKCRE = _gather_rows(pad(q_BLRE), owner_BQ // k).reshape(B, K, C, R, e)  # empty cells read token L: zeros
      slots_BKNRE = bank_slots_BKNS.astype(c.dtype).reshape(B, K, N1, R, e)
      read_BKCRE, p_BKRCN = bank_attention(q_BKCRE, slots_BKNRE)
      read_BQRE = read_BKCRE.reshape(B, K * C, R, e)
      mass_BQN = p_BKRCN.mean(axis=2).reshape(B, K * C, N1)  # mean over heads: [B, K, C, N1] -> cells
      # Back to the picks (a dropped pick reads the zero row K * C), weighted and summed over each token's k.
      w_BLk = w_BLk_kept.astype(read_BQRE.dtype)
      read_BLRE = jnp.einsum("blkre,blk->blre", _gather_rows(pad(read_BQRE), cell_BA).reshape(B, L, k, R, e), w_BLk)
      return read_BLRE, _gather_rows(pad(mass_BQN), cell_BA).reshape(B, L, k, N1) * w_BLk_kept[..., None]

    def skip(_):
      return jnp.zeros_like(q_BLRE), jnp.zeros((B, L, k, N1), jnp.float32)

    if m.skip_threshold > 0:
      read_BLRE, mass_BLkN = jax.lax.cond(active_BL.any(), attend, skip, None)
    else:
      read_BLRE, mass_BLkN = attend(None)
    return self.o(read_BLRE), mass_BLkN, kept_BA.reshape(B, L, k)

  def read(self, state, h_BLD, mask_BL=None) -> MemoryOut:
    m = self.cfg.memory
    B, L, _ = h_BLD.shape
    general = self.general.read(state["general"], h_BLD, mask_BL)
    general_BLD, general_stats = general.residual_BLD, general.stats
    banks_BLk, w_BLk, probs_BK = self._route(h_BLD, mask_BL)
    gate_BL = nn.sigmoid(self.deep_gate(h_BLD.astype(jnp.float32))[..., 0])
    active_BL = gate_BL >= m.skip_threshold
    w_tok_BL = jnp.ones((B, L), jnp.float32) if mask_BL is None else mask_BL.astype(jnp.float32)
    deep_BLD, slot_mass_BLkN, kept_BLk = self._deep_read(state["bank_slots"], h_BLD, banks_BLk, w_BLk, active_BL)
    delta_BLD = general_BLD + jnp.where(active_BL[..., None], gate_BL[..., None].astype(deep_BLD.dtype) * deep_BLD, 0)

    # Statistics over the tokens of mask_BL; the balance loss counts every pick (also dropped ones).
    count_B = jnp.maximum(w_tok_BL.sum(axis=1), 1.0)
    reads_BLk = (w_tok_BL * active_BL)[..., None] * kept_BLk
    scatter = jax.vmap(lambda idx, x: jnp.zeros((m.num_banks, *x.shape[1:]), x.dtype).at[idx].add(x))
    bank_mass_BKN = scatter(banks_BLk.reshape(B, -1),
                            (slot_mass_BLkN * w_tok_BL[..., None, None]).reshape(B, -1, m.bank_slots))
    picks_BK = scatter(banks_BLk.reshape(B, -1), jnp.broadcast_to(w_tok_BL[..., None], banks_BLk.shape).reshape(B, -1))
    share_BK = picks_BK / (m.top_k * count_B[:, None])
    balance_B = m.num_banks * (share_BK * probs_BK).sum(axis=-1)
    touched_BK = scatter(banks_BLk.reshape(B, -1), reads_BLk.reshape(B, -1))
    stats = {"general": general_stats,
             "bank_read_mass": jax.lax.stop_gradient(bank_mass_BKN / count_B[:, None, None]),
             "bank_usage": jax.lax.stop_gradient(share_BK),
             "deep_tokens": jax.lax.stop_gradient((reads_BLk.max(axis=-1)).sum(axis=1) / count_B),
             "deep_banks": jax.lax.stop_gradient((touched_BK > 0).mean(axis=-1)),
             "deep_dropped": jax.lax.stop_gradient(
                 ((w_tok_BL * active_BL)[..., None] * (1 - kept_BLk)).sum(axis=(1, 2)) / (m.top_k * count_B))}
    return MemoryOut(residual_BLD=delta_BLD, stats=stats, losses={"balance": m.balance_loss_weight * balance_B.mean()})

  def write_with_stats(self, state, h_BLD, stats, mask_BL=None):
    """-> (new state, `stats` with the general level's gate statistics added to its own)."""
    m = self.cfg.memory
    general, general_stats = self.general.write_with_stats(state["general"], h_BLD, stats["general"], mask_BL)
    x_BLD = token_shift(h_BLD, mask_BL)  # as LM2's write: a value token carries its key
    salience_BL = self.salience(x_BLD.astype(jnp.float32))[..., 0]
    if mask_BL is not None:
      salience_BL = jnp.where(mask_BL, salience_BL, jnp.finfo(jnp.float32).min)
    top_Bm, tokens_Bm = jax.lax.top_k(salience_BL, m.write_tokens)
    valid_Bm = jnp.ones_like(top_Bm, bool) if mask_BL is None else _gather_rows(mask_BL, tokens_Bm)
    content_BmS = jnp.tanh(_gather_rows(self.u(x_BLD), tokens_Bm)).astype(jnp.float32) * nn.sigmoid(top_Bm)[..., None]
    banks_Bm = _gather_rows(self._route(x_BLD)[0][..., 0], tokens_Bm)
    # The i-th write into a bank replaces its i-th least-read slot.
    mass_BKN = m.read_decay * state["bank_read_mass"] + stats["bank_read_mass"]
    same_Bmm = banks_Bm[:, :, None] == banks_Bm[:, None, :]
    rank_Bm = jnp.sum(jnp.tril(same_Bmm, k=-1), axis=-1)
    order_BmN = jnp.argsort(_gather_rows(mass_BKN, banks_Bm), axis=-1)
    slot_Bm = jnp.take_along_axis(order_BmN, rank_Bm[..., None], -1)[..., 0]

    def put(slots_KNS, mass_KN, banks, slot, content, valid):
      # (bank, slot) pairs are distinct (rank above); saying so keeps the scatter's derivative a scatter of the
      # tangents, without the full-size masks JAX builds for indices that may repeat.
      old = slots_KNS[banks, slot]
      slots_KNS = slots_KNS.at[banks, slot].set(jnp.where(valid[:, None], content, old), unique_indices=True)
      fresh_mass = jnp.where(valid, mass_KN.mean(axis=-1)[banks], mass_KN[banks, slot])
      return slots_KNS, mass_KN.at[banks, slot].set(fresh_mass, unique_indices=True)

    slots_BKNS, mass_BKN = jax.vmap(put)(state["bank_slots"], mass_BKN, banks_Bm, slot_Bm, content_BmS, valid_Bm)
    new = {"general": general, "bank_slots": slots_BKNS, "bank_read_mass": mass_BKN}
    return new, {**stats, "general": general_stats}
