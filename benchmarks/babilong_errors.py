r"""What a BABILong qa1 model gets wrong: each wrong answer classed as an earlier place of the person asked about,
the place of another person in the story, or a word of neither.

  python -m benchmarks.babilong_errors --workdir=DIR [--step=N] [--length=0] [--samples=200]

On the bare stories (length 0) a model that answers "where is X" with the latest place of *someone* has learnt
recency but not to bind the place to X; one that answers an earlier place of X has the binding but not recency.
"""

import collections
import re

from absl import app, flags

from lm2_jax.data.babi import make_samples
from lm2_jax.data.babi.training import encode_prompt
from lm2_jax.data.pipeline import babilong_distractor, babilong_tokenizer
from lm2_jax.evaluate.babilong import _stop_ids, generate_answers
from lm2_jax.train import trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of a qa1 model.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_LENGTH = flags.DEFINE_integer("length", 0, "Sample length in tokens (0: the bare stories).")
_SAMPLES = flags.DEFINE_integer("samples", 200, "Test samples.")


def _place(sentence: str) -> str | None:
  found = re.findall(r"the (\w+)\.$", sentence)
  return found[0] if found else None


def classify(sample: dict, generated: str) -> str:
  """'right', 'earlier place of the person', 'place of another person' or 'other' for one qa1 answer."""
  answer = generated.strip().lower().split(".")[0].strip()
  if answer == sample["answer"]:
    return "right"
  person = sample["question"].split()[-1].rstrip("?")
  story = [sample["sentences"][i] for i in sample["fact_positions"]]
  if answer in {_place(s) for s in story if s.split()[0] == person}:
    return "earlier place of the person"
  if answer in {_place(s) for s in story}:
    return "place of another person"
  return "other"


def main(argv):
  del argv
  config, setup, state = trainer.restore(_WORKDIR.value, None, _STEP.value)
  tok = babilong_tokenizer(config)
  samples = make_samples("qa1", _SAMPLES.value, _LENGTH.value, seed=config.data.seed, split="test",
                         distractor=babilong_distractor(config.data, "test"), count_tokens=tok.count)
  counts = collections.Counter()
  batch = config.eval.batch_size
  for i in range(0, len(samples), batch):
    chunk = samples[i:i + batch]
    outputs = generate_answers(setup.model, state.params, [encode_prompt(tok, s) for s in chunk],
                               max_new_tokens=config.eval.max_new_tokens, stop_ids=_stop_ids(tok))
    counts.update(classify(s, tok.decode(ids)) for s, ids in zip(chunk, outputs))
  print(f"{_WORKDIR.value} step {int(state.step)}, qa1 at {_LENGTH.value} tokens, {len(samples)} test samples:")
  for name in ("right", "earlier place of the person", "place of another person", "other"):
    print(f"  {name:<28} {counts[name]:4d}  {100 * counts[name] / len(samples):5.1f}%")


if __name__ == "__main__":
  app.run(main)
