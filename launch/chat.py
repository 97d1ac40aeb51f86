r"""Chat with a trained model and its episodic memory (a `Session`).

  python -m launch.chat --workdir=DIR [--step=N] [--max_new_tokens=32 --temperature=0 --top_k=0 --top_p=1 --seed=0]
  python -m launch.chat --export=DIR2       # a directory of launch.export; starts from its session, if it has one

A plain line is a question: it is fed and answered (Session.ask), and the exchange stays in the context. Commands:
  /inject FILE_OR_TEXT   fold a file's text (a path to an existing file) or the text itself into memory, no output
  /save PATH             write the session (memory, pending tokens, history) to a new directory
  /load PATH             continue from a saved session (refused if it was saved under another model)
  /reset                 a fresh memory and an empty history
  /sleep [FIELD=VALUE ...]  the sleep phase: distil the memory into the parameters and free it (Session.sleep);
                         fields of lm2_jax.consolidate.default_config (steps=60 rank=4 ...), and general=FILE: the
                         general text (default: the built-in prose; a file of ids for a model of token ids)
  /stats                 what the memory holds: the history entries and the read statistics per slot
  /quit                  or end of input
On a terminal: a prompt and readline line editing. On a pipe: no prompt, one output line per question (a
newline inside an answer is written as \n), commands silent except /stats; errors go to stderr as one line and
the chat goes on (errors at start-up exit with status 1). A model trained on token ids (data.kind 'recall') reads
and writes whitespace-separated ids. Sampling: temperature 0 is greedy; question i of a session draws with seed
--seed + i, so a restored session answers as the saved one would have.
"""

import os
import sys

import numpy as np
from absl import flags

from launch import cli

from lm2_jax.sessions import Sampling, Session
from lm2_jax.sessions.export import SESSION_DIR, load_checkpoint, load_export
from lm2_jax.sessions.session import read_stats

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with checkpoints/ (or give --export).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_EXPORT = flags.DEFINE_string("export", None, "A directory written by launch.export (instead of --workdir).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens generated per answer at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most probable tokens (0: no limit).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: no cut).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed of the first question.")

COMMANDS = ("/inject", "/save", "/load", "/reset", "/sleep", "/stats", "/quit")


