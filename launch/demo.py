r"""Forward/backward demo of an LM2 model: compiles one training-style step and times it.

  python -m launch.demo                                   # configs/tiny.py
  python -m launch.demo --config=configs/lm2_1b.py --config.train.batch_size=1 --config.train.seq_len=4096

Prints parameter counts, compile time, step time, tokens/s, the loss and what the memory was read for.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags, logging
from ml_collections import config_flags

from launch import cli
from lm2_jax.model import LM2Model, count_params, init_params
from lm2_jax.train.loss import next_token_loss

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after compilation.")


def main(argv):
  del argv
  config = cli.checked(_CONFIG.value)
  model = LM2Model(config.model)
  cfg = model.config
  counts = count_params(model)
  print(f"model: {cfg.num_layers} layers, d_model {cfg.d_model}, memory {cfg.memory.kind!r} in layers "
        f"{list(cfg.memory_layers)}")
  print(f"parameters: {counts['total']:,} total = {counts['decoder']:,} decoder + {counts['memory']:,} memory")

  rng = jax.random.key(config.train.seed)
  params = init_params(model, rng)
  B, T = config.train.batch_size, config.train.seq_len
  print(f"batch {B} x {T} tokens = {cfg.num_segments(T)} segments of {min(T, cfg.segment_len)}")
  tokens = jax.random.randint(jax.random.fold_in(rng, 1), (B, T), 0, cfg.vocab_size, dtype=jnp.int32)

  def loss_fn(p, toks, memory):
    logits, new_memory, aux = model.apply({"params": p}, toks, memory)
    loss, _ = next_token_loss(logits, toks)
    return loss, (new_memory, aux)

  @jax.jit
  def step(p, toks, memory):
    (loss, (new_memory, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, toks, memory)
    return loss, optax.tree.norm(grads), new_memory, aux

  memory = model.init_memory(B)
  t0 = time.perf_counter()
  compiled = step.lower(params, tokens, memory).compile()
  compile_s = time.perf_counter() - t0
  loss, gnorm, memory, aux = jax.block_until_ready(compiled(params, tokens, memory))  # warm-up
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    loss, gnorm, memory, aux = compiled(params, tokens, memory)
  jax.block_until_ready(loss)
  step_s = (time.perf_counter() - t0) / _STEPS.value

  print(f"compile: {compile_s:.2f} s   forward+backward step: {step_s * 1e3:.1f} ms   "
        f"{B * T / step_s:,.0f} tokens/s on {jax.devices()[0].platform} x{jax.device_count()}")
  print(f"loss {float(loss):.4f} (uniform guess: ln V = {np.log(cfg.vocab_size):.4f})   grad norm {float(gnorm):.4f}")
  if cfg.memory_layers:
    mass = np.asarray(aux["memory_stats"]["read_mass"]).mean(axis=1)  # [layers, slots]
    for layer, row in zip(cfg.memory_layers, mass):
      print(f"layer {layer}: read mass per slot (sums to 1): min {row.min():.3f} max {row.max():.3f} "
            f"entropy {float(-(row * np.log(row)).sum()):.3f} nats of max {np.log(len(row)):.3f}")
  logging.info("done")


if __name__ == "__main__":
  cli.run(main)
