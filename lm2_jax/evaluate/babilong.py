"""BABILong evaluation: greedy answers generated through the segment recurrence, accuracy by task and length,
and the reports (JSON, a markdown table in the layout of LM2's Table 1, a heatmap).

    results = babilong_accuracy(model, params, tok, tasks=("qa1",), lengths=(0, 1024), num_samples=50)
    results["accuracy"]["qa1"]["1024"]   # fraction of samples whose generated answer BABILong counts correct

Generation: the prompts of a batch are left-padded (a padding document before each prompt, so that every prompt
ends at the same position). Each segment before the one holding the last prompt token runs once, carrying the
memory; then each new token re-runs only the current segment from the memory that entered it, and a full segment
is run once more to carry its memory on. One compiled function runs every segment, whatever the input length. A document that starts inside a segment reads a fresh memory, as in
training on packed rows; a prompt that starts exactly at a segment boundary is given a fresh memory explicitly.
With `full_attention` (memory kind 'none' only) the whole input is one segment: the reference with no window.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.data.babi.babilong import babilong_correct, make_samples
from lm2_jax.data.babi.training import encode_prompt
from lm2_jax.data.pipeline import babilong_distractor, babilong_tasks, babilong_tokenizer
from lm2_jax.data.tokenizer import Tokenizer
from lm2_jax.model import LM2Model
from lm2_jax.model.config import ConfigError

_PAD_DOC, _PROMPT_DOC = 1, 2
_FULL_ATTENTION_ROUND = 256  # full-attention inputs are padded to a multiple of this (fewer compilations)


@functools.lru_cache(maxsize=16)
def _forward(model_config):
  """jit (params, tokens, memory, segment_ids, reset_B) -> (logits, memory after the tokens), one per model
  config (compiled per shape); rows flagged in `reset_B` start from a fresh memory."""
  model = LM2Model(model_config)

  def forward(params, tokens, memory, ids, reset_B):
    return model.apply({"params": params}, tokens, model.reset_memory(memory, reset_B), segment_ids=ids)[:2]

  return jax.jit(forward)


def generate_greedy(model: LM2Model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    stop: Callable[[int], bool], pad_id: int = 0, full_attention: bool = False) -> list[list[int]]:
  """Greedy continuations of `prompts` (a batch of token lists): up to `max_new_tokens` each, ending after the
  first token for which `stop(id)` holds (that token included)."""
  B = len(prompts)
  n_B = np.array([len(p) for p in prompts])
  if B == 0 or n_B.min() == 0:
    raise ValueError("prompts: give at least one prompt, each of at least one token")
  E = int(n_B.max())  # every prompt ends at position E - 1
  if full_attention:
    if model.config.memory.kind != "none":
      raise ConfigError(f"config.model.memory.kind={model.config.memory.kind!r}: full attention is the reference "
                        "without memory; evaluate it with memory kind 'none'")
    L = -(-(E + max_new_tokens) // _FULL_ATTENTION_ROUND) * _FULL_ATTENTION_ROUND
    model = LM2Model(dataclasses.replace(model.config, segment_len=L))
  S = model.config.segment_len
  L = -(-(E + max_new_tokens) // S) * S
  tokens = np.full((B, L), pad_id, np.int32)
  ids = np.full((B, L), _PAD_DOC, np.int32)
  start_B = E - n_B
  for b, p in enumerate(prompts):
    tokens[b, start_B[b]:E] = p
    ids[b, start_B[b]:] = _PROMPT_DOC
  forward = _forward(model.config)

  def run(seg: int, memory):
    """Segment `seg` from the memory that entered it -> (logits [B, S, V], memory after it)."""
    sl = slice(seg * S, (seg + 1) * S)
    return forward(params, tokens[:, sl], memory, ids[:, sl], start_B == seg * S)

  memory = model.init_memory(B)
  for seg in range((E - 1) // S):  # the segments before the one holding the prompt's last token
    _, memory = run(seg, memory)
  seg = (E - 1) // S
  out = [[] for _ in range(B)]
  done = np.zeros(B, bool)
  for t in range(max_new_tokens):
    pos = E - 1 + t
    if pos // S != seg:
      _, memory = run(seg, memory)
      seg += 1
    logits, _ = run(seg, memory)
    next_B = np.asarray(jnp.argmax(logits[:, pos - seg * S], -1))
    tokens[:, pos + 1] = next_B
    for b in np.flatnonzero(~done):
      out[b].append(int(next_B[b]))
      done[b] = stop(int(next_B[b]))
    if done.all():
      break
  return out


def _stopper(tok: Tokenizer) -> Callable[[int], bool]:
  """Generation stops at eos or at a token that ends a sentence (BABILong reads up to the first '.')."""
  return lambda i: i == tok.eos_id or "." in tok.decode([i])


def babilong_accuracy(model: LM2Model, params, tok: Tokenizer, *, tasks: Sequence[str], lengths: Sequence[int],
                      num_samples: int, seed: int = 0, batch_size: int = 8, max_new_tokens: int = 8,
                      distractor=None, full_attention_max: int | None = None, full_attention: bool = False,
                      log: Callable[[str], None] = print) -> dict:
  """Accuracy of greedy answers on `num_samples` test samples per task and length (lengths in tokens of `tok`).

  With `full_attention`, lengths above `full_attention_max` are not run (reported as None). Returns
  {'accuracy': {task: {str(length): float | None}}, 'examples': {task: {str(length): first answer}},
  'seconds': {str(length): wall time}}.
  """
  stop = _stopper(tok)
  results = {"accuracy": {t: {} for t in tasks}, "examples": {t: {} for t in tasks}, "seconds": {}}
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
        outputs = generate_greedy(model, params, prompts, max_new_tokens=max_new_tokens, stop=stop,
                                  pad_id=tok.pad_id, full_attention=full_attention)
        for s, ids in zip(chunk, outputs):
          text = tok.decode(ids)
          correct += babilong_correct(text, s["answer"], task, s["question"])
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
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = len(models)
  fig, axes = plt.subplots(1, n, figsize=(1.0 + 0.55 * len(tasks) * n + 0.6 * n, 0.45 * len(lengths) + 1.4),
                           squeeze=False)
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
  plt.close(fig)


def write_report(models: dict[str, dict], tasks: Sequence[str], lengths: Sequence[int], prefix: str,
                 extra: dict | None = None) -> str:
  """Writes PREFIX.json (every result), PREFIX.md (the table) and PREFIX.png (the heatmap); returns the table."""
  table = markdown_table(models, tasks, lengths)
  with open(prefix + ".json", "w") as f:
    json.dump({"tasks": list(tasks), "lengths": list(lengths), "models": models, **(extra or {})}, f, indent=2)
  with open(prefix + ".md", "w") as f:
    f.write(table + "\n")
  plot_heatmap(models, tasks, lengths, prefix + ".png")
  return table