class Chat:
  """Turns input lines into session calls and output text (None: nothing to print)."""

  def __init__(self, session: Session, sampling: dict, interactive: bool):
    self.session, self.sampling, self.interactive = session, sampling, interactive

  def handle(self, line: str) -> str | None:
    if not line.startswith("/"):
      return self.ask(line)
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    with_arg = {"/inject": (self.inject, "a file path or text"), "/save": (self.save, "a new directory"),
                "/load": (self.load, "a directory written by /save")}
    if name in with_arg:
      fn, what = with_arg[name]
      if not arg:
        raise ValueError(f"{name}: give {what} after it")
      return fn(arg)
    if name == "/sleep":
      return self.sleep(arg)
    if name in ("/reset", "/stats") and not arg:
      return self.reset() if name == "/reset" else self.stats()
    raise ValueError(f"{line!r}: not a command; the commands are {' '.join(COMMANDS)} (/reset and /stats take "
                     "nothing; a line without / is a question)")

  def done(self, message: str) -> str | None:
    return message if self.interactive else None

  def ask(self, question: str) -> str:
    s = self.session
    seed = self.sampling["seed"] + sum(h["kind"] == "ask" for h in s.history)
    answer = s.ask(question, **{**self.sampling, "seed": seed})
    return answer if self.interactive else answer.replace("\n", "\\n")

  def inject(self, arg: str) -> str | None:
    text = arg
    if os.path.isfile(arg):
      with open(arg, encoding="utf-8") as f:
        text = f.read()
      if not text.strip():
        raise ValueError(f"/inject: the file {arg!r} is empty; give a file with text, or the text itself")
    start = self.session.position
    self.session.inject(text)
    return self.done(f"injected {self.session.position - start} tokens ({self._where()})")

  def save(self, path: str) -> str | None:
    if os.path.exists(path):
      raise ValueError(f"/save: {path!r} already exists; give a new directory")
    self.session.save(path)
    return self.done(f"saved to {path}")

  def load(self, path: str) -> str | None:
    s = self.session
    self.session = Session.restore(path, s.params, s.config, s.tokenizer)
    return self.done(f"loaded {path} ({self._where()})")

  def reset(self) -> str | None:
    self.session.reset()
    return self.done("fresh memory, empty history")

  def sleep(self, arg: str) -> str | None:
    fields, general = {}, None
    for item in arg.split():
      key, eq, value = item.partition("=")
      if not eq or not value:
        raise ValueError(f"/sleep: {item!r} is not FIELD=VALUE (e.g. steps=60)")
      if key == "general":
        with open(value, encoding="utf-8") as f:
          general = self.session.tokenizer.encode(f.read())
      else:
        fields[key] = _value(value)
    report = self.session.sleep(general=general, **fields)
    return self.done(f"slept: {report['units']['reset']} of {report['units']['read']} read units freed, "
                     f"{report['segments']['replayed']} segments and {report['questions_replayed']} questions "
                     f"replayed; KL {report['kl_before']:.4f} -> {report['kl_after']:.4f}, general-text loss "
                     f"{report['general_loss_before']:.4f} -> {report['general_loss_after']:.4f} "
                     f"({report['seconds']:.1f} s)")

  def stats(self) -> str:
    s = self.session
    lines = [f"history: {len(s.history)} entries; {self._where()}"]
    for i, h in enumerate(s.history, 1):
      answer = f" -> {_short(h['answer'])}" if "answer" in h else ""
      lines.append(f"  {i}. {h['kind']} tokens [{h['start']}, {h['end']}): {_short(h['text'])}{answer}")
    stats = read_stats(s.state.memory)
    lines.append("read statistics per slot (decayed read mass; entropy in nats, top slots as slot:mass):"
                 if stats else "read statistics: none (this memory kind has no slots)")
    for name, rows in stats.items():
      for layer, mass in enumerate(np.atleast_2d(np.asarray(rows, np.float64))):
        if not mass.sum() > 0:
          lines.append(f"  {name}[{layer}]: {len(mass)} slots, not read yet (no segment has been completed)")
          continue
        p = mass / mass.sum()
        entropy = float(-(p * np.log(p + 1e-12)).sum())
        top = " ".join(f"{j}:{mass[j]:.3f}" for j in np.argsort(-mass)[:4])
        lines.append(f"  {name}[{layer}]: {len(mass)} slots, entropy {entropy:.2f} of {np.log(len(mass)):.2f}, "
                     f"top {top}")
    return "\n".join(lines)

  def _where(self) -> str:
    s, n = self.session, self.session.config.segment_len
    return f"{s.position} tokens: {s.position // n} segments in memory, {s.position % n} pending"


def _value(text: str):
  """'60' -> 60, '1e-3' -> 0.001, 'true' -> True, anything else stays text."""
  for parse in (int, float):
    try:
      return parse(text)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(text.lower(), text)


def _short(text: str, n: int = 60) -> str:
  return repr(text if len(text) <= n else text[:n] + "...")


def _load() -> Session:
  if (_WORKDIR.value is None) == (_EXPORT.value is None):
    raise ValueError("give exactly one of --workdir=DIR (a training checkpoint) and --export=DIR (launch.export)")
  if _EXPORT.value is None:
    config, params, tokenizer = load_checkpoint(_WORKDIR.value, _STEP.value)
  else:
    config, params, tokenizer = load_export(_EXPORT.value)
    session = os.path.join(_EXPORT.value, SESSION_DIR)
    if os.path.isdir(session):
      return Session.restore(session, params, config, tokenizer)
  return Session(params, config, tokenizer)


def _lines(interactive: bool):
  if not interactive:
    yield from (line.rstrip("\n") for line in sys.stdin)
    return
  import readline  # pylint: disable=import-outside-toplevel,unused-import  (line editing and history for input)
  print(f"commands: {' '.join(COMMANDS)}; any other line is a question", flush=True)
  while True:
    try:
      yield input("> ")
    except (EOFError, KeyboardInterrupt):
      print()
      return


def main(argv):
  del argv
  interactive = sys.stdin.isatty()
  sampling = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                  top_p=_TOP_P.value, seed=_SEED.value)
  try:
    Sampling(**sampling)  # refuses bad flags before anything is loaded
    chat = Chat(_load(), sampling, interactive)
  except (ValueError, OSError) as e:  # ConfigError is a ValueError
    sys.exit(f"error: {e}")
  for line in _lines(interactive):
    line = line.strip()
    if line == "/quit":
      break
    if not line:
      continue
    try:
      out = chat.handle(line)
    except Exception as e:  # pylint: disable=broad-except  (one line, and the chat goes on)
      print(f"error: {e}", file=sys.stderr, flush=True)
      continue
    if out is not None:
      print(out, flush=True)


if __name__ == "__main__":
  cli.run(main)
