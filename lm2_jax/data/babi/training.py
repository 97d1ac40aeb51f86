"""BABILong samples as token documents for training and evaluation, and the tokenizer they use.

A sample is encoded as one document: `[bos] context question " Answer:"` (the prompt) then `" answer." [eos]`
(the target); only the target's tokens carry loss. Evaluation feeds the prompt and generates the target.

    tok = ensure_tokenizer("workdir/babilong/spm.model", vocab_size=768)   # trains it offline if missing
    source = BabilongSource(tok, tasks=("qa1", "qa2"), curriculum=parse_curriculum("0:0 5000:0,512"), seed=0)
    source[i]  # {'tokens': int32 [n], 'loss_mask': bool [n]}: sample i, a pure function of (seed, i)

With `questions` = k > 1 (qa1 only), a training document asks up to k - 1 further questions about the same
story after the first answer, each about another person in it and each a (story, question) pair of the document's
own split: `[bos] context question " Answer:" " answer." question2 " Answer:" " answer2." ... [eos]`, loss on
every answer. The first question and answer are the evaluation's format; the others train the model to bind a
place to the name asked about, which one question per story teaches slowly (benchmarks/babilong_errors.py).

The curriculum lists stages `from_sample:lengths`: sample i draws its target length (tokens of `tok`)
uniformly from the lengths of the last stage that starts at or before i, and its task round-robin from `tasks`.
Lengths are met within 2%, or within 10% for the rare sample whose sentences cannot be fitted closer.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from lm2_jax.data.babi.babilong import make_sample
from lm2_jax.data.babi.prose import generate_prose
from lm2_jax.data.babi.tasks import TASKS, generate, sample, split_of
from lm2_jax.data.tokenizer import Tokenizer, train_tokenizer
from lm2_jax.model.config import ConfigError

ANSWER_CUE = " Answer:"
_UNBOUNDED = 2**62


def prompt_text(long_sample: dict) -> str:
  """What the model reads: the long context, the question and the answer cue."""
  return long_sample["text"] + ANSWER_CUE


def target_text(answer: str) -> str:
  """What the model must write after the prompt; BABILong's check reads it up to the first '.'."""
  return f" {answer}."


def encode_prompt(tok: Tokenizer, long_sample: dict) -> list[int]:
  return [tok.bos_id] + tok.encode(prompt_text(long_sample))


def encode_sample(tok: Tokenizer, long_sample: dict) -> dict[str, np.ndarray]:
  """{'tokens': prompt then target ids, 'loss_mask': True on the target's tokens and eos}."""
  prompt = encode_prompt(tok, long_sample)
  target = tok.encode(target_text(long_sample["answer"])) + [tok.eos_id]
  mask = np.zeros(len(prompt) + len(target), bool)
  mask[len(prompt):] = True
  return {"tokens": np.asarray(prompt + target, np.int32), "loss_mask": mask}


def qa1_answers(story: list[str]) -> dict[str, str]:
  """Where each person of a qa1 story is: the place of their last move (every qa1 sentence is 'Person verb the
  place.')."""
  return {sentence.split()[0]: sentence.rstrip(".").split()[-1] for sentence in story}


def further_questions(babi: dict, count: int, split: str, rng: np.random.Generator) -> list[tuple[str, str]]:
  """Up to `count` (question, answer) pairs about other people of a qa1 sample's story, in random order, each a
  (story, question) pair of `split`, so that no pair of the other split is trained on."""
  asked = babi["question"].split()[-1].rstrip("?")
  out = []
  for person, place in sorted(qa1_answers(babi["story"]).items(), key=lambda _: rng.random()):
    question = f"Where is {person}?"
    if person != asked and len(out) < count and split_of("qa1", babi["story"], question) == split:
      out.append((question, place))
  return out


