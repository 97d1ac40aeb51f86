"""The retention benchmark's task: which value tokens are recall, and the general text's own keys."""

import numpy as np

from benchmarks.retention import Q, FactTask, _general_stream

TASK = FactTask()


def test_recall_mask_marks_values_whose_key_came_earlier_in_the_row():
  k, v, f = TASK.key, TASK.value, TASK.filler(np.random.default_rng(0), 1)[0]
  row = [Q, k(3), v(1), f, Q, k(5), v(2), Q, k(3), v(1), Q, k(5), v(2), Q, k(9), v(0)]
  toks = np.array([row, row[3:] + row[:3]])
  mask = np.isin(np.arange(16), [2, 6, 9, 12, 15])[None].repeat(2, 0)
  mask[1] = np.roll(mask[0], -3)
  want = np.zeros((2, 16), bool)
  want[0, [9, 12]] = True   # k3 and k5 again; k9 is new
  want[1, [9, 15]] = True   # rotated by 3: k5 at 3 and k3 at 6 are new, k5 at 9 and k3 at 15 again
  np.testing.assert_array_equal(TASK.recall_mask(toks, mask), want)


def test_general_text_uses_only_the_general_keys():
  stream = _general_stream(TASK, 0, streams=8)
  keys = stream[np.nonzero(stream == Q)[0] + 1] - TASK.key(0)
  assert keys.min() >= 0 and keys.max() < TASK.general_keys
  assert len(set(keys.tolist())) > TASK.general_keys // 2
  rng = np.random.default_rng(1)
  trial_keys = TASK.general_keys + rng.permutation(TASK.num_keys - TASK.general_keys)
  toks, _ = TASK.training_stream(rng, 6, trial_keys)
  assert set((toks[np.nonzero(toks == Q)[0] + 1] - TASK.key(0)).tolist()) <= set(trial_keys.tolist())
