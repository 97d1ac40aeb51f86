"""M+'s long-term store on the host (NumPy): the memory tokens an `mplus` pool dropped, per memory layer, searched
by the co-trained retriever.

    store = LongTermStore.for_config(model_config, capacity=1_000_000)
    store.add(layer, tokens_ND, keys_NR, ages_N)       # FIFO past `capacity`: the earliest added leave first
    idx = store.search(layer, queries_QR, r)           # top-r by mean_q sigmoid(q . k / sqrt(R)), as M+ scores
    store.save(path); LongTermStore.load(path, model_config)   # refused (one ConfigError) under another config

Each entry keeps its token (the hidden state, float16 on the host: M+ keeps its long-term memory in the model's
half precision too), its retriever key (float32, computed once when it enters: M+ caches `ltm_keys` likewise; float32 so that
a search needs no conversion)
and its age (the write count of the row when the token entered the pool). Rows are stored in a ring of
`capacity` entries per layer (allocated by doubling as it fills); `search` is one matrix product over the filled
entries and `np.argpartition`.

In jit-compiled code (training, decoding) the store is the bounded device ring of `memory.ltm_capacity` tokens
inside the memory state (lm2_jax.model.memory.memoryllm); a `Session` keeps this host store beside it (spill and
refill, lm2_jax.sessions.session).
"""

from __future__ import annotations

import json
import os

import numpy as np

from lm2_jax.model.config import ConfigError

_FORMAT = 1


class LongTermStore:
  """Per-layer host store of dropped memory tokens with retriever keys and ages (module docstring)."""

  def __init__(self, num_layers: int, token_dim: int, key_dim: int, capacity: int, signature: dict | None = None):
    if not (isinstance(capacity, int) and capacity > 0):
      raise ConfigError(f"ltm store capacity={capacity!r}: must be a positive integer (tokens per layer)")
    self.capacity, self.signature = capacity, dict(signature or {})
    start = min(capacity, 1024)  # allocated rows grow by doubling up to the capacity
    self.tokens = np.zeros((num_layers, start, token_dim), np.float16)
    self.keys = np.zeros((num_layers, start, key_dim), np.float32)
    self.ages = np.zeros((num_layers, start), np.float32)
    self.size = np.zeros(num_layers, np.int64)   # filled entries per layer
    self.added = np.zeros(num_layers, np.int64)  # entries ever added (the ring's write position)

  @classmethod
  def for_config(cls, config, capacity: int) -> "LongTermStore":
    """An empty store for a model config (ModelConfig) of memory kind 'mplus'."""
    m = config.memory
    if m.kind != "mplus":
      raise ConfigError(f"config.model.memory.kind={m.kind!r}: a long-term store belongs to memory kind 'mplus'")
    return cls(len(m.layers), config.d_model, m.retriever_dim, capacity, _signature(config))

  def _grow(self, rows: int) -> None:
    have = self.tokens.shape[1]
    if rows <= have:
      return
    new = min(self.capacity, max(rows, 2 * have))
    pad = lambda a: np.concatenate([a, np.zeros((a.shape[0], new - have, *a.shape[2:]), a.dtype)], axis=1)
    self.tokens, self.keys, self.ages = pad(self.tokens), pad(self.keys), pad(self.ages)

  @property
  def nbytes(self) -> int:
    """Host bytes held (the allocated rows)."""
    return self.tokens.nbytes + self.keys.nbytes + self.ages.nbytes + self.size.nbytes + self.added.nbytes

  def add(self, layer: int, tokens_ND, keys_NR, ages_N) -> None:
    """Appends entries to a layer; past the capacity the earliest added are overwritten."""
    n = len(tokens_ND)
    if n == 0:
      return
    if n > self.capacity:  # only the last `capacity` can stay
      tokens_ND, keys_NR, ages_N = tokens_ND[-self.capacity:], keys_NR[-self.capacity:], ages_N[-self.capacity:]
      self.added[layer] += n - self.capacity
      n = self.capacity
    self._grow(int(min(self.capacity, self.added[layer] + n)))
    pos = (self.added[layer] + np.arange(n)) % self.capacity
    self.tokens[layer, pos], self.keys[layer, pos], self.ages[layer, pos] = tokens_ND, keys_NR, ages_N
    self.added[layer] += n
    self.size[layer] = min(self.capacity, self.size[layer] + n)

  def scores(self, layer: int, queries_QR) -> np.ndarray:
    """[size]: each filled entry's mean over the queries of sigmoid(q . k / sqrt(R))."""
    keys = self.keys[layer, :self.size[layer]]
    logits = np.asarray(queries_QR, np.float32) @ keys.T / np.float32(np.sqrt(keys.shape[-1]))
    return (1.0 / (1.0 + np.exp(-logits))).mean(axis=0)

  def search(self, layer: int, queries_QR, r: int) -> np.ndarray:
    """Indices (into the layer's entries) of the r best entries, best first (all of them when fewer)."""
    s = self.scores(layer, queries_QR)
    if len(s) > r:
      top = np.argpartition(-s, r - 1)[:r]
    else:
      top = np.arange(len(s))
    return top[np.argsort(-s[top], kind="stable")]

  def save(self, path: str) -> None:
    """The filled entries and the signature of the config (NumPy .npz + JSON)."""
    os.makedirs(path, exist_ok=True)
    arrays = {}
    for layer in range(len(self.size)):
      n = self.size[layer]
      order = (self.added[layer] - n + np.arange(n)) % self.capacity  # earliest added first
      arrays.update({f"tokens_{layer}": self.tokens[layer, order], f"keys_{layer}": self.keys[layer, order],
                     f"ages_{layer}": self.ages[layer, order]})
    np.savez(os.path.join(path, "ltm_store.npz"), **arrays)
    with open(os.path.join(path, "ltm_store.json"), "w") as f:
      json.dump({"format": _FORMAT, "capacity": self.capacity, "signature": self.signature}, f)

  @classmethod
  def load(cls, path: str, config, capacity: int | None = None) -> "LongTermStore":
    """The store saved at `path`; refuses one saved under another model config (token width, retriever width,
    memory layers, kind), naming both."""
    with open(os.path.join(path, "ltm_store.json")) as f:
      meta = json.load(f)
    want = _signature(config)
    if meta["signature"] != want:
      diff = {k: (meta["signature"].get(k), want.get(k)) for k in sorted(set(want) | set(meta["signature"]))
              if meta["signature"].get(k) != want.get(k)}
      raise ConfigError(f"ltm store {path!r}: saved under another model config; (saved, given) per field: {diff}; "
                        "restore it with the model config it was saved with")
    store = cls.for_config(config, capacity or meta["capacity"])
    with np.load(os.path.join(path, "ltm_store.npz")) as z:
      for layer in range(len(store.size)):
        store.add(layer, z[f"tokens_{layer}"], z[f"keys_{layer}"], z[f"ages_{layer}"])
    return store


def _signature(config) -> dict:
  m = config.memory
  return {"kind": m.kind, "layers": list(m.layers), "token_dim": config.d_model, "retriever_dim": m.retriever_dim}
