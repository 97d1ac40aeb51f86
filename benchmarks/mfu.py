r"""Model FLOP utilisation of a config's train step on this machine's accelerator (or CPU).

  python -m benchmarks.mfu --config=configs/lm2_1b.py [--config.train.batch_size=4 ...] [--steps=5]
                           [--peak_flops=9.89e14]

Builds what `launch.train` runs for the config (mesh, shardings, AdamW, remat: `lm2_jax.train.trainer.build` and
`make_train_step`), feeds it random tokens of [train.batch_size, train.seq_len], and times `--steps` train steps
after the compiling one. Prints the median step time, tokens/s, model FLOPs per token (`lm2_jax/train/flops.py`:
matmuls and attention of the layers, logits and memory; forward + backward = 3 x forward), the model FLOP/s and
the MFU against two peaks:

- `--peak_flops`: the devices' data-sheet dense peak in the config's dtype (H100 SXM: 989 TFLOP/s in bfloat16),
  the usual denominator of published MFU numbers; 0 skips it;
- the peak the trainer logs MFU against (`lm2_jax.train.trainer.peak_flops`): `train.peak_flops` when set, else
  a square matmul in the config's dtype measured now (8192^3 on an accelerator, 1024^3 on CPU) times the devices.

On a GPU it also prints the device's peak memory in use. The config's `model.attention_kernel` picks the
attention kernel (`--config.model.attention_kernel=cudnn` on a GPU).
"""

import statistics

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from benchmarks import timed_calls
from launch import cli
from lm2_jax.train import trainer
from lm2_jax.train.flops import train_flops_per_token

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed train steps after the compiling one (the median is reported).")
_PEAK = flags.DEFINE_float("peak_flops", 0.0, "Data-sheet dense peak FLOP/s of all devices in the config's dtype "
                           "(H100 SXM bfloat16: 9.89e14 per GPU); 0: not reported.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  config = cli.checked(_CONFIG.value)
  setup = trainer.build(config)
  state = trainer.init_state(setup)
  B, T = config.train.batch_size, config.train.seq_len
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (B, T), dtype=np.int32)
  batch = trainer.put_batch(setup, {"tokens": tokens})
  step = trainer.make_train_step(setup)

  def train():
    nonlocal state, metrics
    state, metrics = step(state, batch)
    return metrics

  metrics = None
  first, times = timed_calls(train, _STEPS.value)
  seconds = statistics.median(times)

  devices = jax.devices()
  peak, source = trainer.peak_flops(config)
  per_token = train_flops_per_token(setup.model.config, T)
  tokens_per_s = B * T / seconds
  m = config.model
  print(f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}); memory {m.memory.kind}, "
        f"{m.num_layers} layers, d_model {m.d_model}, {m.dtype}, attention {m.attention_kernel}, remat "
        f"{m.remat_policy}; batch {B} x {T} tokens; loss {float(metrics['loss']):.3f}")
  print(f"step {seconds * 1e3:.1f} ms (median of {_STEPS.value}; steps {', '.join(f'{t * 1e3:.1f}' for t in times)}"
        f"), first step with compilation {first:.1f} s; {tokens_per_s:,.0f} tokens/s")
  print(f"peak: {peak / 1e12:.1f} TFLOP/s, {source}")
  if per_token is None:
    print(f"memory kind {m.memory.kind} has no FLOP formula: no MFU")
    return
  achieved = per_token * tokens_per_s
  line = (f"model FLOPs/token {per_token:.4g}; {achieved / 1e12:.1f} TFLOP/s; MFU {achieved / peak:.1%} of "
          f"that peak")
  if _PEAK.value:
    line += f", {achieved / _PEAK.value:.1%} of {_PEAK.value / 1e12:.0f} TFLOP/s (--peak_flops)"
  print(line)
  stats = devices[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    print(f"device memory: peak {stats['peak_bytes_in_use'] / 2**30:.1f} GiB of "
          f"{stats.get('bytes_limit', 0) / 2**30:.1f} GiB")


if __name__ == "__main__":
  cli.run(main)
