r"""Trains a config: python -m launch.train --config=configs/quickstart.py --workdir=DIR [--config.field=value ...]

The data comes from `config.data` (the built-in recall task, text files, ArrayRecord files or a TFDS dataset).
Resumes from the newest good checkpoint in DIR/checkpoints when there are any. Ctrl-C or SIGTERM saves a
checkpoint before exiting (status 130 or 143). Errors in the config or data print as one line (--verbose or
LM2_VERBOSE=1: the traceback).
"""

from absl import flags
from ml_collections import config_flags

from launch import cli
from lm2_jax.parallel import distributed
from lm2_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and config.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  config = cli.checked(_CONFIG.value)
  distributed.initialize(config)
  trainer.train(config, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
