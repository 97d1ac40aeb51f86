r"""Step time against document length: is the cost per token flat from 4K to 64K tokens?

  python -m benchmarks.long_document [--kinds=none,lm2] [--lengths=4096,16384,65536] [--repeats=5]
                                     [--override=remat_policy=full] [--window_tokens=N] ...

One row of one document of each length (batch 1), the issue-15 shape otherwise: width 256, 4 layers, 4 heads,
128-token segments, vocab 1024, float32, 16 memory slots, gradients through the carried memory within windows of
`bptt_segments` (the config default, 4). Per kind and length it times the trainer's train step (forward, backward,
AdamW: `lm2_jax.train.trainer.make_train_step`, what `launch.train` runs; a row longer than `train.window_tokens`,
4096 by default, runs in windows of that many tokens, `trainer.row_windows`) and its eval step (forward and loss:
`make_eval_step`). All lengths of a kind are compiled first; then `--repeats` rounds each time every length once,
one after another, so that the lengths share the machine's state of the moment (on this shared 2-core machine a
4K lm2 step took 1.62-2.10 s in four processes a few minutes apart, which moved a ratio measured length after
length from 13.5x to 20.2x). It prints the median seconds and tokens/s per length and each length's time over
the shortest one's, the median over rounds of that ratio within a round, against the ratio of lengths (16x for
4K -> 64K): a ratio at or below it means the cost per token does not grow with the document. Compilation time is
printed too (the segment scan compiles once, whatever the length). `--override` sets config.model fields
(`field=value`, repeatable).
"""

import statistics

import numpy as np
from absl import flags

from benchmarks import model_overrides, timed_calls
from configs import defaults
from launch import cli
from lm2_jax.train import trainer

_KINDS = flags.DEFINE_list("kinds", ["none", "lm2"], "Memory kinds.")
_LENGTHS = flags.DEFINE_list("lengths", ["4096", "16384", "65536"], "Document lengths in tokens (the first is "
                             "the reference).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Rounds: each times every length once (medians are reported).")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "config.model field=value (a Python literal or a string).")
_WINDOW = flags.DEFINE_integer("window_tokens", None, "train.window_tokens (default: the config's; 0: the whole row "
                               "at once, as before windows).")


def _config(kind: str, length: int):
  config = defaults.get_config()
  config.model.update(dict(vocab_size=1024, d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, d_ff=682,
                           segment_len=128))
  config.model.update(model_overrides(_OVERRIDES.value, "--override"))
  config.model.memory.update(dict(kind=kind, num_slots=16, num_heads=4))
  config.train.update(dict(batch_size=1, seq_len=length, warmup_steps=1))
  if _WINDOW.value is not None:
    config.train.window_tokens = _WINDOW.value
  return config


def _steps(kind: str, length: int) -> dict:
  """The train and eval calls of one length (each call waited for), and the first call's seconds of each."""
  setup = trainer.build(_config(kind, length))
  state = trainer.init_state(setup)
  tokens = np.random.default_rng(0).integers(0, 1024, (1, length), dtype=np.int32)
  batch = trainer.put_batch(setup, {"tokens": tokens})
  train_step, eval_step = trainer.make_train_step(setup), trainer.make_eval_step(setup)
  memory = setup.model.init_memory(1)

  def train():
    nonlocal state
    state, metrics = train_step(state, batch)
    return metrics

  calls = {"train": train, "eval": lambda: eval_step(state.params, batch, memory)}
  first = {name: timed_calls(fn, 0)[0] for name, fn in calls.items()}
  return {"calls": calls, "first": first}


def measure(kind: str, lengths: list[int]) -> dict[int, dict[str, float]]:
  """Per length: first-call and median seconds of the train and eval steps, and the median over rounds of its
  time over the first length's in the same round (`train_ratio`, `eval_ratio`) and that ratio's (min, max)
  over rounds (`train_ratios`, `eval_ratios`)."""
  steps = {n: _steps(kind, n) for n in lengths}
  times = {n: {"train": [], "eval": []} for n in lengths}
  for _ in range(_REPEATS.value):
    for n in lengths:
      for name, fn in steps[n]["calls"].items():
        times[n][name].append(timed_calls(fn, 0)[0])  # one call, waited for
  out = {}
  for n in lengths:
    out[n] = {f"{name}_first_s": steps[n]["first"][name] for name in ("train", "eval")}
    for name in ("train", "eval"):
      out[n][f"{name}_s"] = statistics.median(times[n][name])
      ratios = [t / t0 for t, t0 in zip(times[n][name], times[lengths[0]][name])]
      out[n][f"{name}_ratio"], out[n][f"{name}_ratios"] = statistics.median(ratios), (min(ratios), max(ratios))
  return out


def main(argv):
  del argv
  lengths = [int(n) for n in _LENGTHS.value]
  print(f"batch 1, width 256, 4 layers, 128-token segments, float32, overrides {_OVERRIDES.value or 'none'}, "
        f"window_tokens {_config('none', 4096).train.window_tokens}; {_REPEATS.value} rounds after compilation, "
        "each timing every length once; medians", flush=True)
  print("\n| kind | tokens | train s | train tokens/s | train vs first (rounds' range) | eval s | eval vs first "
        "(range) | length ratio | first train call s |\n|---|---|---|---|---|---|---|---|---|", flush=True)
  for kind in _KINDS.value:
    for n, r in measure(kind, lengths).items():
      span = lambda name: f"{r[name + '_ratio']:.2f}x ({r[name + '_ratios'][0]:.2f}-{r[name + '_ratios'][1]:.2f})"
      print(f"| {kind} | {n:,} | {r['train_s']:.2f} | {n / r['train_s']:,.0f} | {span('train')} | "
            f"{r['eval_s']:.2f} | {span('eval')} | {n / lengths[0]:.0f}x | {r['train_first_s']:.1f} |", flush=True)


if __name__ == "__main__":
  cli.run(main)
