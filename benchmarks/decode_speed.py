r"""Decode speed of a checkpoint: cached decoding (lm2_jax.sessions.decoding.generate) against re-running the whole
sequence for every new token, and the time to the first token of a long prompt.

  python -m benchmarks.decode_speed --workdir=DIR [--batch_sizes=1,16] [--prompt_len=96] [--new_tokens=64]
                                    [--long_prompt=4096] [--repeats=3]

Greedy, prompts of random ids. Every function is compiled before it is timed (one untimed run); a time is the
best of --repeats runs. tokens/s counts new tokens of the whole batch. Uncached: the sequence so far, padded to
whole segments (causal: the padding is never read), through the ordinary forward, argmax of the last real
position; it compiles once per number of segments, all before timing. The two must give the same tokens.
"""

import os
import time

import jax
import numpy as np
from absl import app, flags

from lm2_jax.sessions.decoding import Sampling, generate
from lm2_jax.sessions.export import load_checkpoint
from lm2_jax.model import LM2Model

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with checkpoints/.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes to time.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 96, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "New tokens per row.")
_LONG = flags.DEFINE_integer("long_prompt", 4096, "Prompt length for the time to first token (batch 1).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs; the best is reported.")
flags.mark_flags_as_required(["workdir"])


def best_time(fn, repeats: int):
  """(best seconds, result) of `repeats` runs of fn after one untimed run."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return min(times), out


def uncached(forward, params, prompts: np.ndarray, new: int, segment_len: int) -> np.ndarray:
  """Greedy tokens [B, new], each from a forward over the whole sequence so far."""
  B, P = prompts.shape
  seq = np.zeros((B, -(-(P + new) // segment_len) * segment_len), np.int32)
  seq[:, :P] = prompts
  for n in range(P, P + new):
    T = -(-n // segment_len) * segment_len
    logits = forward(params, seq[:, :T])
    seq[:, n] = np.asarray(logits[:, n - 1].argmax(-1))
  return seq[:, P:P + new]


def main(argv):
  del argv
  config, params, _ = load_checkpoint(_WORKDIR.value)
  model = LM2Model(config.model)
  params = jax.device_put(params)
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
  S, V, new = config.model.segment_len, config.model.vocab_size, _NEW.value
  rng = np.random.default_rng(0)
  print(f"checkpoint {_WORKDIR.value}: memory {config.model.memory.kind}, {config.model.num_layers} layers, d_model "
        f"{config.model.d_model}, segment_len {S}; {jax.devices()[0].platform}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}")
  print(f"greedy, prompt {_PROMPT_LEN.value} tokens, {new} new tokens per row, best of {_REPEATS.value}")
  for B in (int(b) for b in _BATCH_SIZES.value):
    prompts = rng.integers(0, V, (B, _PROMPT_LEN.value)).astype(np.int32)
    sampling = Sampling(max_new_tokens=new)
    t_cached, cached = best_time(lambda: generate(model, params, prompts.tolist(), sampling), _REPEATS.value)
    t_full, full = best_time(lambda: uncached(forward, params, prompts, new, S), _REPEATS.value)
    same = np.array_equal(np.asarray(cached), full)
    print(f"batch {B:3d}: cached {B * new / t_cached:9.1f} tokens/s ({t_cached:.3f} s), uncached "
          f"{B * new / t_full:9.1f} tokens/s ({t_full:.3f} s), speed-up {t_full / t_cached:.1f}x; same tokens: {same}")

  long = rng.integers(0, V, (1, _LONG.value)).astype(np.int32)
  first = Sampling(max_new_tokens=1)
  t_cold = time.perf_counter()
  generate(model, params, long.tolist(), first)
  t_cold = time.perf_counter() - t_cold
  t_cached, cached = best_time(lambda: generate(model, params, long.tolist(), first), _REPEATS.value)
  t_full, logits = best_time(lambda: np.asarray(forward(params, long)[:, -1]), _REPEATS.value)
  print(f"time to first token, {_LONG.value}-token prompt, batch 1: cached (prefill by segments) {t_cached:.3f} s "
        f"({t_cold:.3f} s on the first call, after the runs above); one forward over the whole prompt {t_full:.3f} s; "
        f"same token: {cached[0][0] == int(logits.argmax())}")


if __name__ == "__main__":
  app.run(main)
