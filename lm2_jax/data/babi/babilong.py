"""BABILong-style samples: the facts of a bAbI sample hidden in long distractor text, and BABILong's answer check.

BABILong (Kuratov et al., 2024) turns a bAbI sample into a long-context one: its facts go, in their order, at
random sentence boundaries of unrelated book text until the text is as long as asked; the question comes last.
A model must find the few facts among thousands of sentences and reason over them.

  make_sample(sample, target_tokens, distractor, rng, count_tokens)   one long sample
  make_samples(task, num_samples, target_tokens, seed, split, ...)   many, each seeded by its index
  babilong_correct(generated, answer, task, question)                 the check of a model's output

Distractor sources are objects with `stream(rng) -> Iterator[str]` (an endless iterator of sentences): the
built-in `prose.Prose()`, `TextFolder(path)` over a folder of the user's text files (e.g. PG19 books), or
`TextDocuments(texts)` over any random-access collection of texts (e.g. a prepared TFDS dataset).
Lengths are in the tokens of `count_tokens` (default: whitespace-separated words, so this module needs no
tokenizer); pass a tokenizer's counting function to build lengths in its tokens.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from lm2_jax.data.babi.prose import Prose
from lm2_jax.data.babi.tasks import SPLITS, TASK_ENTITIES, TASK_LABELS, check_task, generate

TOLERANCE = 0.02
_MAX_FILTERED_IN_A_ROW = 10_000


def count_words(text: str) -> int:
  """The default token count: whitespace-separated words."""
  return len(text.split())


class Distractor(Protocol):
  """A source of distractor text."""

  def stream(self, rng: np.random.Generator) -> Iterator[str]:
    """An endless iterator of sentences, drawn with `rng`."""


_SENTENCE = re.compile(r"\S.*?[.!?]+[\"'\u201d\u2019)\]]*(?=\s+[\"'\u201c\u2018(\[]?[A-Z0-9]|\s*$)")


def split_sentences(text: str, min_words: int = 3) -> list[str]:
  """The sentences of `text` (ending in . ! or ?, next one starting with a capital or digit), whitespace collapsed;
  fragments shorter than `min_words` words are left out."""
  text = re.sub(r"\s+", " ", text).strip()
  return [s for s in _SENTENCE.findall(text) if len(s.split()) >= min_words]


class TextDocuments:
  """Distractor sentences from a random-access collection of documents (`len()`, `[i] -> str`), e.g. the texts
  of a prepared TFDS dataset such as PG19 (`lm2_jax.data.sources.TfdsText`).

  A stream starts at a random sentence of a random document and reads on in order, document after document,
  wrapping around, as BABILong reads a book. Documents are read when the stream reaches them (the last few are
  kept), so large corpora cost no start-up time.
  """

  def __init__(self, documents, name: str = "the distractor documents", min_words: int = 3):
    if len(documents) == 0:
      raise ValueError(f"{name} hold no documents; pass a non-empty collection of texts")
    self.documents, self.name, self.min_words = documents, name, min_words
    self._cache: dict[int, list[str]] = {}

  def sentences(self, index: int) -> list[str]:
    """The sentences of document `index`."""
    if index not in self._cache:
      if len(self._cache) >= 4:
        self._cache.pop(next(iter(self._cache)))
      self._cache[index] = split_sentences(self.documents[index], self.min_words)
    return self._cache[index]

  def stream(self, rng: np.random.Generator | int) -> Iterator[str]:
    rng = np.random.default_rng(rng)
    n = len(self.documents)
    i = int(rng.random() * n)
    first, empty_in_a_row = True, 0
    while True:
      sentences = self.sentences(i)
      if sentences:
        empty_in_a_row = 0
        yield from sentences[int(rng.random() * len(sentences)) if first else 0:]
      else:
        empty_in_a_row += 1
        if empty_in_a_row >= n:
          raise ValueError(f"{self.name}: its {n} documents hold no sentences of {self.min_words}+ words; add "
                           "text to them")
      first = False
      i = (i + 1) % n


class _FileTexts:
  """The texts of files, read on access."""

  def __init__(self, files: list[Path]):
    self.files = files

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> str:
    return self.files[index].read_text(encoding="utf-8", errors="replace")


class TextFolder(TextDocuments):
  """Distractor sentences from the text files of a folder (searched recursively), e.g. PG19 books: a document
  per file, in sorted order (see `TextDocuments`)."""

  def __init__(self, path: str | os.PathLike, pattern: str = "*.txt", min_words: int = 3):
    self.path = Path(path)
    if not self.path.exists():
      raise FileNotFoundError(f"distractor folder {str(self.path)!r} does not exist; pass the path of a folder "
                              f"of {pattern} files, or use the built-in prose.Prose()")
    if not self.path.is_dir():
      raise NotADirectoryError(f"distractor folder {str(self.path)!r} is a file, not a folder; pass the folder "
                               f"that holds the {pattern} files")
    self.files = sorted(p for p in self.path.rglob(pattern) if p.is_file())
    if not self.files:
      raise ValueError(f"distractor folder {str(self.path)!r} holds no {pattern} files; add text files to it or "
                       f"pass pattern= to match the ones it has")
    super().__init__(_FileTexts(self.files), f"distractor folder {str(self.path)!r} ({pattern} files)", min_words)


def _entity_pattern(task: str | None) -> re.Pattern:
  words = TASK_ENTITIES[task] if task else sorted({w for ws in TASK_ENTITIES.values() for w in ws})
  return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def _distractor_source(distractor: Distractor | str | os.PathLike | None) -> Distractor:
  if distractor is None:
    return Prose()
  if isinstance(distractor, (str, os.PathLike)):
    return TextFolder(distractor)
  if not callable(getattr(distractor, "stream", None)):
    raise ValueError(f"distractor={distractor!r}: pass prose.Prose(), TextFolder(path), a folder path, or an "
                     "object with a stream(rng) method that yields sentences")
  return distractor


def make_sample(sample: dict, target_tokens: int, distractor: Distractor | str | os.PathLike | None = None,
                rng: np.random.Generator | int = 0, count_tokens: Callable[[str], int] = count_words,
                tolerance: float = TOLERANCE) -> dict:
  """The facts of bAbI `sample`, in order, at random sentence boundaries of distractor text; question last.

  The whole text (`text`: the sentences joined by spaces, then the question) holds `target_tokens` tokens of
  `count_tokens`, within `tolerance` (a fraction); `target_tokens=0` gives the facts and question alone.
  Distractor sentences that name one of the task's people, places or objects are skipped.

  Returns a dict with `text`; `context` (the sentences, joined) and `question`; `answer`; `sentences`;
  `fact_positions` (the index in `sentences` of each story sentence); `supporting` (the same for the supporting
  facts); `num_tokens` (`count_tokens(text)`); `task`.
  """
  if not isinstance(target_tokens, int) or isinstance(target_tokens, bool) or target_tokens < 0:
    raise ValueError(f"target_tokens={target_tokens!r}: must be a non-negative integer (0 for no distractor text)")
  if not 0 < tolerance < 0.5:
    raise ValueError(f"tolerance={tolerance!r}: must be a fraction in (0, 0.5), e.g. 0.02")
  for key in ("story", "question", "answer", "supporting"):
    if key not in sample:
      raise ValueError(f"sample has no {key!r}: pass a sample from lm2_jax.data.babi.generate")
  facts, question, task = list(sample["story"]), sample["question"], sample.get("task")
  if task is not None:
    check_task(task)
  rng = np.random.default_rng(rng)
  fractions = np.sort(rng.random(len(facts)))  # where each fact goes, as a fraction of the distractor text

  def assemble(distractors: list[str]) -> tuple[list[str], list[int]]:
    slots = [min(int(u * (len(distractors) + 1)), len(distractors)) for u in fractions]
    sentences, positions, f = [], [], 0
    for d in range(len(distractors) + 1):
      while f < len(facts) and slots[f] == d:
        positions.append(len(sentences))
        sentences.append(facts[f])
        f += 1
      if d < len(distractors):
        sentences.append(distractors[d])
    return sentences, positions

  def tokens(distractors: list[str]) -> int:
    return count_tokens(" ".join(assemble(distractors)[0] + [question]))

  distractors = []
  if target_tokens > 0:
    distractors = _fill(target_tokens, tolerance, tokens, count_tokens,
                        _filtered(_distractor_source(distractor).stream(rng), _entity_pattern(task)),
                        what=f"this {task or 'bAbI'} sample")
  sentences, positions = assemble(distractors)
  context = " ".join(sentences)
  text = f"{context} {question}"
  return {"task": task, "text": text, "context": context, "question": question, "answer": sample["answer"],
          "sentences": sentences, "fact_positions": positions,
          "supporting": [positions[i] for i in sample["supporting"]], "num_tokens": count_tokens(text)}


def _filtered(sentences: Iterator[str], avoid: re.Pattern) -> Iterator[str]:
  """The sentences that do not match `avoid`."""
  skipped = 0
  for s in sentences:
    if avoid.search(s):
      skipped += 1
      if skipped >= _MAX_FILTERED_IN_A_ROW:
        raise ValueError(f"the distractor source gave {skipped} sentences in a row that name the task's people, "
                         "places or objects; use text that does not tell of them")
      continue
    skipped = 0
    yield s


def _fill(target: int, tolerance: float, tokens: Callable[[list[str]], int], count: Callable[[str], int],
          source: Iterator[str], what: str) -> list[str]:
  """Distractor sentences from `source` that bring `tokens(distractors)` within `tolerance` of `target`."""
  low, high = target * (1 - tolerance), target * (1 + tolerance)
  base = tokens([])
  if base > high:
    raise ValueError(f"target_tokens={target}: the facts and question of {what} already take {base} tokens; use "
                     f"target_tokens=0 (no distractor text) or at least {base}")
  if base >= low:
    return []
  pool, sizes = [], [0]  # sizes[k]: the summed token counts of pool[:k], an estimate of what they add

  def draw(n: int) -> None:
    for _ in range(n):
      s = next(source)
      pool.append(s)
      sizes.append(sizes[-1] + count(s))

  while sizes[-1] < target - base:
    draw(64)
  draw(64)  # spare sentences for the final top-up

  def fits(k: int) -> bool:
    while k > len(pool):
      draw(64)
    return tokens(pool[:k]) <= target

  # The most whole sentences that fit: start from the estimate, gallop to a bracket, then bisect on exact counts.
  k = int(np.searchsorted(sizes, target - base, side="right")) - 1
  if fits(k):
    lo, step = k, 1
    while fits(lo + step):
      lo, step = lo + step, step * 2
    hi = lo + step
  else:
    hi, step = k, 1
    while not fits(max(hi - step, 0)):
      hi, step = max(hi - step, 0), step * 2
    lo = max(hi - step, 0)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  chosen = pool[:lo]
  n = tokens(chosen)
  if n >= low:
    return chosen

  # Top up with one shorter sentence from further on, or else with the start of the next sentence.
  gap = target - n
  spare = sorted(range(lo + 1, len(pool)), key=lambda j: -(sizes[j + 1] - sizes[j]))
  for j in [j for j in spare if sizes[j + 1] - sizes[j] <= gap][:8]:
    n = tokens(chosen + [pool[j]])
    if low <= n <= high:
      return chosen + [pool[j]]
  words = pool[lo].rstrip(".!?").split()
  lo_m, hi_m = 0, len(words)
  while hi_m - lo_m > 1:
    mid = (lo_m + hi_m) // 2
    lo_m, hi_m = (mid, hi_m) if tokens(chosen + [" ".join(words[:mid]) + "."]) <= target else (lo_m, mid)
  if lo_m:
    cut = chosen + [" ".join(words[:lo_m]) + "."]
    if low <= tokens(cut) <= high:
      return cut
  raise RuntimeError(f"could not bring {what} within {tolerance:.0%} of target_tokens={target} (reached {n}); "
                     "count_tokens may not grow with the text, or a larger tolerance is needed")


def make_samples(task: str, num_samples: int, target_tokens: int, seed: int = 0, split: str = "test",
                 distractor: Distractor | str | os.PathLike | None = None,
                 count_tokens: Callable[[str], int] = count_words, tolerance: float = TOLERANCE) -> list[dict]:
  """`num_samples` BABILong-style samples of bAbI `task` at `target_tokens` tokens; sample i is seeded by
  (seed, split, i, target_tokens), so every length of a seed holds the same bAbI samples."""
  source = _distractor_source(distractor)
  samples = generate(task, num_samples, seed, split)
  return [make_sample(s, target_tokens, source, np.random.default_rng([seed, SPLITS.index(split), i, target_tokens]),
                      count_tokens, tolerance) for i, s in enumerate(samples)]


def babilong_correct(generated: str, answer: str, task: str | Iterable[str], question: str | None = None) -> bool:
  """BABILong's check of a model's output: lowercased and cut at its first '.', the set of task labels it holds
  must equal the set of the answer's labels (comma-separated for lists, in any order).

  `task` names the label vocabulary (`TASK_LABELS`, e.g. places for qa1) or is the labels themselves. Labels are
  found as whole words ("no" is not found in "not"). With `question`, labels the question itself mentions are
  ignored in the output unless they are part of the answer, so "The football was in the office before the
  kitchen." answers "Where was the football before the kitchen?" with "office".
  """
  if isinstance(task, str):
    check_task(task)
    labels = TASK_LABELS[task]
  else:
    labels = tuple(task)
  labels = {label.lower() for label in labels}
  targets = {a.strip().lower() for a in answer.split(",") if a.strip()}
  unknown = sorted(targets - labels)
  if unknown:
    raise ValueError(f"answer={answer!r}: {unknown} not among the task's labels {sorted(labels)}; pass the task "
                     "the answer belongs to")

  def found(text: str) -> set[str]:
    return {label for label in labels if re.search(rf"\b{re.escape(label)}\b", text)}

  output = generated.lower().split(".")[0]
  ignored = found(question.lower()) - targets if question else set()
  return found(output) - ignored == targets
