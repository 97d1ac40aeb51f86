"""Prefill and cached decoding through the segment recurrence (DESIGN section 5).

A batch of token streams, one per row, each continuing from its own memory. The state (`DecodeState`, device
arrays) holds per row:

  memory       the memory that entered the row's current segment
  cache        the keys/values of the current segment's tokens in every layer (LM2Model.init_cache / extend)
  pos_B        how many tokens of the current segment there are (0 .. segment_len - 1)
  segment_BS   their ids: when the segment fills it is run once more by the ordinary forward, which writes the
               memory exactly as training does, and the cache starts over
  logits_BV    the next-token logits after the row's last token

`feed` (prefill) appends tokens: the row's pending segment tokens and the new ones form a stream that starts at a
segment boundary with `memory`; its complete segments run through the ordinary forward (one compiled segment
function, memory carried), the rest through one `extend` into a fresh cache. `decode` samples new tokens in one
compiled `lax.while_loop`: each token is appended with `extend` (it reads the memory that entered its segment and
the cache), and a row whose segment fills is written and restarted inside the loop. No function compiles per
prompt length or per token: the shapes are the batch, one segment and a bucketed output buffer.

A memory kind whose reads inside a segment depend on the segment's earlier tokens beyond attention's keys
(`decode_by_segment`: titans, whose chunks update the memory within the segment) is decoded without `extend`: each
new token runs the ordinary forward of its segment so far (padded; causal, so the padding is never read) from the
memory that entered it, which costs a segment's forward per token and gives exactly the uncached logits.

Each row behaves exactly as it would alone: rows never share anything, and a row's segment boundaries fall every
segment_len tokens from the start of its stream, whatever the other rows hold.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.model import LM2Model, ModelConfig
from lm2_jax.model import memory as memory_lib
from lm2_jax.model.config import ConfigError
from lm2_jax.model.memory.protocol import select_rows


@flax.struct.dataclass
class DecodeState:
  memory: dict
  cache: dict
  pos_B: jax.Array
  segment_BS: jax.Array
  logits_BV: jax.Array

  @property
  def batch_size(self) -> int:
    return int(self.pos_B.shape[0])


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How tokens are drawn. temperature 0: greedy; top_k 0: no limit; top_p 1: no nucleus cut. Stop ids end a
  row after they are emitted (included); stop strings end it where the decoded text first contains one (the
  text is cut before it, the tokens after the one completing it are dropped from the state)."""
  max_new_tokens: int = 32
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  stop_ids: tuple[int, ...] = ()
  stop_strings: tuple[str, ...] = ()
  seed: int = 0

  def __post_init__(self):
    checks = [
        (isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0, "max_new_tokens", "a positive integer"),
        (self.temperature >= 0, "temperature", ">= 0 (0: greedy)"),
        (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an integer >= 0 (0: no limit)"),
        (0 < self.top_p <= 1, "top_p", "in (0, 1] (1: no nucleus cut)"),
        (all(s for s in self.stop_strings), "stop_strings", "non-empty strings"),
    ]
    for ok, name, fix in checks:
      if not ok:
        raise ConfigError(f"sampling.{name}={getattr(self, name)!r}: must be {fix}")


_STOP_STRING_CHUNK = 16  # with stop strings, tokens are drawn this many at a time and checked on the host


def filter_logits(logits_BV, temperature, top_k, top_p):
  """Logits after temperature, top-k and top-p (nucleus): tokens outside both sets get -inf. top-k keeps the k
  largest (ties at the k-th value kept); top-p keeps the most probable tokens until their mass reaches p (at
  least one)."""
  x = logits_BV / jnp.maximum(temperature, 1e-6)
  V = x.shape[-1]
  sorted_BV = -jnp.sort(-x, axis=-1)
  kth = jnp.where(top_k > 0, sorted_BV[:, jnp.clip(top_k - 1, 0, V - 1)], -jnp.inf)
  x = jnp.where(x < kth[:, None], -jnp.inf, x)
  sorted_BV = jnp.where(sorted_BV < kth[:, None], -jnp.inf, sorted_BV)
  p_BV = jax.nn.softmax(sorted_BV, axis=-1)
  before_BV = jnp.cumsum(p_BV, axis=-1) - p_BV  # mass of the tokens ranked above each one
  keep_BV = before_BV < top_p
  cutoff_B = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1)
  return jnp.where(x < cutoff_B[:, None], -jnp.inf, x)


