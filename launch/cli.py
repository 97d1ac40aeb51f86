"""What the launchers share: `run(main)` in place of `app.run(main)`.

- Configuration, data and checkpoint errors print as one line, `error: <field or file>=<value>: <fix>`, and exit
  with status 1; a training run stopped by SIGINT/SIGTERM (after saving) exits with 128 + the signal's number;
  a second Ctrl-C exits at once, abandoning a save in flight (a resumed run ignores it).
  `--verbose` (or the environment variable LM2_VERBOSE=1) shows the traceback instead.
- Library INFO logs (absl, Orbax, JAX, Grain) are off unless `--verbose` or an explicit `--verbosity`.
- The persistent compilation cache is on (launch/compile_cache.py: `--compile_cache`).
- `checked(config)`: a config file's sections and fields are checked against configs/defaults.py, so a typo in
  the file is refused like a typo in an override.
"""

from __future__ import annotations

import functools
import logging as py_logging
import os
import signal
import sys

from absl import app, flags, logging

from configs import defaults
from launch import compile_cache
from lm2_jax.model.config import ConfigError
from lm2_jax.train.checkpoint import CheckpointError
from lm2_jax.train.config import check_known_fields
from lm2_jax.train.guards import Interrupted, NonFiniteError

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks and library INFO logs (also: LM2_VERBOSE=1).")

# Errors whose message says all a user needs: the field or file, the bad value, the fix.
USER_ERRORS = (ConfigError, CheckpointError, NonFiniteError, OSError)


def verbose() -> bool:
  return _VERBOSE.value or os.environ.get("LM2_VERBOSE", "") not in ("", "0")


def checked(config):
  """`config`, after refusing sections and fields that configs/defaults.py does not define."""
  check_known_fields(config, defaults.get_config())
  return config


def _quiet_logs() -> None:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  for name in ("jax", "orbax", "grain"):
    py_logging.getLogger(name).setLevel(py_logging.WARNING)
  py_logging.getLogger("tensorboardX").setLevel(py_logging.ERROR)  # a NaN loss of a skipped step, each scalar
  py_logging.getLogger("asyncio").setLevel(py_logging.CRITICAL)  # Orbax's unread futures of a damaged file


def _main(main, argv) -> None:
  if not verbose():
    _quiet_logs()
  compile_cache.enable()
  try:
    main(argv)
  except Interrupted as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:  # a second Ctrl-C: leave at once, without waiting for background saves
    if verbose():
      raise
    print("interrupted: quit without saving; a checkpoint being written is ignored on resume", file=sys.stderr,
          flush=True)
    sys.stdout.flush()
    os._exit(128 + signal.SIGINT)
  except USER_ERRORS as e:
    if verbose():
      raise
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(main) -> None:
  app.run(functools.partial(_main, main))
