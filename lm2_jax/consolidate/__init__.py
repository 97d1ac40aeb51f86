"""The sleep phase: what episodic memory holds (episodic), distilling it into the parameters (consolidate),
low-rank adapters (adapters), and writing the result (output)."""

from lm2_jax.consolidate.distill import NothingToConsolidate, Result, consolidate, default_config, with_overrides
from lm2_jax.consolidate.episodic import Holdings, holdings

__all__ = ["Holdings", "NothingToConsolidate", "Result", "consolidate", "default_config", "holdings",
           "with_overrides"]
