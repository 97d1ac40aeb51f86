"""Sessions: a model, its tokenizer and an episodic memory that lasts across calls (DESIGN section 5).

    s = Session(params, config, tokenizer)
    s.inject("Mary went to the kitchen.")          # folded into memory, nothing generated
    s.ask("Where is Mary?", max_new_tokens=8)      # -> generated text; the exchange stays in the context
    s.save("ckpt/session")                         # the memory state (Orbax), its pending tokens and history
    s = Session.restore("ckpt/session", params, config, tokenizer)

The three tiers: the current segment's tokens sit in the KV cache (short-term), what earlier segments wrote
sits in the memory state (episodic), the parameters hold the rest (long-term). Text reaches the memory when its
segment fills; until then its tokens are pending in the cache, and they are part of the saved state.

`tokens` is the session's stream; the episodic memory is what its segments since `base_offset` wrote into
`base_memory` (a fresh memory, or the memory a sleep left: `sleep()`, lm2_jax.consolidate). `history` lists what
was injected and asked (and slept), each entry with the token span it occupies in the session's stream
and the memory's read statistics per slot after it (`read_stats`: every `*read_mass` array of the state, the
decayed attention mass each slot received; empty for kinds without slots). The sleep phase replays from it.

M+ (memory kind 'mplus'): the memory state holds a bounded device-side long-term store (memory.ltm_capacity
tokens per layer, a ring inside jit); the session keeps the real long-term store on the host (`self.ltm`, a
NumPy `LongTermStore`, capacity `ltm_capacity`). After every call the session spills into it the tokens that
entered the device store since the last spill (`store_time` newer than the write count then), with their
retriever keys; text is fed in chunks of ltm_capacity // update_tokens segments so that the device ring never
overwrites a token before it is spilled (generation spills after the call: at most ltm_capacity // update_tokens
segments may be written in one `generate` without loss). Before a question (`generate` with a prompt) the
session refills the device store with the ltm_capacity host tokens that the prompt's mean retriever query scores
highest, per layer (M+'s scoring: mean sigmoid(q . k)), oldest first; each token of the prompt and the answer
then attends to its own top `retrieve_tokens` of them. `save` writes the host store beside the memory state;
`restore` refuses one saved under another model config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lm2_jax.data.tokenizer import Tokenizer
from lm2_jax.model import LM2Model, ModelConfig, init_params
from lm2_jax.model.config import ConfigError
from lm2_jax.model.layout import unscan_layout
from lm2_jax.model.memory.ltm_store import LongTermStore
from lm2_jax.model.memory.memoryllm import MPlus
from lm2_jax.sessions.decoding import DecodeState, Sampling, decoder_for, strip_stop_strings

_FORMAT = 1


def _model_config(config) -> ModelConfig:
  """An experiment config (with .model), config.model, or a ModelConfig -> ModelConfig."""
  return ModelConfig.from_config(config.model if hasattr(config, "model") else config)


def _shapes(tree) -> dict[str, list[int]]:
  return {jax.tree_util.keystr(k): list(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def read_stats(memory) -> dict[str, list]:
  """Every `*read_mass` array of a memory state (batch row 0), by its path in the state."""
  return {jax.tree_util.keystr(k): np.asarray(v)[..., 0, :].tolist() if np.ndim(v) > 2 else np.asarray(v)[0].tolist()
          for k, v in jax.tree_util.tree_flatten_with_path(memory)[0] if "read_mass" in jax.tree_util.keystr(k)}


class Session:
  """One stream (batch 1) with its episodic memory; see the module docstring."""

  def __init__(self, params, config, tokenizer: Tokenizer, ltm_capacity: int = 1_000_000):
    self.config = _model_config(config)
    tokenizer.check_vocab(self.config.vocab_size)
    self._check_params(params)
    self.params, self.tokenizer = params, tokenizer
    self.model = LM2Model(self.config)
    self._dec = decoder_for(self.config)
    self.ltm_capacity = ltm_capacity
    self._first_params = None  # the params before the first sleep with general_anchor 'first' (in this process)
    self.reset()

  def _check_params(self, params) -> None:
    want = _shapes(jax.eval_shape(lambda: init_params(LM2Model(self.config), jax.random.key(0))))
    got = _shapes(params)
    if got != want:
      diff = [(k, got.get(k), want.get(k)) for k in sorted(set(want) | set(got)) if got.get(k) != want.get(k)]
      raise ConfigError(f"params: their shapes do not match config.model; (name, params, config) for the first "
                        f"differences: {diff[:3]}")

  def reset(self) -> None:
    """A fresh memory and an empty context; the history is cleared."""
    self.state: DecodeState = self._dec.fresh(self.params, 1)
    self.position = 0  # tokens in the session's stream so far
    self.tokens: list[int] = []  # the stream itself (what the sleep phase replays)
    self.base_offset, self.base_memory = 0, self.state.memory  # where the episodic memory starts: the last sleep
    self.history: list[dict[str, Any]] = []
    mplus = self.config.memory.kind == "mplus"
    self.ltm = LongTermStore.for_config(self.config, self.ltm_capacity) if mplus else None
    self._spilled = np.zeros(len(self.config.memory.layers)) if mplus else None  # write count at the last spill

  def _encode(self, text: str, what: str) -> list[int]:
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f"{what}: give non-empty text (got {text!r})")
    ids = self.tokenizer.encode(text)
    if self.position == 0 and self.tokenizer.bos_id >= 0:
      ids = [self.tokenizer.bos_id] + ids
    return ids

  def _feed(self, ids: list[int]) -> None:
    chunk = len(ids) or 1
    if self.ltm is not None:  # the device ring must not overwrite tokens before they are spilled
      m = self.config.memory
      chunk = max(1, m.ltm_capacity // m.update_tokens) * self.config.segment_len
    for i in range(0, len(ids), chunk):
      self.state = self._dec.feed(self.params, self.state, [ids[i:i + chunk]])
      self._spill()
    self.position += len(ids)
    self.tokens += [int(i) for i in ids]

  def _spill(self) -> None:
    """mplus: the tokens that entered the device store since the last spill go to the host store."""
    if self.ltm is None:
      return
    mem = jax.tree.map(np.asarray, self.state.memory)
    layers = None
    for j, layer in enumerate(self.config.memory.layers):
      new = (mem["store_filled"][j, 0] > 0) & (mem["store_time"][j, 0] > self._spilled[j])
      if new.any():  # keys of the whole device store: one compiled shape
        if layers is None:  # the per-layer parameters, unscanned once per spill
          layers = (unscan_layout(self.params, self.config) if self.config.scan_layers else self.params)["decoder"]
        keys = np.asarray(_retriever_keys(self.config, layers[f"layer_{layer}"]["memory"], mem["store"][j]))[0]
        self.ltm.add(j, mem["store"][j, 0][new], keys[new], mem["store_age"][j, 0][new])
      self._spilled[j] = mem["clock"][j, 0]

  def _refill(self, prompt_ids: list[int]) -> None:
    """mplus: the device store takes the host tokens the prompt's retriever query scores highest, per layer; the
    pending tokens are fed again on the new memory (their cache read the old one)."""
    if self.ltm is None or not self.ltm.size.any():
      return
    S, C = self.config.segment_len, self.config.memory.ltm_capacity
    pending = self._dec.pending(self.state)[0]
    toks = np.zeros((1, -(-len(prompt_ids) // S) * S), np.int32)
    toks[0, :len(prompt_ids)] = prompt_ids
    queries = np.asarray(_retrieval_queries(self.model, self.params, toks, self.state.memory))[:, 0]  # [layers, R]
    mem = jax.tree.map(np.array, self.state.memory)
    for j in range(len(self.config.memory.layers)):
      idx = self.ltm.search(j, queries[j][None], C)
      idx = idx[np.argsort(self.ltm.ages[j, idx], kind="stable")]  # oldest first, as M+ orders them
      n = len(idx)
      for name in ("store", "store_filled", "store_age"):
        mem[name][j, 0] = 0
      mem["store"][j, 0, C - n:] = self.ltm.tokens[j, idx]
      mem["store_filled"][j, 0, C - n:] = 1
      mem["store_age"][j, 0, C - n:] = self.ltm.ages[j, idx]
      mem["store_time"][j, 0] = -1  # already on the host: never spilled again
    fresh = self._dec.fresh(self.params, 1)
    self.state = self._dec.feed(self.params, fresh.replace(memory=jax.tree.map(jax.numpy.asarray, mem)), [pending])

  def _log(self, kind: str, text: str, start: int, **extra) -> None:
    self.history.append({"kind": kind, "text": text, "start": start, "end": self.position,
                         "read_stats": read_stats(self.state.memory), **extra})

  def inject(self, text: str) -> None:
    """Folds `text` into the session (memory once its segments fill), generating nothing."""
    start = self.position
    self._feed(self._encode(text, "inject"))
    self._log("inject", text, start)

  def generate(self, prompt: str | None = None, **sampling) -> str:
    """Feeds `prompt` (if any), then samples (`Sampling` fields as keywords); the generated tokens stay in the
    context. Returns the generated text, cut before a stop string."""
    s = Sampling(**{"stop_ids": (self.tokenizer.eos_id,) if self.tokenizer.eos_id >= 0 else (), **sampling})
    start = self.position
    if prompt is not None:
      ids = self._encode(prompt, "prompt")
      self._refill(ids)
      self._feed(ids)
    elif self.position == 0:
      raise ValueError("prompt: the session is empty; give a prompt or inject text first")
    ids, self.state = self._dec.generate(self.params, self.state, s, self.tokenizer.decode)
    self._spill()
    self.position += len(ids[0])
    self.tokens += [int(i) for i in ids[0]]
    text = strip_stop_strings(self.tokenizer.decode([i for i in ids[0] if i != self.tokenizer.eos_id]),
                              s.stop_strings)
    self._log("ask", prompt or "", start, answer=text)
    return text

  def ask(self, prompt: str, **sampling) -> str:
    """A question: `generate` after `prompt`."""
    return self.generate(prompt, **sampling)

  def sleep(self, general=None, **budget) -> dict:
    """The sleep phase in-process (lm2_jax.consolidate): distils what the episodic memory holds into the
    parameters, frees the consolidated slots, and continues with both; the pending tokens of the current segment
    are fed again under the new parameters. `budget`: fields of lm2_jax.consolidate.default_config (steps=,
    max_tokens=, slots=, rank=, ...); `general`: the general-text token stream (default: the built-in prose).
    With general_anchor='first' the general-text teacher is the params before the first such sleep of this
    object (kept in memory, not saved with the session). Returns the report; raises NothingToConsolidate (a
    ValueError) when the memory holds nothing."""
    from lm2_jax.consolidate import distill as lib  # pylint: disable=import-outside-toplevel
    config = lib.with_overrides(None, **budget)
    if config.general_anchor == "first" and self._first_params is None:
      self._first_params = self.params
    result = lib.consolidate(self.config, self.params, self.tokenizer, self.tokens, self.base_offset,
                             self.base_memory, self.history, self.state.memory, general=general, config=config,
                             first_params=self._first_params)
    pending = self._dec.pending(self.state)[0]
    self.params = result.params
    fresh = self._dec.fresh(self.params, 1)
    state = fresh.replace(memory=result.memory, logits_BV=self.state.logits_BV)
    self.state = self._dec.feed(self.params, state, [pending])  # the pending tokens again, under the new params
    self.base_offset, self.base_memory = self.position - len(pending), result.memory
    self._log("sleep", "", self.position, report={k: result.report[k] for k in (
        "units", "segments", "kl_before", "kl_after", "general_loss_before", "general_loss_after", "steps", "seconds")})
    return result.report

  def save(self, path: str) -> None:
    """Writes the memory state, the pending tokens of the current segment and the history under `path` (Orbax
    for the arrays, JSON for the rest; a session saved there before is replaced)."""
    path = os.path.abspath(path)
    pending = self._dec.pending(self.state)[0]
    if jax.tree.leaves(self.state.memory):  # memory kind 'none' has no state
      with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(path, "memory"), jax.tree.map(np.asarray, self.state.memory), force=True)
        if self.base_offset:  # after a sleep: the memory the stream since then was written into
          ckpt.save(os.path.join(path, "base_memory"), jax.tree.map(np.asarray, self.base_memory), force=True)
    os.makedirs(path, exist_ok=True)
    meta = {"format": _FORMAT, "model_config": _describe(self.config), "param_shapes": _shapes(self.params),
            "pending": pending, "position": self.position, "history": self.history, "tokens": self.tokens,
            "base_offset": self.base_offset}
    if self.ltm is not None:  # mplus: the host long-term store, and how far it is spilled
      self.ltm.save(os.path.join(path, "ltm"))
      meta["ltm_spilled"] = self._spilled.tolist()
    with open(os.path.join(path, "session.json"), "w") as f:
      json.dump(meta, f)

  @classmethod
  def restore(cls, path: str, params, config, tokenizer: Tokenizer, ltm_capacity: int = 1_000_000) -> "Session":
    """A session continuing exactly where `save` left it. Refuses a state saved under another model config or
    with params of other shapes, naming both (`check_saved`), and an mplus host store of another config."""
    meta = check_saved(path, params, config)
    s = cls(params, config, tokenizer, ltm_capacity)
    memory, base = s.state.memory, s.state.memory
    # a session saved before streams were logged: its text cannot be replayed, so its memory counts as the base
    tokens, offset = meta.get("tokens", []), meta.get("base_offset", meta["position"])
    if jax.tree.leaves(memory):  # memory kind 'none' saved none
      with ocp.StandardCheckpointer() as ckpt:
        like = jax.tree.map(np.asarray, memory)
        memory = ckpt.restore(os.path.join(os.path.abspath(path), "memory"), like)
        base = memory if "tokens" not in meta else (
            ckpt.restore(os.path.join(os.path.abspath(path), "base_memory"), like) if offset else base)
    st = s.state.replace(memory=jax.tree.map(jax.numpy.asarray, memory))
    s.state = s._dec.feed(s.params, st, [meta["pending"]])
    s.position, s.history, s.tokens = meta["position"], meta["history"], tokens
    s.base_offset, s.base_memory = offset, jax.tree.map(jax.numpy.asarray, base)
    if s.ltm is not None:
      s.ltm = LongTermStore.load(os.path.join(os.path.abspath(path), "ltm"), s.config, s.ltm_capacity)
      s._spilled = np.asarray(meta["ltm_spilled"])
    return s


@functools.partial(jax.jit, static_argnums=0)
def _retrieval_queries(model, params, tokens_BT, memory):
  """mplus: the mean retriever query of the tokens per memory layer [layers, B, R]."""
  return model.apply({"params": params}, tokens_BT, memory)[2]["memory_stats"]["retrieval_query"]


@functools.partial(jax.jit, static_argnums=0)
def _retriever_keys(config, memory_params, tokens_BXD):
  """mplus: the retriever keys of memory tokens with one layer's memory params."""
  return MPlus(config).apply({"params": memory_params}, tokens_BXD, method=MPlus.retriever_keys)


