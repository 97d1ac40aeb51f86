"""What keeps a training run's checkpoints good: non-finite steps are caught, and signals stop it at a step
boundary.

- `step_health(loss, grads, params)` (inside the jit step): is the loss finite, and which parameter groups (a
  group: the arrays of one module, e.g. `decoder/layers_0_2/attn/q_proj`) have a non-finite gradient or a
  non-finite value after the update. `NonFiniteCheck` reads it one step late, so the host stays a step ahead of
  the device, and stops the run with a diagnosis (`NonFiniteError`), or reports a skipped step
  (`train.nonfinite='skip'`: the step's update is not applied, `keep_if`).
- `StopSignals`: SIGINT (Ctrl-C) and SIGTERM (what schedulers and preemption send) ask the loop to stop after its
  current step; the trainer then saves a checkpoint and raises `Interrupted`. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lm2_jax.parallel.distributed import allgather_json


class NonFiniteError(RuntimeError):
  """Training stopped at a step with a non-finite loss, gradient or update; the message is the diagnosis."""


class Interrupted(Exception):
  """Training stopped on a signal after saving a checkpoint; `signum` is the signal."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


def _group(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path[:-1]) or "(root)"


def _nonfinite_groups(tree) -> dict[str, jax.Array]:
  """{group: any non-finite element in its arrays}."""
  groups: dict[str, list[jax.Array]] = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    groups.setdefault(_group(path), []).append(~jnp.isfinite(x).all())
  return {name: jnp.any(jnp.stack(flags)) for name, flags in groups.items()}


def step_health(loss, grads, params) -> dict[str, Any]:
  """In the jit step: {'ok': all finite, 'loss': loss not finite, 'grads' / 'params': {group: not finite}}."""
  health = {"loss": ~jnp.isfinite(loss), "grads": _nonfinite_groups(grads), "params": _nonfinite_groups(params)}
  health["ok"] = ~jnp.any(jnp.stack(jax.tree.leaves(health)))
  return health


def keep_if(ok, new, old):
  """`new` where `ok`, else `old` (a skipped step), leaf by leaf."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def diagnosis(step: int, health: dict[str, Any], learning_rate: float) -> str:
  """One line: the step, what went non-finite first (the loss, then the gradients, then the update), which
  parameter groups, and the learning rate."""
  def groups(flags: dict[str, Any]) -> str:
    bad = [name for name, flag in flags.items() if flag]
    more = f" and {len(bad) - 1} more of {len(flags)} groups" if len(bad) > 1 else ""
    return f"{bad[0]}{more}"
  if health["loss"]:
    what = "the loss is not finite" + (f" (non-finite gradients in {groups(health['grads'])})"
                                      if any(health["grads"].values()) else "")
  elif any(health["grads"].values()):
    what = f"the loss is finite but the gradient of {groups(health['grads'])} is not"
  else:
    what = f"the update made the parameters of {groups(health['params'])} non-finite"
  return f"step {step}: {what}; learning rate {learning_rate:.3g}"


class NonFiniteCheck:
  """Checks each step's health one step late (`push`), or now (`flush`, before logging or saving). Policy
  'stop' raises NonFiniteError; 'skip' prints one line per skipped step. `last_good()` names the newest
  checkpoint for the message."""

  def __init__(self, policy: str, last_good: Callable[[], int | None]):
    self.policy, self.last_good = policy, last_good
    self.skipped = 0
    self._pending = None

  def push(self, step: int, health, learning_rate) -> None:
    self.flush()
    self._pending = (step, health, learning_rate)

  def flush(self) -> None:
    if self._pending is None:
      return
    step, health, learning_rate = self._pending
    self._pending = None
    if bool(health["ok"]):
      return
    text = diagnosis(step, jax.device_get(health), float(learning_rate))
    if self.policy == "skip":
      self.skipped += 1
      print(f"warning: {text}; skipped the step (train.nonfinite='skip', {self.skipped} skipped so far)",
            file=sys.stderr, flush=True)
      return
    last = self.last_good()
    kept = f"the last good checkpoint is step {last}" if last else "no checkpoint was written"
    raise NonFiniteError(f"training stopped at {text}; {kept}. Lower config.train.learning_rate (or raise "
                         "train.warmup_steps, lower train.grad_clip_norm), or set train.nonfinite='skip' to skip "
                         "such steps")


class StopSignals:
  """`with StopSignals() as stop:` SIGINT and SIGTERM set `stop.signum` instead of interrupting, for the loop to
  ask `stop.requested()` at step boundaries; a second SIGINT raises KeyboardInterrupt. Installed only in the main thread (signals reach no other); the previous handlers
  come back on exit."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signum: int | None = None
    self.agreed: int | None = None
    self._previous: dict[int, Any] = {}

  def requested(self) -> bool:
    """Whether to stop now: a signal reached any process (then `agreed` is its number). With several processes
    a collective, so that all of them stop, and save, at the same step."""
    received = [self.signum] if jax.process_count() == 1 else allgather_json(self.signum)
    self.agreed = next((s for s in received if s is not None), None)
    return self.agreed is not None

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.signum is None:
      print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
            "(Ctrl-C again to quit without saving)", file=sys.stderr, flush=True)
    self.signum = signum

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
