"""Grain pipelines: a random-access source -> per-process shard -> batches -> a checkpointable iterator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np


def _stack(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def batches(source: Any, global_batch_size: int, *, shuffle_seed: int | None = None, num_threads: int = 2,
            prefetch: int = 8) -> grain.DatasetIterator:
  """Iterator over {name: [global_batch / process_count, ...]} numpy batches of this process's shard.

  `source` is random access (`__len__`, `__getitem__`). The iterator's `get_state()` / `set_state()` make it
  checkpointable: a restored iterator continues with exactly the batch that would have come next.
  """
  if global_batch_size % jax.process_count():
    raise ValueError(f"config.train.batch_size={global_batch_size}: must be a multiple of the "
                     f"{jax.process_count()} JAX processes")
  ds = grain.MapDataset.source(source)
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=shuffle_seed)
  ds = ds[jax.process_index()::jax.process_count()]
  ds = ds.batch(global_batch_size // jax.process_count(), drop_remainder=True, batch_fn=_stack)
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))
