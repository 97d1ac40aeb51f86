r"""The attainable matmul peak of this machine, that MFU is measured against, and matmuls at a model's shapes.

  python -m benchmarks.matmul_peak [--sizes=512,1024,2048] [--dtype=float32]
                                   [--shapes=512x256x682,...] [--torch]

Prints the FLOP/s of a square matmul per size (best of 10 after warm-up, lm2_jax.train.flops.measure_peak_flops)
and the best of them. The trainer measures the 1024 case at start unless `config.train.peak_flops` is set; set it
to the number printed here to log MFU against a fixed peak. `--shapes` (MxKxN) also times rectangular matmuls,
by default those of the issue-15 train step (640 = 4 rows x (128 + 2 x 16) positions of a segment, 682 the
feed-forward width); with `--torch`, torch.matmul at the same shapes and thread count (float32 only; torch comes
with `pip install -e '.[peers]'`).
"""

import os

from benchmarks import machine  # noqa: I001  (imports `launch` before JAX starts)
import jax
import jax.numpy as jnp
from absl import app, flags

from lm2_jax.train.flops import best_seconds, measure_matmul_flops, measure_peak_flops

_SIZES = flags.DEFINE_list("sizes", ["512", "1024", "2048"], "Matrix sizes.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Matmul dtype.")
_SHAPES = flags.DEFINE_list("shapes", ["512x256x682", "512x682x256", "256x512x682", "640x256x682", "682x640x256"],
                            "Rectangular matmuls MxKxN to time as well.")
_TORCH = flags.DEFINE_bool("torch", False, "Also time torch.matmul at the same shapes (float32).")


def _torch_flops(m: int, k: int, n: int) -> float:
  import torch

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  a, b = torch.randn(m, k), torch.randn(k, n)
  return 2 * m * k * n / best_seconds(lambda: a @ b)


def main(argv):
  del argv
  device = jax.devices()[0]
  dtype = jnp.dtype(_DTYPE.value)
  rates = {int(n): measure_peak_flops(int(n), dtype) for n in _SIZES.value}
  for n, rate in rates.items():
    print(f"{n} x {n} x {n} {_DTYPE.value} matmul: {rate / 1e9:,.1f} GFLOP/s")
  print(f"peak: {max(rates.values()):.4g} FLOP/s on {device.platform} ({device.device_kind}; {machine()}); "
        f"--config.train.peak_flops={max(rates.values()):.4g}")
  torch_ok = _TORCH.value and _DTYPE.value == "float32"
  if _TORCH.value and not torch_ok:
    print("--torch: float32 only; skipped")
  for shape in _SHAPES.value:
    m, k, n = (int(x) for x in shape.split("x"))
    line = f"[{m},{k}] x [{k},{n}] {_DTYPE.value}: jax {measure_matmul_flops(m, k, n, dtype) / 1e9:,.1f} GFLOP/s"
    if torch_ok:
      try:
        line += f", torch {_torch_flops(m, k, n) / 1e9:,.1f} GFLOP/s"
      except ModuleNotFoundError as e:
        line += f" (torch skipped: {e}; pip install -e '.[peers]')"
    print(line)


if __name__ == "__main__":
  app.run(main)
