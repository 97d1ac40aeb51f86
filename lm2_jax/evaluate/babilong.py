"""BABILong evaluation: greedy answers generated through the segment recurrence, accuracy by task and length,
and the reports (JSON, a markdown table in the layout of LM2's Table 1, a heatmap).

    results = babilong_accuracy(model, params, tok, tasks=("qa1",), lengths=(0, 1024), num_samples=50)
    results["accuracy"]["qa1"]["1024"]   # fraction of samples whose generated answer BABILong counts correct

Generation (`generate_answers`): cached decoding through the segment recurrence (lm2_jax.sessions.decoding), each
prompt from a fresh memory with its segments counted from its first token, as if alone in the batch. With
`full_attention` (memory kind 'none' only) the whole input is one segment: the reference with no window.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from lm2_jax.data.babi.babilong import babilong_correct, make_samples
from lm2_jax.data.babi.training import ANSWER_CUE, encode_prompt
from lm2_jax.data.pipeline import babilong_distractor, babilong_tasks, babilong_tokenizer
from lm2_jax.data.tokenizer import Tokenizer
from lm2_jax.model import LM2Model
from lm2_jax.model.config import ConfigError
from lm2_jax.sessions.decoding import Sampling, generate

_FULL_ATTENTION_ROUND = 256  # full-attention inputs are padded to a multiple of this (fewer compilations)


def generate_answers(model: LM2Model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                     stop_ids: Sequence[int], full_attention: bool = False) -> list[list[int]]:
  """Greedy continuations of `prompts`, each from a fresh memory as if alone (lm2_jax.sessions.decoding): up to
  `max_new_tokens` each, ending after the first of `stop_ids` (included). With `full_attention` (memory kind
  'none' only) the window is one segment as long as the longest prompt and its answer, rounded up."""
  if full_attention:
    if model.config.memory.kind != "none":
      raise ConfigError(f"config.model.memory.kind={model.config.memory.kind!r}: full attention is the reference "
                        "without memory; evaluate it with memory kind 'none'")
    longest = max(len(p) for p in prompts) + max_new_tokens
    window = -(-longest // _FULL_ATTENTION_ROUND) * _FULL_ATTENTION_ROUND
    model = LM2Model(dataclasses.replace(model.config, segment_len=window))
  return generate(model, params, prompts, Sampling(max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids)))


def _stop_ids(tok: Tokenizer) -> list[int]:
  """Generation stops at eos or at a token that ends a sentence (BABILong reads up to the first '.')."""
  return [i for i in range(tok.vocab_size) if i == tok.eos_id or "." in tok.decode([i])]


def babilong_accuracy(model: LM2Model, params, tok: Tokenizer, *, tasks: Sequence[str], lengths: Sequence[int],
                      num_samples: int, seed: int = 0, batch_size: int = 8, max_new_tokens: int = 8,
                      distractor=None, full_attention_max: int | None = None, full_attention: bool = False,
                      log: Callable[[str], None] = print) -> dict:
  """Accuracy of greedy answers on `num_samples` test samples per task and length (lengths in tokens of `tok`).

  With `full_attention`, lengths above `full_attention_max` are not run (reported as None). Returns
  {'accuracy': {task: {str(length): float | None}}, 'examples': {task: {str(length): first answer}},
  'seconds': {str(length): wall time}, 'fact_distance': {task: {str(length): [[tokens, correct], ...]}}}, where
  `tokens` counts the prompt's tokens after the last supporting fact (what the memory must carry it across).
  """
  stop_ids = _stop_ids(tok)
  results = {"accuracy": {t: {} for t in tasks}, "examples": {t: {} for t in tasks}, "seconds": {},
             "fact_distance": {t: {} for t in tasks}}
  for length in lengths:
    t0 = time.perf_counter()
    for task in tasks:
      if full_attention and full_attention_max is not None and length > full_attention_max:
        results["accuracy"][task][str(length)] = None
        continue
      samples = make_samples(task, num_samples, length, seed=seed, split="test", distractor=distractor,
                             count_tokens=tok.count)
      correct = 0
      for i in range(0, num_samples, batch_size):
        chunk = samples[i:i + batch_size]
        prompts = [encode_prompt(tok, s) for s in chunk]
        prompts += [prompts[0]] * (batch_size - len(prompts))  # a fixed batch shape: one compilation per length
        outputs = generate_answers(model, params, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                   full_attention=full_attention)
        for s, ids in zip(chunk, outputs):
          text = tok.decode(ids)
          right = babilong_correct(text, s["answer"], task, s["question"])
          correct += right
          after = " ".join(s["sentences"][max(s["supporting"], default=-1) + 1:] + [s["question"]]) + ANSWER_CUE
          results["fact_distance"][task].setdefault(str(length), []).append([tok.count(after), int(right)])
          results["examples"][task].setdefault(str(length), {"answer": s["answer"], "generated": text})
      results["accuracy"][task][str(length)] = correct / num_samples
    results["seconds"][str(length)] = round(time.perf_counter() - t0, 1)
    row = " ".join(f"{t} {_cell(results['accuracy'][t][str(length)])}" for t in tasks)
    log(f"{_length_name(length):>4}: {row} ({results['seconds'][str(length)]:.0f} s)")
  return results


def babilong_results(config, model: LM2Model, params, lengths: Sequence[int], samples: int,
                     log: Callable[[str], None] = print) -> dict:
  """`babilong_accuracy` of a trained model on the tasks, seed and distractor of `config.data`, under the
  generation settings of `config.eval`."""
  e, d = config.eval, config.data
  return babilong_accuracy(model, params, babilong_tokenizer(config), tasks=babilong_tasks(config), lengths=lengths,
                           num_samples=samples, seed=d.seed, batch_size=e.batch_size,
                           max_new_tokens=e.max_new_tokens, distractor=babilong_distractor(d, "test"),
                           full_attention=e.full_attention, full_attention_max=e.full_attention_max, log=log)


def _length_name(length: int) -> str:
  return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def _cell(value: float | None) -> str:
  return "—" if value is None else f"{100 * value:.1f}"


def _mean(values: Sequence[float | None]) -> float | None:
  return None if any(v is None for v in values) else float(np.mean(values))


def markdown_table(models: dict[str, dict], tasks: Sequence[str], lengths: Sequence[int]) -> str:
  """LM2's Table 1 layout: a row per (length, model), a column per task and their average; accuracy in %."""
  lines = ["| context | model | " + " | ".join(tasks) + " | avg |", "|---|---|" + "---|" * (len(tasks) + 1)]
  for length in lengths:
    for name, result in models.items():
      values = [result["accuracy"][t].get(str(length)) for t in tasks]
      lines.append(f"| {_length_name(length)} | {name} | " + " | ".join(_cell(v) for v in values)
                   + f" | {_cell(_mean(values))} |")
  return "\n".join(lines)


