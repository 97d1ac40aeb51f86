"""Orbax checkpoints of a training run: DIR/checkpoints/<step>/{state, data, config}.

  state   params, opt_state, memory and step (orbax StandardSave: restorable with plain orbax calls)
  data    the Grain iterator state (JSON), so a resumed run sees exactly the batches it would have seen
  config  the run's config (JSON), checked against the resuming config before anything is restored
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from lm2_jax.model.config import ConfigError

# Config sections whose change makes a checkpoint unusable (shapes or meaning of the saved arrays), and the
# fields inside them that only change how the model runs (inference-time knobs), which may differ.
_COMPATIBLE_REQUIRES = ("model",)
_RUNTIME_FIELDS = ("model.memory.skip_threshold", "model.memory.capacity_factor", "model.attention_kernel")


def config_json(config) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else dict(config)


class Checkpointer:
  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=False,
                                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict[str, Any], config) -> None:
    """Saves asynchronously; the directory is created by the first save, so a refused run leaves nothing."""
    os.makedirs(self.directory, exist_ok=True)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_as_dict(state)), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_json(config))))

  def check_compatible(self, step: int, config) -> None:
    """Raises ConfigError naming the first field that differs where the checkpoint cannot be reused."""
    saved = self.saved_config(step)
    now = config_json(config)
    for section in _COMPATIBLE_REQUIRES:
      for path, old, new in _differences(saved.get(section, {}), now.get(section, {}), section):
        if path in _RUNTIME_FIELDS:
          continue
        raise ConfigError(
            f"config.{path}={new!r}: the checkpoint in {self.directory} (step {step}) was written with {old!r}. "
            "Resume with the same model config, or start in a new --workdir.")

  def saved_config(self, step: int) -> dict[str, Any]:
    """The config (JSON) the checkpoint at `step` was written with."""
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def restore(self, step: int, state_template, state_shardings):
    """-> (state, data_state). `state_template` (arrays or ShapeDtypeStructs) gives structure, shapes and dtypes;
    arrays land in `state_shardings`."""
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            _as_dict(state_template), _as_dict(state_shardings))
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             data=ocp.args.JsonRestore()))
    return state_template.replace(**out["state"]), out["data"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _as_dict(state) -> dict[str, Any]:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "memory": state.memory}


def _differences(old: Any, new: Any, path: str):
  if isinstance(old, dict) and isinstance(new, dict):
    for key in sorted(set(old) | set(new)):
      yield from _differences(old.get(key), new.get(key), f"{path}.{key}")
  elif old != new:
    yield path, old, new
