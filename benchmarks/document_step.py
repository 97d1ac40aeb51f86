r"""Train-step time without document ids, with packed documents of one document per row, and with a document
boundary in every segment (where a memory kind must also read a fresh memory).

  python -m benchmarks.document_step [--kind=lm2] [--repeats=5]

Shape of the performance issue: batch 4 x 512 tokens, d_model 256, 4 layers, 4 heads, 128-token segments, vocab
1024, float32, 16 memory slots; one forward+backward (jax.value_and_grad), median of `repeats` after compilation.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lm2_jax.model import LM2Model, init_params
from lm2_jax.model.config import default_model_config
from lm2_jax.train.loss import next_token_loss

_KIND = flags.DEFINE_string("kind", "lm2", "Memory kind.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps (median).")


def config(kind: str):
  m = default_model_config()
  m.update(dict(vocab_size=1024, d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, d_ff=688, segment_len=128,
                bptt_segments=4))
  m.memory.update(dict(kind=kind, num_slots=16, num_heads=4))
  return m


def step_seconds(model, params, tokens, ids) -> float:
  def loss(p):
    logits, _, aux = model.apply({"params": p}, tokens, segment_ids=ids)
    return next_token_loss(logits, tokens)[0] + sum(aux["losses"].values(), 0.0)
  step = jax.jit(jax.value_and_grad(loss))
  jax.block_until_ready(step(params))
  times = []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    jax.block_until_ready(step(params))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv):
  del argv
  model = LM2Model(config(_KIND.value))
  params = init_params(model, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 512), 0, 1024)
  one = jnp.ones((4, 512), jnp.int32)
  boundaries = jnp.broadcast_to(1 + jnp.arange(512) // 128 + (jnp.arange(512) % 128 >= 64), (4, 512))
  for name, ids in [("no document ids", None), ("one document per row", one),
                    ("a boundary in every segment", boundaries)]:
    s = step_seconds(model, params, tokens, ids)
    print(f"{_KIND.value}: {name}: {1000 * s:.0f} ms/step, {4 * 512 / s:.0f} tokens/s")


if __name__ == "__main__":
  app.run(main)
