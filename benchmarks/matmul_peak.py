r"""The attainable matmul peak of this machine, that MFU is measured against.

  python -m benchmarks.matmul_peak [--sizes=512,1024,2048] [--dtype=float32]

Prints the FLOP/s of a square matmul per size (best of 10 after warm-up, lm2_jax.train.flops.measure_peak_flops)
and the best of them. The trainer measures the 1024 case at start unless `config.train.peak_flops` is set; set it
to the number printed here to log MFU against a fixed peak.
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from lm2_jax.train.flops import measure_peak_flops

_SIZES = flags.DEFINE_list("sizes", ["512", "1024", "2048"], "Matrix sizes.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Matmul dtype.")


def main(argv):
  del argv
  device = jax.devices()[0]
  rates = {int(n): measure_peak_flops(int(n), jnp.dtype(_DTYPE.value)) for n in _SIZES.value}
  for n, rate in rates.items():
    print(f"{n} x {n} x {n} {_DTYPE.value} matmul: {rate / 1e9:,.1f} GFLOP/s")
  print(f"peak: {max(rates.values()):.4g} FLOP/s on {device.platform} ({device.device_kind}); "
        f"--config.train.peak_flops={max(rates.values()):.4g}")


if __name__ == "__main__":
  app.run(main)
