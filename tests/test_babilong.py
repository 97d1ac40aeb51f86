"""BABILong-style samples: length, fact placement, distractor sources and the answer check."""

import re

import numpy as np
import pytest

from lm2_jax.data.babi import (TASK_ENTITIES, Prose, TextDocuments, TextFolder, babilong_correct, count_words,
                               generate, generate_prose, make_sample, make_samples)
from lm2_jax.data.babi.babilong import split_sentences

ALL_ENTITIES = re.compile(r"\b(?:" + "|".join(sorted({w for ws in TASK_ENTITIES.values() for w in ws})) + r")\b",
                          re.IGNORECASE)


def check_layout(long, babi):
  """Every fact once, in order; the question last; the text is the sentences joined, then the question."""
  sentences, positions = long["sentences"], long["fact_positions"]
  assert [sentences[p] for p in positions] == babi["story"]
  assert positions == sorted(set(positions))
  assert long["text"] == " ".join(sentences) + " " + babi["question"]
  assert long["text"].endswith(babi["question"]) and long["question"] == babi["question"]
  assert long["answer"] == babi["answer"]
  assert long["supporting"] == [positions[i] for i in babi["supporting"]]
  distractors = [s for i, s in enumerate(sentences) if i not in set(positions)]
  assert not any(ALL_ENTITIES.search(s) for s in distractors)
  return distractors


@pytest.mark.parametrize("target", [1000, 4000, 16000])
@pytest.mark.parametrize("task", ["qa1", "qa3", "qa8"])
def test_lengths_within_two_percent_and_facts_in_order(task, target):
  for i, babi in enumerate(generate(task, 3, seed=4)):
    long = make_sample(babi, target, rng=i)
    assert long["num_tokens"] == count_words(long["text"])
    assert abs(long["num_tokens"] - target) <= 0.02 * target, long["num_tokens"]
    distractors = check_layout(long, babi)
    assert len(distractors) > 10 and max(long["fact_positions"]) > len(babi["story"])  # spread, not all first


def test_other_token_counters():
  """A counter that is not additive over sentences (characters / 4) still lands within 2%."""
  by_chars = lambda text: len(text) // 4
  babi = generate("qa2", 1, seed=0)[0]
  for target in (2000, 8000):
    long = make_sample(babi, target, rng=7, count_tokens=by_chars)
    assert abs(by_chars(long["text"]) - target) <= 0.02 * target
    check_layout(long, babi)


def test_zero_target_is_the_bare_sample():
  babi = generate("qa5", 1, seed=0)[0]
  long = make_sample(babi, 0, rng=0)
  assert long["text"] == " ".join(babi["story"] + [babi["question"]])
  assert long["fact_positions"] == list(range(len(babi["story"])))


def test_target_below_the_facts_is_an_error():
  babi = generate("qa3", 1, seed=0)[0]
  with pytest.raises(ValueError, match="target_tokens=10: the facts and question"):
    make_sample(babi, 10, rng=0)
  with pytest.raises(ValueError, match="target_tokens=-1"):
    make_sample(babi, -1, rng=0)


def test_seeded():
  babi = generate("qa6", 1, seed=0)[0]
  a = make_sample(babi, 2000, rng=3)
  assert a == make_sample(babi, 2000, rng=np.random.default_rng(3))
  assert a["text"] != make_sample(babi, 2000, rng=4)["text"]


def test_make_samples():
  longs = make_samples("qa4", 4, 1000, seed=2, split="test")
  for long, babi in zip(longs, generate("qa4", 4, seed=2, split="test"), strict=True):
    assert abs(long["num_tokens"] - 1000) <= 20
    check_layout(long, babi)
  assert longs == make_samples("qa4", 4, 1000, seed=2, split="test")


def test_prose_is_varied_seeded_and_free_of_babi_words():
  text = generate_prose(0, 20_000)
  assert count_words(text) >= 20_000 and text == generate_prose(0, 20_000) and text != generate_prose(1, 20_000)
  assert not ALL_ENTITIES.search(text)
  assert not re.search(r"\b(?:north|south|east|west)\b", text, re.IGNORECASE)
  sentences = split_sentences(text)
  assert len(set(sentences)) > 0.9 * len(sentences)
  assert all(s[0].isupper() and s[-1] in ".?!" and "{" not in s for s in sentences)
  stream = Prose().stream(5)
  assert [next(stream) for _ in range(50)] == [s for s, _ in zip(Prose().stream(5), range(50))]