def check_saved(path: str, params, config) -> dict[str, Any]:
  """The metadata of a session saved at `path` (Session.save), after checking that it was saved under the same
  model config and with params of the same shapes; refuses otherwise, naming both."""
  path = os.path.abspath(path)
  meta_path = os.path.join(path, "session.json")
  if not os.path.isfile(meta_path):
    raise ConfigError(f"session {path!r}: no session.json there; give a directory written by Session.save")
  with open(meta_path) as f:
    meta = json.load(f)
  saved, given = _flat(meta["model_config"]), _flat(_describe(_model_config(config)))
  if saved != given:
    diff = {k: (saved.get(k), given.get(k)) for k in sorted(set(saved) | set(given)) if saved.get(k) != given.get(k)}
    raise ConfigError(f"session {path!r}: saved under another model config; (saved, given) per field: {diff}; "
                      "restore it with the model it was saved with")
  if meta["param_shapes"] != _shapes(params):
    diff = [(k, meta["param_shapes"].get(k), v) for k, v in _shapes(params).items()
            if meta["param_shapes"].get(k) != v]
    raise ConfigError(f"session {path!r}: saved with params of other shapes; (name, saved, given): {diff[:3]}; "
                      "restore it with the params it was saved with")
  return meta


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts as {'a.b': value}."""
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _describe(config: ModelConfig) -> dict[str, Any]:
  """The model config as JSON-able values (nested dataclasses as dicts)."""
  return json.loads(json.dumps(dataclasses.asdict(config), default=str))
