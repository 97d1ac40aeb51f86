"""Orbax checkpoints of a training run: DIR/checkpoints/<step>/{state, data, config, checksums}.

  state      params, opt_state, memory and step (orbax StandardSave: restorable with plain orbax calls)
  data       every process's Grain iterator state (JSON, by process index) after the step, so a resumed run sees
             exactly the batches it would have seen
  config     the run's config (JSON), checked against the resuming config before anything is restored
  checksums  a checksum of the bits of every array of `state` and a hash of `data` and `config`: storage passes
             bit rot on silently, a restore compares them

Only finite states are saved, and a restore verifies the checkpoint (every item present and readable, the
checksums equal, the arrays finite). `newest_good` reports a damaged checkpoint (its step and why) and
falls back to the newest good one before it; training moves the damaged ones to DIR/damaged_checkpoints/ so that
it can save their steps again, and never deletes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from etils import epath

from lm2_jax.model.config import ConfigError
from lm2_jax.parallel.distributed import allgather_json

ITEMS = ("state", "data", "config", "checksums")
# Config fields whose change makes a checkpoint unusable (shapes or meaning of the saved arrays), and the fields
# inside them that only change how the model runs, not its parameters (inference knobs, recomputation, unrolling),
# which may differ.
_COMPATIBLE_REQUIRES = ("model", "train.batch_size", "train.grad_accum_steps")
_RUNTIME_FIELDS = ("model.memory.skip_threshold", "model.memory.capacity_factor", "model.attention_kernel",
                   "model.segment_unroll", "model.remat_policy")


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used or written; the message names the step and why."""


def config_json(config) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else dict(config)


