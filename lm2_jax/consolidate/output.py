"""Writing a consolidated model: an export directory (lm2_jax.sessions.export) with the new parameters, the session
with its freed memory, and `consolidation_report.json`, all renamed into place at once.

    out/params/                      plain Orbax: ocp.StandardCheckpointer().restore("out/params")
    out/config.json, tokenizer       as launch.export writes them (load_export(out) reads the whole)
    out/session/                     the session after the sleep (Session.restore(out/session, params, ...))
    out/consolidation_report.json    lm2_jax.consolidate.distill's report

An interruption at any point leaves `out` absent and the input untouched (nothing is written beside the input).
"""

from __future__ import annotations

import json
import os

from lm2_jax.model.config import ConfigError
from lm2_jax.sessions.export import SESSION_DIR, atomic_directory, write_export

REPORT = "consolidation_report.json"


def write(out: str, config, session, report: dict) -> None:
  """Writes `session` (after its sleep: its params and memory) and `report` to the new directory `out`; `config`:
  the experiment config (with .model) for config.json."""
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise ConfigError(f"--out={out!r}: already exists; give a new directory (a consolidation never overwrites)")
  with atomic_directory(out) as tmp:
    write_export(tmp, config, session.params, session.tokenizer)
    session.save(os.path.join(tmp, SESSION_DIR))
    with open(os.path.join(tmp, REPORT), "w") as f:
      json.dump(report, f, indent=1)
