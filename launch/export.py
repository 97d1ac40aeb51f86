r"""Exports a training checkpoint for inference: params (optionally a session's memory), config and tokenizer.

  python -m launch.export --workdir=DIR --out=DIR2 [--step=N] [--session=PATH]
  python -m launch.chat --export=DIR2

DIR2 holds params/ (plain Orbax: ocp.StandardCheckpointer().restore("DIR2/params")), config.json, the tokenizer
(tokenizer.model, or tokenizer.json for a model trained on token ids) and, with --session (a directory written
by /save in launch.chat or by Session.save), session/; `lm2_jax.sessions.export.load_export(DIR2)` reads it back.
"""

import sys

from absl import flags

from launch import cli

from lm2_jax.sessions.export import export, load_checkpoint

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with checkpoints/.")
_OUT = flags.DEFINE_string("out", None, "New export directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_SESSION = flags.DEFINE_string("session", None, "Optional session directory (Session.save) to include.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  try:
    config, params, tokenizer = load_checkpoint(_WORKDIR.value, _STEP.value)
    export(_OUT.value, config, params, tokenizer, _SESSION.value)
  except (ValueError, OSError) as e:  # ConfigError is a ValueError
    sys.exit(f"error: {e}")
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