def _json_hash(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@jax.jit
def _array_checksums(tree):
  """Per array: the sum of its bits as uint32 words times odd position weights, mod 2**32 (any single flipped bit
  changes it: an odd multiple of 2**k is never 0 mod 2**32); and whether all its elements are finite."""
  def checksum(x):
    x = x.reshape(-1)
    if x.dtype == jnp.bool_:
      words = x.astype(jnp.uint32)
    else:
      words = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
      words = words.astype(jnp.uint32)
    weights = 2 * jax.lax.iota(jnp.uint32, x.size) + 1
    return jnp.sum(words * weights, dtype=jnp.uint32)
  def finite(x):
    return jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  return jax.tree.map(checksum, tree), jax.tree.map(finite, tree)


def state_checksums(state: dict[str, Any]) -> tuple[dict[str, int], list[str]]:
  """({array path: checksum}, [paths of arrays with a non-finite element]) of a state dict."""
  sums, finite = jax.device_get(_array_checksums(state))
  named = lambda tree: {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  return {k: int(v) for k, v in named(sums).items()}, [k for k, ok in named(finite).items() if not ok]


def _first_line(error: BaseException, limit: int = 240) -> str:
  """The first line of the error's root cause (TensorStore's names the array and what is wrong with it)."""
  for _ in range(10):
    if (error.__cause__ or error.__context__) is None:
      break
    error = error.__cause__ or error.__context__
  text = f"{type(error).__name__}: {str(error).strip()}".split("\n")[0]
  return text if len(text) <= limit else text[:limit] + "..."


class Checkpointer:
  """`workdir`'s checkpoints, of which saving keeps the newest `keep` (None: all)."""

  def __init__(self, workdir: str, *, keep: int | None = None, async_save: bool = True):
    workdir = str(workdir)
    self.workdir = epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))
    self.directory = self.workdir / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=False,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    """The steps with a checkpoint, newest first."""
    return sorted(self.manager.all_steps(), reverse=True)

  def save(self, step: int, state, data_state: dict[str, Any], config) -> None:
    """Saves asynchronously; the directory is created by the first save, so a refused run leaves nothing.
    Refuses (CheckpointError) a state with a non-finite array: a checkpoint on disk is always finite."""
    state = _as_dict(state)
    sums, nonfinite = state_checksums(state)
    if nonfinite:
      raise CheckpointError(f"refusing to save step {step}: {nonfinite[0]} holds non-finite values "
                            f"({len(nonfinite)} arrays do); the checkpoints on disk are left as they are")
    config = config_json(config)
    data_state = {"processes": allgather_json(data_state)}  # each process's own, by process index
    checksums = {"state": sums, "data": _json_hash(data_state), "config": _json_hash(config)}
    self.directory.mkdir(parents=True, exist_ok=True)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config),
        checksums=ocp.args.JsonSave(checksums)))

  def check_compatible(self, step: int, config) -> None:
    """Raises ConfigError naming the first field that differs where the checkpoint cannot be reused, or
    CheckpointError when its config cannot be read."""
    saved = self.saved_config(step)
    now = config_json(config)
    for field in _COMPATIBLE_REQUIRES:
      for path, old, new in _differences(_get(saved, field), _get(now, field), field):
        if path in _RUNTIME_FIELDS:
          continue
        raise ConfigError(
            f"config.{path}={new!r}: the checkpoint in {self.directory} (step {step}) was written with {old!r}. "
            f"Resume with the same {field}, or start in a new --workdir.")

  def saved_config(self, step: int) -> dict[str, Any]:
    """The config (JSON) the checkpoint at `step` was written with, checked against its hash."""
    config = self._read_json(step, "config")
    self._check_hash(step, "config", config)
    return config

  def restore(self, step: int, state_template, state_shardings):
    """-> (state, data_state), verified; CheckpointError names the step and what is wrong. `state_template`
    (arrays or ShapeDtypeStructs) gives structure, shapes and dtypes; arrays land in `state_shardings`."""
    data_state = self._read_json(step, "data")
    self._check_hash(step, "data", data_state)
    data_state = self._process_data_state(step, data_state)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            _as_dict(state_template), _as_dict(state_shardings))
    self._require(step, "state")
    try:
      state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:  # TensorStore and Orbax raise many types for unreadable, truncated or missing arrays
      raise self._damaged(step, f"item 'state' cannot be read ({_first_line(e)})") from e
    sums, nonfinite = state_checksums(state)
    expected = self._checksums(step).get("state", sums)
    for name in sorted(set(sums) | set(expected)):
      if sums.get(name) != expected.get(name):
        raise self._damaged(step, f"item 'state': array {name} does not match its checksum (bit rot?)")
    if nonfinite:
      raise self._damaged(step, f"item 'state': array {nonfinite[0]} holds non-finite values")
    return state_template.replace(**state), data_state

  def _process_data_state(self, step: int, saved: dict[str, Any]) -> dict[str, Any]:
    """This process's data state out of the data item (which holds one per process)."""
    if "processes" not in saved:  # written by one process before the item held one state per process
      saved = {"processes": [saved]}
    count = len(saved["processes"])
    if count != jax.process_count():
      raise ConfigError(f"config.distributed.num_processes={jax.process_count()}: the checkpoint at step {step} in "
                        f"{self.directory} was written by {count} processes, each with its own data state; resume "
                        f"with {count} processes, or start in a new --workdir")
    return saved["processes"][jax.process_index()]

  def newest_good(self, load: Callable[[int], Any], *, set_aside: bool = False):
    """`load(step)` of the newest step for which it raises no CheckpointError (`load` restores and verifies),
    or None when there is no checkpoint. Each damaged one on the way is reported on stderr, one line; with
    `set_aside` (training) those newer than the one used are moved to DIR/damaged_checkpoints/. Raises
    CheckpointError when every checkpoint is damaged; other errors of `load` (ConfigError: an incompatible
    config) pass through."""
    damaged = []
    for step in self.steps():
      try:
        result = load(step)
      except CheckpointError as e:
        print(f"warning: {e}; trying an older checkpoint", file=sys.stderr, flush=True)
        damaged.append(step)
        continue
      if damaged:
        print(f"warning: using step {step}, the newest good checkpoint"
              + (f"; moved the damaged ones to {self._set_aside(damaged)}" if set_aside else ""),
              file=sys.stderr, flush=True)
      return result
    if damaged:
      raise CheckpointError(f"every checkpoint in {self.directory} is damaged (steps {damaged}, see above); "
                            "move the directory away to start afresh")
    return None

  def _set_aside(self, steps: list[int]) -> epath.Path:
    target = self.workdir / "damaged_checkpoints"
    if jax.process_index() == 0:
      target.mkdir(parents=True, exist_ok=True)
      for step in steps:
        (self.directory / str(step)).rename(target / str(step))
    multihost_utils.sync_global_devices("lm2_jax: damaged checkpoints set aside")
    self.manager.reload()
    return target

  def _damaged(self, step: int, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: {why}")

  def _require(self, step: int, item: str) -> None:
    if not (self.directory / str(step) / item).exists():
      raise self._damaged(step, f"item {item!r} is missing")

  def _read_json(self, step: int, item: str):
    self._require(step, item)
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
    except Exception as e:  # Orbax raises JSONDecodeError, KeyError, ValueError, ... for a damaged item
      raise self._damaged(step, f"item {item!r} is not readable JSON ({_first_line(e)})") from e

  def _checksums(self, step: int) -> dict[str, Any]:
    """The checksums item; {} for checkpoints written before there was one (not verified)."""
    if not (self.directory / str(step) / "checksums").exists():
      return {}
    return self._read_json(step, "checksums")

  def _check_hash(self, step: int, item: str, value) -> None:
    expected = self._checksums(step).get(item)
    if expected is not None and expected != _json_hash(value):
      raise self._damaged(step, f"item {item!r} does not match its checksum (bit rot?)")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _as_dict(state) -> dict[str, Any]:
  if isinstance(state, dict):
    return state
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "memory": state.memory}


def _get(config: dict[str, Any], dotted: str):
  for key in dotted.split("."):
    config = config.get(key, {}) if isinstance(config, dict) else None
  return config


def _differences(old: Any, new: Any, path: str):
  if isinstance(old, dict) and isinstance(new, dict):
    for key in sorted(set(old) | set(new)):
      yield from _differences(old.get(key), new.get(key), f"{path}.{key}")
  elif old != new:
    yield path, old, new
