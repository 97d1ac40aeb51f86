"""What episodic memory holds and how much it was used: the input of the sleep phase (DESIGN section 5).

A session's episodic memory is the state written by the segments of its token stream since its base (the
start, or the last sleep: `Session.base_offset`, `Session.base_memory`). `holdings(...)` runs those segments
again from the base memory, one at a time, with the same compiled segment function the session used, and
measures what each segment wrote where. It returns `Holdings`: the memory's units ranked by use, the segments
(token spans and text) behind them, and the session's logged questions.

Units and "the most-read content", per kind:

- Kinds with slots (lm2, hierarchical, and any kind that keeps a slot array `slots` / `<name>_slots` beside its
  decayed read statistics `read_mass` / `<name>_read_mass`, the slot array having one more trailing axis): a
  unit is one slot of one layer (lm2: a slot of a memory layer; hierarchical: a slot of the general level or of
  a bank). Its use is its decayed read mass (lm2: `read_mass` = sum over segments of decay^age times the attention
  mass the segment's tokens put on the slot, averaged over tokens and heads). The text behind a slot: the
  segments whose writes changed it, each with its share of the slot's total change,
      share[s, n] = |M_n after s - M_n before s| / sum_s' |M_n after s' - M_n before s'|     (L2 over the slot).
  The most-read content is the top of the units ranked by read mass, and the segments ranked by
      score[s] = sum over chosen units n of read_mass[n] * share[s, n].
- Kinds without per-slot read statistics (rmt's memory tokens, which every segment rewrites as a whole; any new
  kind that keeps none): the memory cannot say which of its parts was read, so the whole memory is one unit,
  every segment written since the base stands behind it, and segments rank newest first (score = the share of
  the memory's total change that the segment made, times 0.5^age in segments, a recency weighting: a memory that
  is rewritten each segment holds the newest segments best).
- Kind 'none' has no episodic memory: nothing is held (its context is the current segment only).

Logged questions (`Session.history` entries of kind 'ask' after the base) are replayed too: their prompt and the
answer the session gave, as token spans of the stream.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.model import LM2Model
from lm2_jax.sessions.decoding import decoder_for


@dataclasses.dataclass(frozen=True)
class SlotArray:
  """A slot array of the memory state and its read statistics: paths (tuples of dict keys) and the batch axis."""
  slots: tuple[str, ...]
  read_mass: tuple[str, ...]
  batch_axis: int


@dataclasses.dataclass
class Unit:
  """One consolidatable part of the memory: a slot (`array` names its read statistics, `index` its position
  without the batch axis) or, for kinds without slots, the whole memory (array '', index ())."""
  array: str
  index: tuple[int, ...]
  read_mass: float
  shares: np.ndarray  # [num_segments]: share of this unit's content written by each segment (sums to 1 or 0)


@dataclasses.dataclass
class Holdings:
  kind: str
  slot_arrays: list[SlotArray]
  units: list[Unit]            # ranked: most read first
  segments: list[dict]         # {'start', 'end', 'tokens', 'text'} in stream order, complete segments since base
  questions: list[dict]        # {'start', 'end', 'tokens', 'text'}: logged questions with their answers
  memory: Any                  # the memory after the segments (as replayed; equals the session's)

  @property
  def empty(self) -> bool:
    return not self.segments

  def describe(self, top: int = 8) -> list[dict]:
    """The top units with their read mass and their main source segments' text (for reports and /stats)."""
    out = []
    for u in self.units[:top]:
      order = np.argsort(-u.shares)[:3]
      out.append({"array": u.array, "index": list(u.index), "read_mass": round(u.read_mass, 6),
                  "sources": [{"start": self.segments[s]["start"], "end": self.segments[s]["end"],
                               "share": round(float(u.shares[s]), 4), "text": self.segments[s]["text"]}
                              for s in order if u.shares[s] > 0]})
    return out


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  """A copy of nested dicts `tree` with `path` set to value."""
  if not path:
    return value
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def slot_arrays(model: LM2Model) -> list[SlotArray]:
  """The (slots, read_mass) pairs of the memory state (module docstring), found by name and axes."""
  axes = model.memory_axes()
  found = []

  def walk(tree, prefix):
    for name, value in tree.items():
      if isinstance(value, dict):
        walk(value, prefix + (name,))
      elif name == "slots" or name.endswith("_slots"):
        partner = "read_mass" if name == "slots" else name[:-len("slots")] + "read_mass"
        if partner in tree and tree[partner] == value[:-1]:
          found.append(SlotArray(prefix + (name,), prefix + (partner,), value.index("batch")))

  walk(axes, ())
  return found