def parse_curriculum(text: str) -> tuple[tuple[int, tuple[int, ...]], ...]:
  """'0:0 20000:0,512' -> ((0, (0,)), (20000, (0, 512))); stages in increasing order, the first at 0."""
  fix = ("write stages 'from_sample:length,length,...' separated by spaces, the first from sample 0, e.g. "
         "'0:0 20000:0,512,1024'")
  stages = []
  try:
    for part in text.split():
      start, lengths = part.split(":")
      stages.append((int(start), tuple(int(n) for n in lengths.split(","))))
  except ValueError:
    raise ConfigError(f"config.data.curriculum={text!r}: {fix}") from None
  starts = [s for s, _ in stages]
  if not stages or starts[0] != 0 or starts != sorted(set(starts)) or any(n < 0 for _, ls in stages for n in ls):
    raise ConfigError(f"config.data.curriculum={text!r}: {fix}; lengths are non-negative token counts")
  return tuple(stages)


class BabilongSource:
  """Endless random-access BABILong training documents (see the module docstring)."""

  def __init__(self, tok: Tokenizer, *, tasks, curriculum, seed: int = 0, split: str = "train", distractor=None,
               questions: int = 1):
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
      raise ConfigError(f"config.data.tasks={','.join(tasks)!r}: {unknown or 'empty'}; use tasks among "
                        f"{sorted(TASKS)}, comma-separated")
    if not (isinstance(questions, int) and questions >= 1) or (questions > 1 and tasks != ("qa1",)):
      raise ConfigError(f"config.data.questions={questions!r}: use 1, or more with data.tasks='qa1' only "
                        f"(data.tasks={','.join(tasks)!r})")
    self.tok, self.tasks, self.curriculum, self.seed, self.split = tok, tasks, tuple(curriculum), seed, split
    self.distractor, self.questions = distractor, questions

  def __len__(self) -> int:
    return _UNBOUNDED

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    lengths = [ls for start, ls in self.curriculum if start <= index][-1]
    rng = np.random.default_rng([self.seed, index])
    task = self.tasks[index % len(self.tasks)]
    babi = sample(task, self.seed, self.split, index // len(self.tasks))
    target = int(lengths[rng.integers(len(lengths))])
    if target:
      target = max(target, self.tok.count(" ".join(babi["story"] + [babi["question"]])) + 1)
    try:
      long = make_sample(babi, target, self.distractor, rng, self.tok.count)
    except RuntimeError:  # no whole-sentence fill within 2%: for training, 10% is as good
      long = make_sample(babi, target, self.distractor, rng, self.tok.count, tolerance=0.1)
    doc = encode_sample(self.tok, long)
    more = further_questions(babi, self.questions - 1, self.split, rng) if self.questions > 1 else []
    if not more:
      return doc
    tokens, mask = [doc["tokens"][:-1]], [doc["loss_mask"][:-1]]  # all but eos
    for question, answer in more:
      cue, target = self.tok.encode(f" {question}{ANSWER_CUE}"), self.tok.encode(target_text(answer))
      tokens += [cue, target]
      mask += [np.zeros(len(cue), bool), np.ones(len(target), bool)]
    tokens.append([self.tok.eos_id])
    mask.append([True])
    return {"tokens": np.concatenate(tokens).astype(np.int32), "loss_mask": np.concatenate(mask).astype(bool)}


def ensure_tokenizer(path: str, vocab_size: int) -> Tokenizer:
  """The tokenizer at `path`; if there is none, trains one (SentencePiece unigram) on the built-in prose and on
  bAbI stories of every task, offline and seeded, and writes it there."""
  if os.path.exists(path):
    return Tokenizer(path)
  if not path.endswith(".model"):
    raise ConfigError(f"config.data.tokenizer={path!r}: name a .model file (it is trained there if missing)")
  lines = [generate_prose(seed, 400) for seed in range(400)]
  for task in TASKS:
    for s in generate(task, 300, seed=0, split="train"):
      lines.append(" ".join(s["story"]) + f" {s['question']}{ANSWER_CUE}{target_text(s['answer'])}")
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w") as f:
      f.write("\n".join(line.replace("\n", " ") for line in lines))
    prefix = os.path.join(tmp, "spm")
    train_tokenizer([corpus], prefix, vocab_size=vocab_size)
    os.replace(prefix + ".vocab", path[:-len(".model")] + ".vocab")
    os.replace(prefix + ".model", path)  # last: a present .model means a complete tokenizer
  return Tokenizer(path)