def sample(logits_BV, key, temperature, top_k, top_p):
  """Next tokens [B]: argmax when temperature is 0, else a draw from the filtered distribution."""
  drawn = jax.random.categorical(key, filter_logits(logits_BV, temperature, top_k, top_p), axis=-1)
  return jnp.where(temperature > 0, drawn, jnp.argmax(logits_BV, axis=-1)).astype(jnp.int32)


class Decoder:
  """The compiled functions of one model config (`decoder_for(config)` shares them between callers)."""

  def __init__(self, config: ModelConfig):
    self.model = model = LM2Model(config)
    self.segment_len = S = config.segment_len
    self.vocab_size = config.vocab_size

    def segment(params, memory, tokens_BS, active_B):
      """The ordinary forward of one segment -> (memory after it where active_B, else the old; last logits)."""
      logits, new, _ = model.apply({"params": params}, tokens_BS, memory)
      return model.select_memory(active_B, new, memory), logits[:, -1]

    def start(params, memory, batch_size):
      return model.apply({"params": params}, memory, batch_size, method=LM2Model.init_cache)

    def extend(params, memory, cache, tokens_BL, index_B):
      return model.apply({"params": params}, tokens_BL, memory, cache, index_B, method=LM2Model.extend)

    def rerun(params, memory, tokens_BS, index_B):
      """Logits [B, V] at per-row positions index_B of the segment `tokens_BS` (tokens after them are ignored: causal),
      by the ordinary forward from the memory that entered it: for kinds whose reads depend on the segment's earlier
      tokens beyond attention's keys (`decode_by_segment`, e.g. titans' in-segment updates)."""
      logits = model.apply({"params": params}, tokens_BS, memory)[0]
      return logits[jnp.arange(tokens_BS.shape[0]), index_B]

    by_segment = config.memory.kind != "none" and getattr(memory_lib.module_class(config.memory),
                                                          "decode_by_segment", False)

    def append(params, st: DecodeState, tok_B, live_B) -> DecodeState:
      """One token per live row; a row whose segment fills is written and its cache restarted."""
      B = tok_B.shape[0]
      segment_BS = st.segment_BS.at[jnp.arange(B), st.pos_B].set(tok_B)
      if by_segment:
        logits, cache = rerun(params, st.memory, segment_BS, st.pos_B)[:, None], st.cache
      else:
        logits, cache = extend(params, st.memory, st.cache, tok_B[:, None], st.pos_B)
      pos_B = st.pos_B + live_B.astype(jnp.int32)
      st = DecodeState(st.memory, cache, pos_B, segment_BS, jnp.where(live_B[:, None], logits[:, 0], st.logits_BV))
      full_B = pos_B == S

      def write(st):
        memory, _ = segment(params, st.memory, st.segment_BS, full_B)
        cache = select_rows(full_B, start(params, memory, B), st.cache, batch_axis=1)  # [layers, B, ...]
        return DecodeState(memory, cache, jnp.where(full_B, 0, st.pos_B), st.segment_BS, st.logits_BV)

      return jax.lax.cond(full_B.any(), write, lambda st: st, st)

    def decode(params, st: DecodeState, key, max_new, temperature, top_k, top_p, stop_ids, buffer_len):
      """-> (tokens [B, buffer_len] (-1 past each row's end), state). Stops at max_new or when every row has
      emitted a stop id."""
      B = st.batch_size

      def body(carry):
        i, st, done_B, out_BN, key = carry
        key, sub = jax.random.split(key)
        tok_B = sample(st.logits_BV, sub, temperature, top_k, top_p)
        live_B = ~done_B
        out_BN = out_BN.at[:, i].set(jnp.where(live_B, tok_B, -1))
        st = append(params, st, tok_B, live_B)
        return i + 1, st, done_B | jnp.isin(tok_B, stop_ids), out_BN, key

      carry = (jnp.int32(0), st, jnp.zeros((B,), bool), jnp.full((B, buffer_len), -1, jnp.int32), key)
      _, st, _, out_BN, _ = jax.lax.while_loop(lambda c: (c[0] < max_new) & ~c[2].all(), body, carry)
      return out_BN, st

    self.segment = jax.jit(segment)
    self.start = jax.jit(start, static_argnums=2)
    self.extend = jax.jit(extend)
    self.rerun = jax.jit(rerun) if by_segment else None
    self.decode = jax.jit(decode, static_argnums=8)

  def compilations(self) -> dict[str, int]:
    """How many programs each compiled function holds (one per batch size and buffer bucket)."""
    return {name: getattr(self, name)._cache_size() for name in ("segment", "start", "extend", "decode")}

  def fresh(self, params, batch_size: int) -> DecodeState:
    """Empty streams with a fresh memory."""
    memory = self.model.init_memory(batch_size)
    return DecodeState(memory, self.start(params, memory, batch_size), jnp.zeros((batch_size,), jnp.int32),
                       jnp.zeros((batch_size, self.segment_len), jnp.int32),
                       jnp.zeros((batch_size, self.vocab_size), jnp.float32))

  def pending(self, st: DecodeState) -> list[list[int]]:
    """The tokens of each row's current segment."""
    pos, seg = np.asarray(st.pos_B), np.asarray(st.segment_BS)
    return [seg[b, :pos[b]].tolist() for b in range(len(pos))]

  def feed(self, params, st: DecodeState, tokens: Sequence[Sequence[int]]) -> DecodeState:
    """Appends tokens[b] to row b (lists may differ in length or be empty)."""
    S, B = self.segment_len, st.batch_size
    if len(tokens) != B:
      raise ValueError(f"tokens: {len(tokens)} rows for a state of batch {B}")
    for b, row in enumerate(tokens):
      bad = [int(i) for i in row if not 0 <= int(i) < self.vocab_size]
      if bad:
        raise ConfigError(f"tokens: row {b} has ids {bad[:5]} outside the model's vocabulary [0, {self.vocab_size}) "
                          "(config.model.vocab_size); encode with the tokenizer the model was trained with")
    streams = [p + [int(i) for i in row] for p, row in zip(self.pending(st), tokens)]
    n_B = np.array([len(s) for s in streams])
    full_B = n_B // S
    padded = np.zeros((B, (full_B.max() + 1) * S), np.int32)
    for b, s in enumerate(streams):
      padded[b, :len(s)] = s
    memory, logits = st.memory, st.logits_BV
    for seg in range(int(full_B.max())):
      memory, last = self.segment(params, memory, padded[:, seg * S:(seg + 1) * S], jnp.asarray(seg < full_B))
      logits = jnp.where(jnp.asarray((full_B == seg + 1) & (n_B == (seg + 1) * S))[:, None], last, logits)
    rest_B = n_B - full_B * S
    rest_BS = np.stack([padded[b, full_B[b] * S:(full_B[b] + 1) * S] for b in range(B)])
    cache = self.start(params, memory, B)
    if rest_B.any():
      last_B = jnp.asarray(np.maximum(rest_B - 1, 0))
      if self.rerun is not None:
        last = self.rerun(params, memory, rest_BS, last_B)
      else:
        out, cache = self.extend(params, memory, cache, rest_BS, jnp.zeros((B,), jnp.int32))
        last = out[jnp.arange(B), last_B]
      logits = jnp.where(jnp.asarray(rest_B > 0)[:, None], last, logits)
    return DecodeState(memory, cache, jnp.asarray(rest_B, jnp.int32), jnp.asarray(rest_BS), logits)

  def generate(self, params, st: DecodeState, sampling: Sampling,
               detokenize: Callable[[list[int]], str] | None = None) -> tuple[list[list[int]], DecodeState]:
    """Draws up to sampling.max_new_tokens tokens per row after what `st` holds -> (tokens per row, state after
    them). Stop strings need `detokenize`; without any, one compiled loop does the whole generation."""
    if sampling.stop_strings and detokenize is None:
      raise ValueError("sampling.stop_strings: give a detokenize function (a tokenizer's decode) to check them")
    B = st.batch_size
    stop_ids = np.full(_bucket(len(sampling.stop_ids)), -1, np.int32)  # padded: few compilations
    stop_ids[:len(sampling.stop_ids)] = sampling.stop_ids
    chunk = _STOP_STRING_CHUNK if sampling.stop_strings else sampling.max_new_tokens
    buffer_len = _bucket(chunk)  # few compilations for any max_new_tokens
    key = jax.random.key(sampling.seed)
    out = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    while not done.all():
      before = st
      key, sub = jax.random.split(key)
      n = min(chunk, sampling.max_new_tokens - max(len(o) for o in out))
      got, st = self.decode(params, st, sub, n, sampling.temperature, sampling.top_k, sampling.top_p,
                            jnp.asarray(stop_ids), buffer_len)
      got = np.asarray(got)
      cut = [None] * B
      for b in np.flatnonzero(~done):
        new = [int(i) for i in got[b] if i >= 0]
        keep = _until_stop_string(out[b], new, sampling.stop_strings, detokenize) if sampling.stop_strings else None
        if keep is not None:
          cut[b] = new[:keep]
          new = new[:keep]
          done[b] = True
        out[b] += new
        if (new and new[-1] in sampling.stop_ids) or len(out[b]) >= sampling.max_new_tokens:
          done[b] = True
      if any(c is not None for c in cut):  # rows that passed a stop string keep only the tokens up to it
        rows = [c if c is not None else [int(i) for i in got[b] if i >= 0] for b, c in enumerate(cut)]
        st = self.feed(params, before, rows)
    return out, st