def plot_heatmap(models: dict[str, dict], tasks: Sequence[str], lengths: Sequence[int], path: str) -> None:
  """One heatmap per model (lengths x tasks, accuracy %), side by side, as a PNG; cells not run are grey."""
  import matplotlib
  from matplotlib.figure import Figure  # not pyplot: no global backend switch, no open figures

  n = len(models)
  fig = Figure(figsize=(1.0 + 0.55 * len(tasks) * n + 0.6 * n, 0.45 * len(lengths) + 1.4))
  axes = fig.subplots(1, n, squeeze=False)
  for ax, (name, result) in zip(axes[0], models.items()):
    grid = np.array([[np.nan if result["accuracy"][t].get(str(l)) is None else 100 * result["accuracy"][t][str(l)]
                      for t in tasks] for l in lengths])
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
      ax.text(j, i, "—" if math.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(lengths)), [_length_name(l) for l in lengths])
    ax.set_title(name)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


DISTANCE_BINS = (0, 128, 512, 1024, 2048, 4096, 8192, 16384, 1 << 40)  # tokens between the fact and the answer


def accuracy_by_distance(result: dict, bins: Sequence[int] = DISTANCE_BINS) -> list[tuple]:
  """Retention: (from, to, accuracy or None, samples) per bin of `fact_distance` (tokens after the last
  supporting fact), pooled over the tasks and lengths of one model's result."""
  pairs = np.array([p for per_task in result.get("fact_distance", {}).values() for per_length in per_task.values()
                    for p in per_length], float).reshape(-1, 2)
  rows = []
  for lo, hi in zip(bins[:-1], bins[1:]):
    inside = pairs[(pairs[:, 0] >= lo) & (pairs[:, 0] < hi), 1]
    rows.append((lo, hi, float(inside.mean()) if len(inside) else None, len(inside)))
  return rows


def distance_table(models: dict[str, dict]) -> str:
  """Accuracy (%) by the fact's distance from the answer, a column per model, with each cell's sample count."""
  lines = ["| tokens after the fact | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
  per_model = {name: accuracy_by_distance(r) for name, r in models.items()}
  for i, (lo, hi, *_) in enumerate(next(iter(per_model.values()), [])):
    cells = [f"{_cell(rows[i][2])} ({rows[i][3]})" for rows in per_model.values()]
    if any(rows[i][3] for rows in per_model.values()):
      lines.append(f"| {lo}-{hi if hi < 1 << 40 else ''} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_distance(models: dict[str, dict], path: str) -> None:
  """Accuracy against the fact's distance from the answer (log-spaced bins), one line per model, as a PNG."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6, 3.6))
  ax = fig.subplots()
  for name, result in models.items():
    rows = [(np.sqrt(max(lo, 64) * min(hi, 32768)), 100 * acc) for lo, hi, acc, _ in accuracy_by_distance(result)
            if acc is not None]
    if rows:
      ax.plot(*zip(*rows), marker="o", label=name)
  ax.set_xscale("log")
  ax.set_xlabel("tokens between the supporting fact and the answer")
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 100)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def write_report(models: dict[str, dict], tasks: Sequence[str], lengths: Sequence[int], prefix: str,
                 extra: dict | None = None) -> str:
  """Writes PREFIX.json (every result), PREFIX.md (the table, then accuracy by the fact's distance), PREFIX.png
  (the heatmap) and PREFIX_distance.png; returns the tables."""
  table = markdown_table(models, tasks, lengths) + "\n\n" + distance_table(models)
  with open(prefix + ".json", "w") as f:
    json.dump({"tasks": list(tasks), "lengths": list(lengths), "models": models, **(extra or {})}, f, indent=2)
  with open(prefix + ".md", "w") as f:
    f.write(table + "\n")
  plot_heatmap(models, tasks, lengths, prefix + ".png")
  plot_distance(models, prefix + "_distance.png")
  return table
