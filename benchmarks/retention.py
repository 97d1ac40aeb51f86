r"""The retention benchmark of the sleep phase (issue 12): facts injected, then distractor contexts, then asked.

  python -m benchmarks.retention --mode=train --kind=lm2 --out=DIR [--steps=1200 --seed=0]    # ~5-15 min on 2 cores
  python -m benchmarks.retention --mode=run --model=DIR --out=DIR2 [--seeds=0,1,2 --trials=4 --sleep_every=4]

The task (token ids, `FactTask`): a fact is the triple `Q k v` ("the key of k is v"); asking is `Q k` with the
answer `v` the next token. Keys and values are drawn at random per trial, so a trial's facts are new to the
parameters (chance: 1 / num_values). The model is trained (`train`) on streams of segments, each with 1-4 facts
among filler tokens; a fact's key may come back in a later segment with the same value (a question), and the
loss is on every value token: the first time a key appears its value is a guess, after that it is recall through
the memory (a segment sees only its own tokens and the memory).

A trial (`run`): inject one segment holding K facts; then N distractor segments (each with facts on other keys,
so they fill the memory); then ask each of the K facts (greedy next token, on a copy of the state: asking does
not change the session). N runs over 0, 1, 2, 4, ..., 64 along one stream. Arms:

  memory       episodic memory alone (no sleep)
  sleep        `Session.sleep()` after every S contexts (the fact segment counts as one)
  sleep_reset  the sleep arm's parameters with the memory reset to empty: answers from the parameters alone

Each trial starts from the trained parameters. Held-out general-text loss: the task's next-token loss on the
value tokens of held-out training-distribution streams, before and after all the sleeps of a trial (the
consolidation's own general-text term draws other streams of the same distribution). Writes retention.json,
retention.png (accuracy against N, one line per arm) and prints a table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
from absl import flags

from launch import cli

PAD, Q = 0, 1


@dataclasses.dataclass(frozen=True)
class FactTask:
  """Vocabulary: 0 pad, 1 Q, keys, values, filler. Segments of `segment_len` tokens hold facts at triple-aligned
  positions (0, 3, 6, ...) among filler."""
  segment_len: int = 16
  num_keys: int = 48
  num_values: int = 32
  num_filler: int = 32

  @property
  def vocab_size(self) -> int:
    return 2 + self.num_keys + self.num_values + self.num_filler

  def key(self, i):
    return 2 + i

  def value(self, i):
    return 2 + self.num_keys + i

  def filler(self, rng, n):
    return 2 + self.num_keys + self.num_values + rng.integers(0, self.num_filler, n)

  def segment(self, rng, facts):
    """One segment [segment_len] with the facts [(key id, value id)] at random triple positions, and the mask of
    their value positions."""
    seg = self.filler(rng, self.segment_len)
    mask = np.zeros(self.segment_len, bool)
    places = np.sort(rng.choice(self.segment_len // 3, len(facts), replace=False)) * 3
    for p, (k, v) in zip(places, facts):
      seg[p:p + 3] = (Q, self.key(k), self.value(v))
      mask[p + 2] = True
    return seg, mask

  def training_stream(self, rng, num_segments):
    """(tokens, loss mask) of one training stream: 1-4 facts per segment, each a new key or (p 1/2, when there
    is one) an earlier key again with its value."""
    values = rng.integers(0, self.num_values, self.num_keys)
    seen, fresh = [], list(rng.permutation(self.num_keys))
    toks, masks = [], []
    for _ in range(num_segments):
      facts = []
      for _ in range(rng.integers(1, 5)):
        k = seen[rng.integers(len(seen))] if seen and rng.random() < 0.5 else fresh.pop()
        facts.append((k, values[k]))
      seen += [k for k, _ in facts if k not in seen]
      t, m = self.segment(rng, facts)
      toks.append(t)
      masks.append(m)
    return np.concatenate(toks).astype(np.int32), np.concatenate(masks)

  def batch(self, rng, batch_size, num_segments):
    pairs = [self.training_stream(rng, num_segments) for _ in range(batch_size)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def model_config(kind: str, task: FactTask):
  from configs import defaults  # pylint: disable=import-outside-toplevel
  config = defaults.get_config()
  m = config.model
  m.update(dict(vocab_size=task.vocab_size, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, d_ff=128,
                segment_len=task.segment_len, bptt_segments=0))
  m.memory.kind = kind
  m.memory.num_heads = 4
  m.memory.num_slots = 8 if kind != "rmt" else 4
  m.memory.update(dict(general_slots=4, num_banks=8, bank_slots=4, top_k=2, write_tokens=2))  # hierarchical
  config.data.kind = "recall"  # token ids: the export's tokenizer is an IdTokenizer over the vocabulary
  return config


def train(kind: str, out: str, steps: int, seed: int, batch_size: int = 32, num_segments: int = 6) -> None:
  """Trains the benchmark's model and writes an export directory (launch.export's format) to `out`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from lm2_jax.data.id_tokenizer import IdTokenizer  # pylint: disable=import-outside-toplevel
  from lm2_jax.model import LM2Model, init_params  # pylint: disable=import-outside-toplevel
  from lm2_jax.sessions.export import export  # pylint: disable=import-outside-toplevel
  from lm2_jax.train.loss import next_token_loss  # pylint: disable=import-outside-toplevel

  task = FactTask()
  config = model_config(kind, task)
  model = LM2Model(config.model)
  params = init_params(model, jax.random.key(seed))
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(100, steps - 1), steps, 3e-4), weight_decay=0.01))
  opt = tx.init(params)

  def loss_fn(p, toks, mask):
    logits, _, aux = model.apply({"params": p}, toks)
    loss, acc = next_token_loss(logits, toks, mask)
    return loss + sum(aux["losses"].values(), jnp.float32(0)), (loss, acc)

  @jax.jit
  def step(p, o, toks, mask):
    (_, (loss, acc)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, toks, mask)
    upd, o = tx.update(g, o, p)
    return optax.apply_updates(p, upd), o, loss, acc

  rng = np.random.default_rng(seed)
  start, log = time.perf_counter(), []
  for i in range(steps):
    toks, mask = task.batch(rng, batch_size, num_segments)
    params, opt, loss, acc = step(params, opt, toks, mask)
    if i % 50 == 0 or i == steps - 1:
      log.append({"step": i, "loss": float(loss), "value_acc": float(acc), "seconds": time.perf_counter() - start})
      print(json.dumps(log[-1]), flush=True)
  export(out, config, jax.device_get(params), IdTokenizer(task.vocab_size))
  with open(os.path.join(out, "training_log.json"), "w") as f:
    json.dump({"kind": kind, "steps": steps, "seed": seed, "batch_size": batch_size, "num_segments": num_segments,
               "seconds": time.perf_counter() - start, "log": log}, f, indent=1)
  print(f"wrote {out} in {time.perf_counter() - start:.0f} s")


_MODE = flags.DEFINE_enum("mode", None, ["train", "run"], "train: the benchmark's model; run: the trials.")
_KIND = flags.DEFINE_string("kind", "lm2", "train: memory kind.")
_OUT = flags.DEFINE_string("out", None, "train: the export directory to write; run: the results directory.")
_STEPS = flags.DEFINE_integer("steps", 1200, "train: optimizer steps.")
_SEED = flags.DEFINE_integer("seed", 0, "train: seed.")
flags.mark_flags_as_required(["mode", "out"])


def main(argv):
  del argv
  if _MODE.value == "train":
    train(_KIND.value, _OUT.value, _STEPS.value, _SEED.value)


if __name__ == "__main__":
  cli.run(main)
