"""Defaults shared by every config: each experiment file starts from `get_config()` here and changes fields.

Field names are stable (DESIGN section 3): scripts, notebooks and command-line overrides depend on them.
"""

import ml_collections

from lm2_jax.model.config import default_model_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = default_model_config()

  config.train = ml_collections.ConfigDict()
  config.train.seed = 0
  config.train.batch_size = 8
  config.train.seq_len = 1024

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  return config
