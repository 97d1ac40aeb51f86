"""launch.chat on a pipe with a checkpoint trained here: inject, ask, save, load, stats, reset, and bad input, against
a decoder that recomputes everything for each token (no cache, no session)."""

import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import forward, recompute_everything
from lm2_jax.data.id_tokenizer import IdTokenizer
from lm2_jax.model import LM2Model
from lm2_jax.sessions import Session
from lm2_jax.train import trainer

NEW = 6
CONTEXT = list(range(100, 154))  # 3 segments of 16 and 6 pending tokens
QUESTION = [1, 7, 9, 11]         # 54 + 4 + 6 new tokens: the last one fills the 4th segment
LENGTH = 64                      # every reference runs on 64 tokens: one compilation


def chat(*flags, stdin=""):
  return subprocess.run([sys.executable, "-m", "launch.chat", *flags], input=stdin, capture_output=True, text=True,
                        timeout=600)


def ids(tokens):
  return " ".join(map(str, tokens))


@pytest.fixture(scope="module")
def trained(recall_workdir):
  """(model, params) of the checkpoint."""
  config, _, state = trainer.restore(recall_workdir)
  return LM2Model(config.model), state.params


@pytest.fixture(scope="module")
def run(recall_workdir, trained, tmp_path_factory):
  """One chat session on a pipe: (stdout lines, stderr lines, tmp dir)."""
  tmp = tmp_path_factory.mktemp("chat")
  (tmp / "empty.txt").write_text("  \n")
  model, params = trained
  other = dataclasses.replace(model.config, bptt_segments=1)  # a session saved under it cannot be loaded
  Session(params, other, IdTokenizer(other.vocab_size)).save(str(tmp / "other"))
  lines = [f"/inject {ids(CONTEXT)}", f"/save {tmp / 's'}", ids(QUESTION), "/stats",
           "/inject", f"/inject {tmp / 'empty.txt'}", "1 999", f"/load {tmp / 'other'}",
           f"/load {tmp / 's'}", ids(QUESTION), "/reset", ids(QUESTION), "/quit", "never read"]
  out = chat(f"--workdir={recall_workdir}", f"--max_new_tokens={NEW}", stdin="\n".join(lines) + "\n")
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.splitlines(), out.stderr.splitlines(), tmp


def test_answers_equal_recomputing_everything_and_survive_save_and_load(run, trained):
  stdout, _, _ = run
  model, params = trained
  with_context = ids(recompute_everything(model, params, CONTEXT + QUESTION, NEW, LENGTH))
  alone = ids(recompute_everything(model, params, QUESTION, NEW, LENGTH))
  answers = [line for line in stdout if re.fullmatch(r"[0-9 ]+", line)]
  # before /save, after /load of what was saved, after /reset (a fresh memory)
  assert answers == [with_context, with_context, alone]
  assert with_context != alone  # the injected context matters


def test_stats_show_the_history_and_the_read_mass_per_slot(run, trained):
  stdout, _, _ = run
  model, params = trained
  answer = [int(i) for i in stdout[0].split()]
  stream = CONTEXT + QUESTION + answer
  assert "history: 2 entries; 64 tokens: 4 segments in memory, 0 pending" in stdout
  assert any(f"1. inject tokens [0, 54): '{ids(CONTEXT)[:60]}..." in line for line in stdout)
  assert any(f"2. ask tokens [54, 64): '{ids(QUESTION)}' -> '{stdout[0]}'" in line for line in stdout)
  # The memory after the 4 complete segments: a plain forward over them.
  _, memory = forward(model.config)(params, np.asarray([stream]))
  read_mass = np.asarray(memory["read_mass"])[:, 0]  # [layers, slots]
  rows = [line for line in stdout if line.startswith("  ['read_mass']")]
  assert len(rows) == model.config.num_layers
  for layer, line in enumerate(rows):
    ref = read_mass[layer]
    p = ref / ref.sum()
    entropy = float(re.search(r"entropy ([0-9.]+)", line).group(1))
    assert abs(entropy - float(-(p * np.log(p)).sum())) < 0.01
    top = [(int(j), float(m)) for j, m in re.findall(r"(\d+):([0-9.]+)", line.split("top")[1])]
    assert len(top) == 4
    for j, m in top:
      assert abs(ref[j] - m) < 1e-3 and m >= np.sort(ref)[-4] - 1e-3


def test_bad_input_gives_one_line_and_the_chat_goes_on(run):
  _, stderr, tmp = run
  assert len(stderr) == 4, stderr
  assert stderr[0] == "error: /inject: give a file path or text after it"
  assert stderr[1].startswith(f"error: /inject: the file '{tmp / 'empty.txt'}' is empty")
  assert stderr[2] == ("error: text: token id 999 is outside the vocabulary [0, 256); type whitespace-separated "
                       "integers from 0 to 255")
  assert stderr[3].startswith(f"error: session '{tmp / 'other'}': saved under another model config")
  assert "'bptt_segments': (1, 2)" in stderr[3] and stderr[3].endswith("restore it with the model it was saved with")


def test_a_missing_checkpoint_exits_with_one_line(tmp_path):
  out = chat(f"--workdir={tmp_path / 'missing'}")
  assert out.returncode == 1
  assert out.stderr.strip() == (f"error: --workdir='{tmp_path / 'missing'}': no checkpoint there; train one with "
                                "launch.train")
  assert not (tmp_path / "missing").exists()
