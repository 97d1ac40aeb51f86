"""The built-in recall task, checked by an independent reader of its token streams."""

import numpy as np
import pytest

from lm2_jax.data.recall import QUERY, RecallTask
from lm2_jax.evaluate.recall import pair_distances
from lm2_jax.model import ConfigError

TASK = RecallTask(num_segments=4, segment_len=16, num_pairs=6, num_queries=4, num_keys=10, num_values=8,
                  num_filler=8, seed=3)


def _read(task, tokens):
  """Brute force: key -> value from the context pairs; the queries of the last segment."""
  L = task.segment_len
  context, last = tokens[:-L], tokens[-L:]
  is_key = lambda t: task.key_offset <= t < task.value_offset
  pairs = {int(context[i]): int(context[i + 1]) for i in range(len(context) - 1) if is_key(context[i])}
  queries = [(int(last[i + 1]), int(last[i + 2]), len(tokens) - L + i + 2) for i in range(L - 2) if last[i] == QUERY]
  return pairs, queries


@pytest.mark.parametrize("index", range(50))
def test_answers_are_the_values_stored_earlier(index):
  sample = TASK[index]
  tokens, mask = sample["tokens"], sample["loss_mask"]
  assert tokens.shape == (64,) and tokens.min() >= 0 and tokens.max() < TASK.vocab_size
  pairs, queries = _read(TASK, tokens)
  assert len(pairs) == TASK.num_pairs  # distinct keys, none hidden in the filler
  assert len(queries) == TASK.num_queries and len({k for k, _, _ in queries}) == TASK.num_queries
  for key, value, position in queries:
    assert pairs[key] == value
  assert sorted(np.flatnonzero(mask)) == sorted(p for _, _, p in queries)
  # No key, value or query marker in the last segment outside the queries; no query marker in the context.
  assert QUERY not in tokens[:-TASK.segment_len]


def test_deterministic_and_seeded():
  np.testing.assert_array_equal(TASK[7]["tokens"], TASK[7]["tokens"])
  assert not np.array_equal(TASK[7]["tokens"], TASK[8]["tokens"])
  other = RecallTask(**{**TASK.__dict__, "seed": 4})
  assert not np.array_equal(TASK[7]["tokens"], other[7]["tokens"])


def test_bad_task_is_rejected():
  with pytest.raises(ConfigError, match="num_pairs=40"):
    RecallTask(num_segments=2, segment_len=16, num_pairs=40, num_queries=2)
  with pytest.raises(ConfigError, match="num_queries=9"):
    RecallTask(num_segments=4, segment_len=16, num_pairs=9, num_queries=9)


def test_pair_distances_count_segments_from_the_pair_to_the_question():
  # Four segments of 6 tokens, written by hand: k1's pair in segment 0, k2's in segment 1, filler in segment 2,
  # the questions [Q k2 v2] [Q k1 v1] in segment 3: distances 3 - 1 = 2 and 3 - 0 = 3.
  k1, v1, k2, v2, Q = 10, 20, 11, 21, QUERY
  tokens = np.array([[5, 6, k1, v1, 7, 7, 7, 7, k2, v2, 7, 7, 7, 7, 7, 7, 7, 7, Q, k2, v2, Q, k1, v1]])
  mask = np.zeros_like(tokens, bool)
  mask[0, [20, 23]] = True
  answers, dist = pair_distances(tokens, mask, segment_len=6)
  np.testing.assert_array_equal(answers, [[20, 23]])
  np.testing.assert_array_equal(dist, [[2, 3]])