def _bucket(n: int) -> int:
  """The power of two >= n, at least 16."""
  return max(16, 1 << max(n - 1, 0).bit_length())


def _until_stop_string(previous: list[int], new: list[int], stops: Sequence[str], detokenize) -> int | None:
  """How many of `new` to keep: up to the token whose text completes a stop string; None if none appears."""
  base = len(detokenize(previous))
  for j in range(1, len(new) + 1):
    text = detokenize(previous + new[:j])[base:]
    if any(s in text for s in stops):
      return j
  return None


def strip_stop_strings(text: str, stops: Sequence[str]) -> str:
  """The text before the first stop string."""
  cut = min([text.index(s) for s in stops if s in text], default=len(text))
  return text[:cut]


@functools.lru_cache(maxsize=16)
def decoder_for(config: ModelConfig) -> Decoder:
  """The `Decoder` of a model config, compiled functions shared by every caller with that config."""
  return Decoder(config)


def generate(model: LM2Model, params, prompts: Sequence[Sequence[int]], sampling: Sampling,
             detokenize: Callable[[list[int]], str] | None = None) -> list[list[int]]:
  """Continuations of a batch of prompts (token lists of any lengths), each from a fresh memory, as if alone."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("prompts: give at least one prompt, each of at least one token")
  dec = decoder_for(model.config)
  st = dec.feed(params, dec.fresh(params, len(prompts)), prompts)
  return dec.generate(params, st, sampling, detokenize)[0]
