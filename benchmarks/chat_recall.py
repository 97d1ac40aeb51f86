r"""Recall through the chat: held-out samples of a recall checkpoint answered by `launch.chat` on a pipe.

  python -m benchmarks.chat_recall --workdir=DIR [--samples=100] [--seed_offset=20000]

For each sample (lm2_jax/data/recall.py, seed config.data.seed + seed_offset: neither the training seed nor
launch.evaluate's +10000) the chat gets `/reset`, `/inject` of the context segments (the key-value pairs among
filler), then the query segment up to and including the first asked key as a question, and answers one token
greedily. Accuracy: the answer is the key's value. For reference, the same queries scored by one plain forward
over each whole sample (teacher-forced argmax, as launch.evaluate scores them), and how often the two agree.
"""

import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags

from lm2_jax.data import recall
from lm2_jax.train import trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a recall run (data.kind 'recall').")
_SAMPLES = flags.DEFINE_integer("samples", 100, "Held-out samples, one query each.")
_SEED_OFFSET = flags.DEFINE_integer("seed_offset", 20_000, "Added to config.data.seed for held-out samples.")
flags.mark_flags_as_required(["workdir"])


def queries(task: recall.RecallTask, n: int):
  """[(context ids, question ids, value, sample tokens, answer position)] for the first query of n samples."""
  context_len = (task.num_segments - 1) * task.segment_len
  out = []
  for i in range(n):
    sample = task[i]
    answer = int(np.flatnonzero(sample["loss_mask"])[0])
    tokens = sample["tokens"].tolist()
    out.append((tokens[:context_len], tokens[context_len:answer], tokens[answer], tokens, answer))
  return out


def main(argv):
  del argv
  config, setup, state = trainer.restore(_WORKDIR.value)
  task = recall.from_config(config, seed_offset=_SEED_OFFSET.value)
  qs = queries(task, _SAMPLES.value)
  ids = lambda xs: " ".join(map(str, xs))
  script = "".join(f"/reset\n/inject {ids(ctx)}\n{ids(question)}\n" for ctx, question, *_ in qs)
  command = [sys.executable, "-m", "launch.chat", f"--workdir={_WORKDIR.value}", "--max_new_tokens=1"]
  start = time.perf_counter()
  run = subprocess.run(command, input=script, capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - start
  if run.returncode != 0 or run.stderr.strip():
    sys.exit(f"launch.chat failed:\n{run.stderr[-3000:]}")
  answers = [int(line) for line in run.stdout.split()]
  assert len(answers) == len(qs), (len(answers), len(qs))
  want = np.array([value for *_, value, _, _ in qs])
  # Reference: one forward over each whole sample, argmax at the position before the answer.
  forward = jax.jit(lambda p, t: setup.model.apply({"params": p}, t)[0])
  logits = forward(state.params, np.stack([tokens for *_, tokens, _ in qs]))
  teacher = np.asarray(logits[np.arange(len(qs)), [a - 1 for *_, a in qs]].argmax(-1))
  print(f"checkpoint {_WORKDIR.value} step {int(state.step)}; {len(qs)} held-out samples (seed "
        f"{config.data.seed + _SEED_OFFSET.value}), the first query of each; chance {task.chance:.4f}")
  print(f"launch.chat accuracy: {np.mean(np.array(answers) == want):.3f} ({seconds:.1f} s for the chat process)")
  print(f"plain forward (teacher-forced) accuracy on the same queries: {np.mean(teacher == want):.3f}")
  print(f"chat answer == forward argmax: {np.mean(np.array(answers) == teacher):.3f}")
  print(f"chat: python {' '.join(command[1:])} < script of {len(qs)} x (/reset, /inject CONTEXT, QUESTION)")


if __name__ == "__main__":
  app.run(main)
