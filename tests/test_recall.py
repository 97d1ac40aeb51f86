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


@pytest.mark.parametrize("kind", ["lm2", "hierarchical"])  # hierarchical: its general level's gates
def test_write_gates_by_token_averages_the_gates_of_the_context_segments(kind):
  """Gates made constant (zero kernels; biases 0 and log 3 for the two layers' write gates, -1 and 2 for the input
  and forget gates): every class must average to the formula's values, sigmoid(0) and sigmoid(log 3) = 0.75 mean
  0.625, sigmoid(-1), sigmoid(2); `none` has no gates."""
  import jax
  import jax.numpy as jnp

  from configs import quickstart
  from lm2_jax.evaluate.recall import write_gates_by_token
  from lm2_jax.train import trainer

  config = quickstart.get_config()
  config.model.scan_layers = True  # the layers' parameters stacked: [2, ...]
  config.model.memory.kind = kind
  setup = trainer.build(config)
  params = trainer.init_state(setup).params
  constants = {"write_gate": jnp.asarray([0.0, np.log(3.0)])[:, None], "in_gate": -1.0, "forget_gate": 2.0}

  def constant_gate(path, leaf):
    names = [getattr(k, "key", "") for k in path]
    gate = next((g for g in constants if g in names), None)
    if gate is None:
      return leaf
    return jnp.zeros_like(leaf) if names[-1] == "kernel" else jnp.broadcast_to(constants[gate], leaf.shape)

  params = jax.tree_util.tree_map_with_path(constant_gate, params)
  task = RecallTask(num_segments=4, segment_len=32, num_pairs=6, num_queries=4, num_keys=32, num_values=16,
                    num_filler=32, seed=5)
  got = write_gates_by_token(setup, params, task, num_samples=8, batch_size=8)
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  want = {"write_strength/key": 0.625, "write_strength/value": 0.625, "write_strength/filler": 0.625,
          "in_gate/pair_segment": sigmoid(-1.0), "in_gate/filler_segment": sigmoid(-1.0),
          "forget_gate/pair_segment": sigmoid(2.0), "forget_gate/filler_segment": sigmoid(2.0)}
  assert set(got) <= set(want) and {"write_strength/key", "write_strength/filler", "in_gate/pair_segment"} <= set(got)
  for name, value in got.items():
    np.testing.assert_allclose(value, want[name], rtol=1e-5)
  config.model.memory.kind = "none"
  none = trainer.build(config)
  assert write_gates_by_token(none, trainer.init_state(none).params, task, num_samples=8, batch_size=8) is None
