"""Multi-query associative recall spread over segments: the built-in long-context task.

A sample is `num_segments` segments of `segment_len` tokens. The context segments (all but the last) hold
`num_pairs` key-value pairs `[k, v]` at random positions among filler tokens; the last segment asks for a subset of
them as `[Q, k, v]` triples among filler, and only the answers `v` carry loss. A model whose attention window is
one segment cannot see the pairs, so it stays at chance (1 / num_values); a model with memory can recall them.

Samples are a pure function of (seed, index), so the dataset is random-access and any index can be regenerated:
a resumed run sees exactly the batches it would have seen.

Vocabulary: 0 pad, 1 query marker, then keys, then values, then filler; `vocab_size` is the total.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lm2_jax.model.config import ConfigError

PAD, QUERY = 0, 1


@dataclasses.dataclass(frozen=True)
class RecallTask:
  num_segments: int
  segment_len: int
  num_pairs: int
  num_queries: int
  num_keys: int = 64
  num_values: int = 64
  num_filler: int = 64
  seed: int = 0

  def __post_init__(self):
    context = (self.num_segments - 1) * self.segment_len
    if self.num_segments < 2:
      raise ConfigError(f"config.data.num_segments={self.num_segments}: needs >= 2 (pairs before, queries in "
                        "the last segment)")
    if self.segment_len % 2:
      raise ConfigError(f"config.model.segment_len={self.segment_len}: the recall task needs an even segment "
                        "length so that no key-value pair straddles two segments")
    if 2 * self.num_pairs > context:
      raise ConfigError(f"config.data.num_pairs={self.num_pairs}: {self.num_pairs} pairs need {2 * self.num_pairs} "
                        f"tokens but the context segments hold {context}; lower num_pairs or lengthen the input")
    if self.num_pairs > self.num_keys:
      raise ConfigError(f"config.data.num_pairs={self.num_pairs}: keys are distinct within a sample, so it must be "
                        f"<= num_keys={self.num_keys}")
    if not 0 < self.num_queries <= self.num_pairs or 3 * self.num_queries > self.segment_len:
      raise ConfigError(f"config.data.num_queries={self.num_queries}: must be in [1, num_pairs={self.num_pairs}] "
                        f"and fit as [Q, k, v] triples in segment_len={self.segment_len}")

  @property
  def key_offset(self) -> int:
    return 2

  @property
  def value_offset(self) -> int:
    return self.key_offset + self.num_keys

  @property
  def filler_offset(self) -> int:
    return self.value_offset + self.num_values

  @property
  def vocab_size(self) -> int:
    return self.filler_offset + self.num_filler

  @property
  def seq_len(self) -> int:
    return self.num_segments * self.segment_len

  @property
  def chance(self) -> float:
    return 1.0 / self.num_values

  def __len__(self) -> int:
    return 2**31 - 1  # effectively endless; a grain source needs a length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """{'tokens': int32 [T], 'loss_mask': bool [T] (True at answer tokens)}."""
    rng = np.random.default_rng([self.seed, int(index)])
    L = self.segment_len
    tokens = (self.filler_offset + rng.integers(0, self.num_filler, self.seq_len)).astype(np.int32)
    mask = np.zeros(self.seq_len, bool)
    keys = self.key_offset + rng.choice(self.num_keys, self.num_pairs, replace=False)
    values = self.value_offset + rng.integers(0, self.num_values, self.num_pairs)
    # Pairs at distinct even-aligned slots of the context, in random order.
    slots = np.sort(rng.choice((self.num_segments - 1) * L // 2, self.num_pairs, replace=False))
    tokens[2 * slots], tokens[2 * slots + 1] = keys, values
    # Queries: distinct pairs, as [Q, k, v] triples at distinct 3-aligned slots of the last segment.
    asked = rng.choice(self.num_pairs, self.num_queries, replace=False)
    where = (self.num_segments - 1) * L + 3 * np.sort(rng.choice(L // 3, self.num_queries, replace=False))
    tokens[where], tokens[where + 1], tokens[where + 2] = QUERY, keys[asked], values[asked]
    mask[where + 2] = True
    return {"tokens": tokens, "loss_mask": mask}


def from_config(config, num_segments: int | None = None, seed_offset: int = 0) -> RecallTask:
  """The task `config.data` describes (kind 'recall'), optionally at another length or with another seed."""
  d = config.data
  if d.kind != "recall":
    raise ConfigError(f"config.data.kind={d.kind!r}: this source builds only the 'recall' task")
  task = RecallTask(num_segments=num_segments or d.num_segments, segment_len=config.model.segment_len,
                    num_pairs=d.num_pairs, num_queries=d.num_queries, num_keys=d.num_keys, num_values=d.num_values,
                    num_filler=d.num_filler, seed=d.seed + seed_offset)
  if task.vocab_size > config.model.vocab_size:
    raise ConfigError(f"config.model.vocab_size={config.model.vocab_size}: the recall task uses {task.vocab_size} "
                      "token ids (2 + num_keys + num_values + num_filler); raise vocab_size to at least that")
  return task
