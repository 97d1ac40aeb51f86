"""Recall accuracy of trained parameters on held-out samples of the recall task (overall and by the distance
between a pair and its question), what LM2's write gates do with pairs and filler, and the quickstart report."""

from __future__ import annotations

import json
import os

import jax
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


def pair_distances(tokens_BT, loss_mask_BT, segment_len: int):
  """-> (answer positions [B, Q], distance in segments from the asked pair's segment to the question's [B, Q]).

  The answer v of a question [Q, k, v] sits at a loss-mask position a; its key k at a - 1; the pair [k, v] is the
  context's only occurrence of k (keys are drawn without replacement and filler holds no keys)."""
  B, T = tokens_BT.shape
  answers_BQ = np.stack([np.flatnonzero(m) for m in loss_mask_BT])
  last_segment = (T - 1) // segment_len
  dist_BQ = np.zeros(answers_BQ.shape, np.int64)
  for b in range(B):
    for q, a in enumerate(answers_BQ[b]):
      where = np.flatnonzero(tokens_BT[b, :last_segment * segment_len] == tokens_BT[b, a - 1])
      assert len(where) == 1, (b, a, where)
      dist_BQ[b, q] = last_segment - where[0] // segment_len
  return answers_BQ, dist_BQ


def recall_by_distance(setup: trainer.Setup, params, task: RecallTask, *, num_samples: int,
                       batch_size: int) -> dict[int, list[int]]:
  """{distance: [correct, questions]}: greedy recall of each answer from a fresh memory, binned by `pair_distances`
  (whole rows in one call; for the recall task's lengths, not for documents that need the trainer's windows)."""
  model = setup.model
  predict = jax.jit(lambda params, tokens: model.apply({"params": params}, tokens)[0].argmax(-1))
  bins: dict[int, list[int]] = {}
  it = batches(task, batch_size)
  for _ in range(max(num_samples // batch_size, 1)):
    b = next(it)
    tokens, mask = np.asarray(b["tokens"]), np.asarray(b["loss_mask"])
    pred_BT = np.asarray(predict(params, tokens))
    answers_BQ, dist_BQ = pair_distances(tokens, mask, task.segment_len)
    right_BQ = np.take_along_axis(pred_BT, answers_BQ - 1, 1) == np.take_along_axis(tokens, answers_BQ, 1)
    for d, r in zip(dist_BQ.ravel(), right_BQ.ravel()):
      bins.setdefault(int(d), [0, 0])
      bins[int(d)][0] += int(r)
      bins[int(d)][1] += 1
  return dict(sorted(bins.items()))


def write_gates_by_token(setup: trainer.Setup, params, task: RecallTask, *, num_samples: int,
                         batch_size: int) -> dict[str, float] | None:
  """How an `lm2` model's write (a `hierarchical` one's general level) treats pairs and filler (None for kinds
  without these statistics).

  Runs the context segments (all but the last) segment by segment from a fresh memory and averages, over memory
  layers and samples, the statistics of each segment's write (`aux["memory_stats"]`): the write strength of the
  tokens that are pair keys, pair values and filler (the strength at token l scales x_l = h_l + h_{l-1}, so a
  value's carries its key), and the mean input and forget gate of segments that hold a pair and of segments of
  filler only."""
  model, L = setup.model, task.segment_len
  run = jax.jit(lambda params, tokens, memory: model.apply({"params": params}, tokens, memory)[1:])
  sums: dict[str, list[float]] = {}

  def add(name, values):
    acc = sums.setdefault(name, [0.0, 0])
    acc[0] += float(np.sum(values))
    acc[1] += int(np.size(values))

  it = batches(task, batch_size)
  for _ in range(max(num_samples // batch_size, 1)):
    tokens = np.asarray(next(it)["tokens"])
    memory = model.init_memory(tokens.shape[0])
    for s in range(task.num_segments - 1):
      seg = tokens[:, s * L:(s + 1) * L]
      memory, aux = run(params, seg, memory)
      stats = aux["memory_stats"]
      stats = stats.get("general", stats)  # hierarchical: its general level, an LM2 memory
      if "write_strength" not in stats:
        return None
      strength = np.asarray(stats["write_strength"]).mean(0)  # [B, L], mean over memory layers
      key = (seg >= task.key_offset) & (seg < task.value_offset)
      value = (seg >= task.value_offset) & (seg < task.filler_offset)
      for name, where in (("key", key), ("value", value), ("filler", seg >= task.filler_offset)):
        add(f"write_strength/{name}", strength[where])
      pair = key.any(axis=1)
      for gate in ("in_gate", "forget_gate"):
        g = np.asarray(stats[gate]).mean(0)  # [B]
        add(f"{gate}/pair_segment", g[pair])
        add(f"{gate}/filler_segment", g[~pair])
  return {name: total / count for name, (total, count) in sorted(sums.items()) if count}


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