def _unit_name(path) -> str:
  return ".".join(path)


def replay_writes(model: LM2Model, params, base_memory, segments_NS: np.ndarray, arrays: list[SlotArray]):
  """Runs the segments [N, S] from `base_memory` (batch 1) -> (memory after them, per-array write magnitudes
  [N, *read-mass shape without batch], whole-memory change norms [N])."""
  dec = decoder_for(model.config)
  memory = base_memory
  per_array = [[] for _ in arrays]
  whole = []
  for seg in segments_NS:
    new, _ = dec.segment(params, memory, jnp.asarray(seg[None]), jnp.ones((1,), bool))
    for i, a in enumerate(arrays):
      diff = np.asarray(_get(new, a.slots)) - np.asarray(_get(memory, a.slots))
      per_array[i].append(np.take(np.linalg.norm(diff, axis=-1), 0, axis=a.batch_axis))
    whole.append(float(np.sqrt(sum(np.sum((np.asarray(x) - np.asarray(y)) ** 2)
                                   for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(memory))))))
    memory = new
  return memory, [np.stack(w) if w else None for w in per_array], np.asarray(whole)


def holdings(model: LM2Model, params, tokenizer, tokens: list[int], base_offset: int, base_memory,
             history: list[dict], memory=None) -> Holdings:
  """What the memory written since `base_offset` holds (module docstring). `tokens`: the session's stream;
  `memory`: the session's current memory (default: the replayed one), whose read statistics rank the slots."""
  c = model.config
  S = c.segment_len
  n = (len(tokens) - base_offset) // S if c.memory.kind != "none" else 0
  seg_tokens = np.asarray(tokens[base_offset:base_offset + n * S], np.int32).reshape(n, S)
  segments = [{"start": base_offset + i * S, "end": base_offset + (i + 1) * S, "tokens": seg_tokens[i].tolist(),
               "text": tokenizer.decode(seg_tokens[i].tolist())} for i in range(n)]
  questions = [{"start": h["start"], "end": h["end"], "tokens": tokens[h["start"]:h["end"]],
                "text": h["text"] + " -> " + h.get("answer", "")}
               for h in history if h["kind"] == "ask" and h["start"] >= base_offset and h["end"] > h["start"]]
  arrays = slot_arrays(model) if n else []
  units: list[Unit] = []
  replayed = base_memory
  if n:
    replayed, writes, whole = replay_writes(model, params, base_memory, seg_tokens, arrays)
    memory = replayed if memory is None else memory
    for a, w_N in zip(arrays, writes):
      mass = np.take(np.asarray(_get(memory, a.read_mass)), 0, axis=a.batch_axis)
      total = w_N.sum(axis=0)
      for index in np.ndindex(*mass.shape):
        shares = w_N[(slice(None), *index)] / total[index] if total[index] > 0 else np.zeros(n)
        units.append(Unit(_unit_name(a.read_mass), tuple(int(i) for i in index), float(mass[index]), shares))
    if not arrays:
      recency = 0.5 ** np.arange(n - 1, -1, -1, dtype=np.float64)
      score = (whole / max(whole.sum(), 1e-30)) * recency
      units.append(Unit("", (), 1.0, score / max(score.sum(), 1e-30)))
    units.sort(key=lambda u: -u.read_mass)
  return Holdings(c.memory.kind, arrays, units, segments, questions, replayed if memory is None else memory)


def reset_units(model: LM2Model, memory, arrays: list[SlotArray], units: list[Unit]):
  """`memory` (batch 1) with the given units set to their values in a fresh memory (`model.init_memory`): the
  slot and its read statistics; a whole-memory unit resets everything."""
  fresh = model.init_memory(1)
  if any(u.array == "" for u in units):
    return fresh
  by_name = {_unit_name(a.read_mass): a for a in arrays}
  for u in units:
    a = by_name[u.array]
    for path in (a.slots, a.read_mass):
      x = np.array(_get(memory, path))
      where = list(u.index)
      where.insert(a.batch_axis, 0)
      x[tuple(where)] = np.asarray(_get(fresh, path))[tuple(where)]
      memory = _set(memory, path, jnp.asarray(x))
  return memory
