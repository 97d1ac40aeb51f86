"""Recall accuracy of trained parameters on held-out samples of the recall task, and the quickstart report."""

from __future__ import annotations

import json
import os

import numpy as np

from lm2_jax.data.pipeline import batches
from lm2_jax.data.recall import RecallTask
from lm2_jax.train import trainer


def recall_accuracy(setup: trainer.Setup, params, task: RecallTask, *, num_samples: int, batch_size: int) -> float:
  """Fraction of answer tokens predicted exactly (greedy), over `num_samples` samples from a fresh memory."""
  step = trainer.make_eval_step(setup)
  it = batches(task, batch_size)
  memory = setup.model.init_memory(batch_size)
  accs = [float(step(params, next(it), memory)[0]["accuracy"]) for _ in range(max(num_samples // batch_size, 1))]
  return float(np.mean(accs))  # every sample has the same number of answers, so batch means average exactly


def plot_learning_curves(workdirs: dict[str, str], path: str) -> None:
  """Loss and answer accuracy against step for each run (DIR/metrics.jsonl), side by side, as a PNG."""
  from matplotlib.figure import Figure  # not pyplot: no global backend switch (notebooks keep theirs)

  fig = Figure(figsize=(10, 4))
  ax_loss, ax_acc = fig.subplots(1, 2)
  for name, workdir in workdirs.items():
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    steps = [r["step"] for r in rows]
    ax_loss.plot(steps, [r["loss"] for r in rows], label=name)
    ax_acc.plot(steps, [r["accuracy"] for r in rows], label=name)
  ax_loss.set(xlabel="step", ylabel="loss on answers", title="training loss")
  ax_acc.set(xlabel="step", ylabel="answer accuracy (training batch)", title="recall accuracy", ylim=(0, 1))
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
