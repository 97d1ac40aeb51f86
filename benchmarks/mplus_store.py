r"""M+'s host long-term store: host memory and retrieval latency per query at 10K, 100K and 1M stored tokens.

  python -m benchmarks.mplus_store [--token_dim=512 --retriever_dim=32 --queries=1,32 --r=64 --repeats=20]

One memory layer's `LongTermStore` (lm2_jax.model.memory.ltm_store) is filled with random tokens (float16 hidden
states of `token_dim`) and retriever keys (float16, `retriever_dim`); a query is `LongTermStore.search` of the
top-r entries for Q query vectors (Q=1: a session's mean prompt query; Q=32: a query scored token by token and
averaged, as M+ does). Host memory is the store's allocated bytes per layer (`nbytes`); latency is the median
over `repeats` searches (after one warm-up), on this machine's CPU. A model keeps one store per memory layer:
multiply the memory by the number of memory layers.
"""

import json
import time

import numpy as np
from absl import app, flags

from lm2_jax.model.memory.ltm_store import LongTermStore

_TOKEN_DIM = flags.DEFINE_integer("token_dim", 512, "Width of a stored token (d_model).")
_KEY_DIM = flags.DEFINE_integer("retriever_dim", 32, "Width of the retriever keys.")
_SIZES = flags.DEFINE_list("sizes", ["10000", "100000", "1000000"], "Stored tokens per layer.")
_QUERIES = flags.DEFINE_list("queries", ["1", "32"], "Query vectors per search.")
_R = flags.DEFINE_integer("r", 64, "Tokens retrieved per search.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed searches per row.")


def main(_):
  rng = np.random.default_rng(0)
  rows = []
  for n in map(int, _SIZES.value):
    store = LongTermStore(1, _TOKEN_DIM.value, _KEY_DIM.value, capacity=n)
    chunk = 100_000
    for start in range(0, n, chunk):
      m = min(chunk, n - start)
      store.add(0, rng.standard_normal((m, _TOKEN_DIM.value), np.float32).astype(np.float16),
                rng.standard_normal((m, _KEY_DIM.value), np.float32).astype(np.float16), np.full(m, start / chunk))
    for q in map(int, _QUERIES.value):
      queries = rng.standard_normal((q, _KEY_DIM.value)).astype(np.float32)
      store.search(0, queries, _R.value)
      times = []
      for _ in range(_REPEATS.value):
        t = time.perf_counter()
        store.search(0, queries, _R.value)
        times.append(time.perf_counter() - t)
      row = {"stored_tokens": n, "queries": q, "r": _R.value, "host_mib_per_layer": round(store.nbytes / 2**20, 1),
             "search_ms_median": round(1e3 * float(np.median(times)), 2)}
      rows.append(row)
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  app.run(main)
