r"""Stability of the titans memory: trains memory depth 4 on 4K-token rows and reports any non-finite value.

  nice -n 5 python -m benchmarks.titans_stability [--steps=2000] [--d_model=64] [--out=FILE.json]

titans-pytorch's tracker reports NaN losses at memory depth 4, divergence at 4K-token sequences and NaN within
10 steps; this runs our trainer's jit train step (lm2_jax.train.trainer, forward + backward + AdamW with
clipping, `train.nonfinite='skip'` so that a bad step is counted, not fatal) at memory depth 4 on rows of
--seq_len tokens (a fresh memory per row, gradients through all segments: bptt_segments=0), on the recall task
(lm2_jax.data.recall: key-value pairs among filler, queries in the last segment; the loss covers every token).
Every --log_every steps it records the mean loss, the answer accuracy, the gradient norm and the memory's surprise
(its mean gradient norm before clipping); at the end it prints the curve and the counts of steps whose loss,
gradients or parameters were not finite, and writes them to --out.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags

from configs import defaults
from launch import compile_cache
from lm2_jax.data import recall
from lm2_jax.train import trainer

_STEPS = flags.DEFINE_integer("steps", 2000, "Training steps.")
_D = flags.DEFINE_integer("d_model", 64, "Width.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Decoder layers (all with memory).")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention and memory heads.")
_SEG = flags.DEFINE_integer("segment_len", 128, "Tokens per segment.")
_SEQ = flags.DEFINE_integer("seq_len", 4096, "Tokens per row.")
_BATCH = flags.DEFINE_integer("batch", 2, "Rows per step.")
_DEPTH = flags.DEFINE_integer("depth", 4, "memory.depth: layers of the memory MLP.")
_CHUNK = flags.DEFINE_integer("chunk", 32, "memory.chunk_size.")
_VARIANT = flags.DEFINE_string("variant", "mac", "memory.variant.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "train.seed and data.seed.")
_LOG = flags.DEFINE_integer("log_every", 50, "Steps per point of the curve.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the curve and the counts.")


def config_for():
  config = defaults.get_config()
  m = config.model
  m.update(dict(d_model=_D.value, num_layers=_LAYERS.value, num_heads=_HEADS.value, num_kv_heads=_HEADS.value,
                d_ff=2 * _D.value, segment_len=_SEG.value, bptt_segments=0))
  m.memory.update(dict(kind="titans", variant=_VARIANT.value, depth=_DEPTH.value, chunk_size=_CHUNK.value,
                       num_heads=_HEADS.value))
  d = config.data
  d.update(dict(kind="recall", num_segments=_SEQ.value // _SEG.value, num_pairs=16, num_queries=8, num_keys=64,
                num_values=64, num_filler=64, seed=_SEED.value))
  m.vocab_size = 2 + d.num_keys + d.num_values + d.num_filler
  config.train.update(dict(batch_size=_BATCH.value, seq_len=_SEQ.value, steps=_STEPS.value, seed=_SEED.value,
                           learning_rate=_LR.value, warmup_steps=100, nonfinite="skip"))
  return config


def main(argv):
  del argv
  compile_cache.enable()
  config = config_for()
  task = recall.from_config(config)
  setup = trainer.build(config)
  state = trainer.init_state(setup)
  step_fn = trainer.make_train_step(setup)
  rows, curve, window = 0, [], []
  bad = {"loss": 0, "grads": 0, "params": 0, "steps": 0}
  t0 = time.time()
  for step in range(1, _STEPS.value + 1):
    samples = [task[rows + i] for i in range(_BATCH.value)]
    rows += _BATCH.value
    batch = {"tokens": np.stack([s["tokens"] for s in samples])}
    state, metrics = step_fn(state, trainer.put_batch(setup, batch))
    health = jax.device_get(metrics.pop("health"))
    if not health["ok"]:
      bad["steps"] += 1
      bad["loss"] += int(health["loss"])
      bad["grads"] += int(any(jax.tree.leaves(health["grads"])))
      bad["params"] += int(any(jax.tree.leaves(health["params"])))
    window.append({k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0})
    if step % _LOG.value == 0 or step == _STEPS.value:
      point = {"step": step, "s": round(time.time() - t0, 1),
               **{k: float(np.mean([w[k] for w in window])) for k in ("loss", "accuracy", "grad_norm")},
               "max_grad_norm": max(w["grad_norm"] for w in window)}
      window = []
      curve.append(point)
      print(json.dumps(point), flush=True)
      _write(curve, bad, step, t0)
  _write(curve, bad, _STEPS.value, t0)
  print(f"non-finite steps: {bad} of {_STEPS.value}; loss {curve[0]['loss']:.3f} -> {curve[-1]['loss']:.3f}")


def _write(curve, bad, done, t0):
  """The result so far to --out (a run cut short still leaves its curve)."""
  result = {"config": {"d_model": _D.value, "layers": _LAYERS.value, "heads": _HEADS.value, "depth": _DEPTH.value,
                       "chunk_size": _CHUNK.value, "variant": _VARIANT.value, "seq_len": _SEQ.value,
                       "segment_len": _SEG.value, "batch": _BATCH.value, "steps": _STEPS.value,
                       "learning_rate": _LR.value, "seed": _SEED.value},
            "steps_done": done, "nonfinite": bad, "curve": curve, "wall_s": round(time.time() - t0, 1)}
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
