r"""The sleep phase from the command line: consolidate a saved session's episodic memory into the parameters.

  python -m launch.consolidate --export=DIR --out=DIR2                     # DIR/session: launch.export --session
  python -m launch.consolidate --workdir=DIR [--step=N] --session=PATH --out=DIR2
      [--general=FILE] [--consolidate.steps=60 --consolidate.rank=4 --consolidate.layers=1 ...]

The model comes from a training checkpoint (--workdir) or an export (--export); the session from --session (a
directory written by Session.save or /save in launch.chat), by default the export's session/. DIR2 is an export
directory (launch.chat --export=DIR2 continues the session with the new parameters and its freed memory) with
consolidation_report.json (what was consolidated, KL and general-text loss before/after, steps, seconds). It is
written beside its final name and renamed into place: an interruption leaves no DIR2 and the input untouched.
--general: the general text whose loss is kept (a text file; for a model trained on token ids, whitespace-separated
ids); default: the built-in prose. --consolidate.*: the fields of lm2_jax.consolidate.default_config().
A session whose memory holds nothing (no segment completed) is reported and nothing is written.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from launch import cli

from lm2_jax.consolidate import NothingToConsolidate, default_config
from lm2_jax.consolidate.output import REPORT, write
from lm2_jax.sessions import Session
from lm2_jax.sessions.export import SESSION_DIR, load_checkpoint, load_export

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with checkpoints/ (or give --export).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_EXPORT = flags.DEFINE_string("export", None, "A directory written by launch.export (instead of --workdir).")
_SESSION = flags.DEFINE_string("session", None, "A saved session (default with --export: its session/).")
_OUT = flags.DEFINE_string("out", None, "New output directory.")
_GENERAL = flags.DEFINE_string("general", None, "General-text file (default: the built-in prose).")
_CONFIG = config_flags.DEFINE_config_dict("consolidate", default_config(), "Consolidation fields.")
flags.mark_flags_as_required(["out"])


def _general(tokenizer):
  if _GENERAL.value is None:
    return None
  with open(_GENERAL.value, encoding="utf-8") as f:
    return tokenizer.encode(f.read())


def main(argv):
  del argv
  try:
    if (_WORKDIR.value is None) == (_EXPORT.value is None):
      raise ValueError("give exactly one of --workdir=DIR (a training checkpoint) and --export=DIR (launch.export)")
    if _EXPORT.value is not None:
      config, params, tokenizer = load_export(_EXPORT.value)
    else:
      config, params, tokenizer = load_checkpoint(_WORKDIR.value, _STEP.value)
    session_path = _SESSION.value or (os.path.join(_EXPORT.value, SESSION_DIR) if _EXPORT.value else None)
    if session_path is None or not os.path.isdir(session_path):
      raise ValueError(f"--session={session_path!r}: no saved session there; give a directory written by "
                       "Session.save (/save in launch.chat)")
    if os.path.exists(_OUT.value):
      raise ValueError(f"--out={_OUT.value!r}: already exists; give a new directory")
    session = Session.restore(session_path, params, config, tokenizer)
    try:
      report = session.sleep(general=_general(tokenizer), **_CONFIG.value.to_dict())
    except NothingToConsolidate as e:
      print(f"nothing to consolidate: {e}; wrote nothing")
      return
    write(_OUT.value, config, session, report)
  except (ValueError, OSError) as e:  # ConfigError is a ValueError
    sys.exit(f"error: {e}")
  print(f"consolidated {report['units']['reset']} of {report['units']['read']} read units from "
        f"{report['segments']['replayed']} segments and {report['questions_replayed']} questions in "
        f"{report['steps']} steps ({report['seconds']:.1f} s): KL on the replay set {report['kl_before']:.4f} -> "
        f"{report['kl_after']:.4f}, general-text loss {report['general_loss_before']:.4f} -> "
        f"{report['general_loss_after']:.4f}; wrote {_OUT.value} ({REPORT})")


if __name__ == "__main__":
  cli.run(main)
