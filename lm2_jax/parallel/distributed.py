"""Multi-process runs: `initialize(config)` before anything touches a device, `allgather_json` for host state.

One JAX process per host (or per GPU). `config.distributed` names the coordinator, the number of processes and
this one's index; left unset, JAX detects them from the environment it runs in (SLURM, Open MPI, Cloud TPU, GKE)
and a plain machine runs one process without any initialisation.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from lm2_jax.model.config import check


def initialize(config) -> None:
  """`jax.distributed.initialize` from `config.distributed` (coordinator_address, num_processes, process_id) or,
  when coordinator_address is '', from the environment; a no-op for one process. CPU processes talk over gloo."""
  d = config.distributed
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if d.coordinator_address:
    check(isinstance(d.num_processes, int) and d.num_processes >= 1, "distributed.num_processes", d.num_processes,
          "must be the number of processes (>= 1) when distributed.coordinator_address is set")
    check(isinstance(d.process_id, int) and 0 <= d.process_id < d.num_processes, "distributed.process_id",
          d.process_id, f"must be this process's index in [0, {d.num_processes})")
    jax.distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)
    return
  try:
    jax.distributed.initialize()
  except ValueError:  # no cluster detected (JAX asks for a coordinator address): one process
    pass


def allgather_json(value: Any) -> list[Any]:
  """Every process's JSON-able `value`, by process index (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return [value]
  blob = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(blob.size)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:n])) for row, n in zip(rows, sizes)]