def test_text_folder_source(tmp_path):
  (tmp_path / "a.txt").write_text("The ship sailed at dawn. Its crew were\nweary and cold! Nobody sang that day.\n"
                                  "Mary went to the kitchen. The wind rose again.")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.txt").write_text("Rain fell on the roofs of the town. The river rose by evening? "
                                          "Ok. The bells rang twice at noon.")
  allowed = {s for f in ("a.txt", "sub/b.txt") for s in split_sentences((tmp_path / f).read_text())}
  assert "Its crew were weary and cold!" in allowed and "Ok." not in allowed  # fragments < 3 words are left out
  babi = generate("qa1", 1, seed=0)[0]
  for source in (TextFolder(tmp_path), str(tmp_path)):
    long = make_sample(babi, 500, source, rng=1)
    assert abs(long["num_tokens"] - 500) <= 10
    distractors = check_layout(long, babi)
    for d in distractors:  # the files' sentences (the last one may be cut short to hit the length)
      assert d in allowed or any(s.startswith(d[:-1]) for s in allowed), d
    assert "Mary went to the kitchen." not in distractors  # names the task's people and places


def test_text_documents_source():
  texts = ["The ship sailed at dawn. Nobody sang that day. The wind rose again.",
           "Rain fell on the roofs of the town. The bells rang twice at noon."]
  allowed = {s for t in texts for s in split_sentences(t)}
  babi = generate("qa1", 1, seed=0)[0]
  long = make_sample(babi, 300, TextDocuments(texts), rng=2)
  assert abs(long["num_tokens"] - 300) <= 6
  assert all(d in allowed or any(s.startswith(d[:-1]) for s in allowed) for d in check_layout(long, babi))
  with pytest.raises(ValueError, match="hold no documents"):
    TextDocuments([])


def test_text_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    TextFolder(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing"))):
    make_sample(generate("qa1", 1)[0], 100, str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="holds no \\*.txt files"):
    TextFolder(tmp_path)
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "short.txt").write_text("Hi. Ok.")
  with pytest.raises(ValueError, match="hold no sentences"):
    make_sample(generate("qa1", 1)[0], 100, TextFolder(tmp_path), rng=0)
  with pytest.raises(NotADirectoryError, match="is a file"):
    TextFolder(tmp_path / "empty.txt")


@pytest.mark.parametrize("generated, answer, task, correct", [
    ("The apple is in the kitchen.", "kitchen", "qa2", True),
    ("kitchen or garden", "kitchen", "qa1", False),
    ("KITCHEN", "kitchen", "qa1", True),
    ("Kitchen. Though the garden is possible too.", "kitchen", "qa1", True),  # only the first sentence counts
    ("", "kitchen", "qa1", False),
    ("apple, football", "football,apple", "qa8", True),
    ("The football and the apple. Also milk.", "apple,football", "qa8", True),
    ("The apple.", "apple,football", "qa8", False),
    ("apple, football and milk", "apple,football", "qa8", False),
    ("Nothing.", "nothing", "qa8", True),
    ("None", "none", "qa7", True),
    ("two", "three", "qa7", False),
    ("No", "no", "qa6", True),
    ("Not sure", "no", "qa6", False),  # whole words: "not" is not "no"
    ("yes and no", "yes", "qa9", False),
    ("Maybe, it is not certain", "maybe", "qa10", True),
    ("Fred", "Fred", "qa5", True),
])
def test_babilong_correct(generated, answer, task, correct):
  assert babilong_correct(generated, answer, task) is correct


def test_babilong_correct_ignores_labels_the_question_names():
  q3 = "Where was the football before the kitchen?"
  assert babilong_correct("The football was in the office before the kitchen.", "office", "qa3", q3)
  assert not babilong_correct("The football was in the office before the kitchen.", "office", "qa3")
  q5 = "Who gave the apple to Fred?"
  assert babilong_correct("Jeff gave the apple to Fred.", "Jeff", "qa5", q5)
  assert not babilong_correct("Bill gave the apple to Fred.", "Jeff", "qa5", q5)
  assert babilong_correct("the garden", "garden", ["garden", "kitchen"])


def test_babilong_correct_errors():
  with pytest.raises(ValueError, match="answer='kitchen'"):
    babilong_correct("kitchen", "kitchen", "qa5")
  with pytest.raises(ValueError, match="task='qa21'"):
    babilong_correct("kitchen", "kitchen", "qa21")
