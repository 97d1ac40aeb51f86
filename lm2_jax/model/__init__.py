"""Model code: the decoder, the memory kinds, parameter layout and initialisation."""

from lm2_jax.model.build import count_params, init_params, param_axes
from lm2_jax.model.config import ConfigError, ModelConfig
from lm2_jax.model.decoder import LM2Model, layer_groups
from lm2_jax.model.layout import scan_layout, unscan_layout

__all__ = ["ConfigError", "LM2Model", "ModelConfig", "count_params", "init_params", "layer_groups", "param_axes",
           "scan_layout", "unscan_layout"]
