r"""Starts a training workdir from a Hugging Face Llama checkpoint: its weights, with the config's memory freshly
initialised (or read back from memory.safetensors, as `hf_llama.save` writes it), as a step-0 checkpoint.

  python -m launch.import_hf --hf_dir=path/to/Llama-3.2-1B --config=configs/llama3_2_1b.py --workdir=DIR
  python -m launch.train --config=configs/llama3_2_1b.py --workdir=DIR     # the same config: resumes at step 0

The config's model shape must be the checkpoint's (the first differing field is named); its memory, segment
length and training fields are the config's own. Memory parameters are drawn with config.train.seed.
"""

import sys

import jax
from absl import flags
from ml_collections import config_flags

from launch import cli
from lm2_jax.interop import hf_llama
from lm2_jax.train import trainer

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory (config.json + safetensors).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config the workdir will train.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "New training workdir.")
flags.mark_flags_as_required(["hf_dir", "config", "workdir"])


def main(argv):
  del argv
  config = _CONFIG.value
  try:
    hf_llama.check_matches(_HF_DIR.value, config.model)
    _, params = hf_llama.load(_HF_DIR.value, config.model, rng=jax.random.key(config.train.seed))
    trainer.start_from(config, _WORKDIR.value, params)
  except (ValueError, OSError) as e:  # ConfigError is a ValueError
    sys.exit(f"error: {e}")
  print(f"wrote {_WORKDIR.value}/checkpoints/0; train with python -m launch.train --config=... "
        f"--workdir={_WORKDIR.value}")


if __name__ == "__main__":
  cli.run(main)
