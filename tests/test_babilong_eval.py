"""BABILong training documents, greedy generation through the segment recurrence, reports and the launcher."""

import json
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import babilong as family
from helpers import build, tiny_config
from lm2_jax.data.babi import TASK_LABELS, generate, make_sample
from lm2_jax.data.babi.training import (ANSWER_CUE, BabilongSource, encode_prompt, encode_sample, ensure_tokenizer,
                                        parse_curriculum)
from lm2_jax.data.packing import PackedStreams
from lm2_jax.data.pipeline import babilong_distractor
from lm2_jax.evaluate.babilong import distance_table, generate_answers, markdown_table, plot_distance, plot_heatmap
from lm2_jax.model import LM2Model
from lm2_jax.model.config import ConfigError
from lm2_jax.train import trainer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return ensure_tokenizer(str(tmp_path_factory.mktemp("tok") / "spm.model"), 768)


def test_tokenizer_is_built_once_and_reloaded(tok):
  assert tok.vocab_size == 768 and ensure_tokenizer(tok.path, 768).vocab_size == 768
  assert tok.decode(tok.encode("Mary went to the kitchen.")) == "Mary went to the kitchen."


def test_encoded_sample_carries_loss_on_the_answer_only(tok):
  for s in generate("qa2", 5, seed=1, split="test"):
    doc = encode_sample(tok, make_sample(s, 0))
    tokens, mask = doc["tokens"], doc["loss_mask"]
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id and mask[-1]
    assert tok.decode(tokens[mask][:-1]).strip() == s["answer"] + "."
    assert tok.decode(tokens[~mask]).endswith(s["question"] + ANSWER_CUE)
    assert not mask[:int((~mask).sum())].any()  # the prompt comes first, all without loss


def test_source_follows_the_curriculum_and_is_seeded(tok):
  source = BabilongSource(tok, tasks=["qa1", "qa4"], curriculum=parse_curriculum("0:0 4:600"), seed=3)
  for i in range(8):
    doc = source[i]
    prompt = int((~doc["loss_mask"]).sum())
    answer = tok.decode(doc["tokens"][doc["loss_mask"]]).strip().rstrip(".")
    assert answer in TASK_LABELS[["qa1", "qa4"][i % 2]]  # tasks round-robin
    if i < 4:
      assert prompt < 100  # the bare story
    else:
      assert 0.98 * 600 <= prompt - 1 - len(tok.encode(ANSWER_CUE)) <= 1.02 * 600 + 2
    again = BabilongSource(tok, tasks=["qa1", "qa4"], curriculum=parse_curriculum("0:0 4:600"), seed=3)[i]
    np.testing.assert_array_equal(doc["tokens"], again["tokens"])


@pytest.mark.parametrize("text", ["", "5:0", "0:0 0:100", "0:a", "0:-1", "0:0 10:100 5:200", "0-100"])
def test_bad_curriculum_names_the_field(text):
  with pytest.raises(ConfigError, match="config.data.curriculum"):
    parse_curriculum(text)


def test_distractor_spec_errors_name_the_field(tmp_path):
  data = family.get_config("lm2").data
  assert babilong_distractor(data) is None  # the built-in prose
  data.distractor = "tfds:no_such_dataset_here"
  data.tfds_data_dir = str(tmp_path)
  with pytest.raises(ConfigError, match="config.data.distractor='tfds:no_such_dataset_here'"):
    babilong_distractor(data)
  data.distractor = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="missing"):
    babilong_distractor(data)


def test_packed_documents_keep_their_loss_masks():
  rng = np.random.default_rng(0)
  docs = []
  for n in rng.integers(3, 14, size=40):
    docs.append({"tokens": rng.integers(4, 50, n).astype(np.int32), "loss_mask": rng.random(n) < 0.3})
  it = iter(PackedStreams(grain.MapDataset.source(docs), batch_size=1, seq_len=16, num_docs=len(docs)))
  rows = [next(it) for _ in range(10)]
  tokens = np.concatenate([r["tokens"][0] for r in rows])
  mask = np.concatenate([r["loss_mask"][0] for r in rows])
  expected_tokens = np.concatenate([d["tokens"] for d in docs])[:160]
  expected_mask = np.concatenate([d["loss_mask"] & (np.arange(len(d["loss_mask"])) > 0) for d in docs])[:160]
  expected_mask[0] = docs[0]["loss_mask"][0]  # the row's first document: its first token is not masked out
  np.testing.assert_array_equal(tokens, expected_tokens)
  np.testing.assert_array_equal(mask, expected_mask)


def test_answers_stop_after_the_first_stop_id():
  """Generation itself is tested against recomputing everything in test_decoding; here the stop rule."""
  model, params = build(tiny_config("lm2"))  # segments of 8 tokens
  rng = np.random.default_rng(1)
  prompts = [rng.integers(4, 64, n).tolist() for n in (5, 13, 16, 24, 3)]
  got = generate_answers(model, params, prompts, max_new_tokens=6, stop_ids=())
  stop = (got[0][2], got[1][0])
  stopped = generate_answers(model, params, prompts, max_new_tokens=6, stop_ids=stop)
  for out, full in zip(stopped, got):
    cut = [j for j, i in enumerate(full) if i in stop]
    assert out == (full[:cut[0] + 1] if cut else full)


def test_full_attention_equals_one_unpadded_window():
  model, params = build(tiny_config("none"))  # window: 8 tokens
  rng = np.random.default_rng(2)
  prompts = [rng.integers(4, 64, n).tolist() for n in (21, 9, 30)]
  got = generate_answers(model, params, prompts, max_new_tokens=4, stop_ids=(), full_attention=True)
  wide = LM2Model(tiny_config("none", segment_len=64))
  logits_fn = jax.jit(lambda t: wide.apply({"params": params}, t, {})[0])
  for prompt, out in zip(prompts, got):
    seq = np.zeros((1, 64), np.int32)  # the prompt alone from position 0; causal, so what follows is unread
    seq[0, :len(prompt)] = prompt
    for t in range(4):
      seq[0, len(prompt) + t] = int(jnp.argmax(logits_fn(seq)[0, len(prompt) + t - 1]))
    assert out == seq[0, len(prompt):len(prompt) + 4].tolist()
  with pytest.raises(ConfigError, match="memory.kind"):
    generate_answers(*build(tiny_config("lm2")), prompts, max_new_tokens=1, stop_ids=(), full_attention=True)


def test_table_layout_and_heatmap(tmp_path):
  models = {"lm2": {"accuracy": {"qa1": {"0": 1.0, "1024": 0.5}, "qa2": {"0": 0.25, "1024": 0.0}}},
            "full": {"accuracy": {"qa1": {"0": 0.75, "1024": None}, "qa2": {"0": 0.5, "1024": None}}}}
  table = markdown_table(models, ["qa1", "qa2"], [0, 1024]).splitlines()
  assert table[0] == "| context | model | qa1 | qa2 | avg |"
  assert table[2:] == ["| 0K | lm2 | 100.0 | 25.0 | 62.5 |", "| 0K | full | 75.0 | 50.0 | 62.5 |",
                       "| 1K | lm2 | 50.0 | 0.0 | 25.0 |", "| 1K | full | — | — | — |"]
  plot_heatmap(models, ["qa1", "qa2"], [0, 1024], str(tmp_path / "h.png"))
  assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_accuracy_by_distance_pools_tasks_and_lengths_per_bin(tmp_path):
  models = {"lm2": {"accuracy": {}, "fact_distance": {"qa1": {"0": [[10, 1], [100, 0]], "1024": [[600, 1], [900, 1]]},
                                                      "qa2": {"1024": [[700, 0], [20000, 1]]}}},
            "none": {"accuracy": {}, "fact_distance": {"qa1": {"0": [[50, 1]], "1024": [[1000, 0]]}}}}
  assert distance_table(models).splitlines() == [
      "| tokens after the fact | lm2 | none |", "|---|---|---|",
      "| 0-128 | 50.0 (2) | 100.0 (1) |", "| 512-1024 | 66.7 (3) | 0.0 (1) |", "| 16384- | 100.0 (1) | — (0) |"]
  plot_distance(models, str(tmp_path / "d.png"))
  assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_family_has_equal_parameter_counts():
  counts = {kind: family.count_parameters(family.get_config(kind).model) for kind in family.KINDS}
  m = family.get_config("lm2").model
  d_ff_step = 3 * m.d_model * 8 * m.num_layers  # SwiGLU gate, up and down weights for 8 more d_ff units per layer
  for kind, count in counts.items():  # the closest a d_ff in steps of 8 can come to lm2's count
    assert abs(count - counts["lm2"]) <= d_ff_step / 2, (kind, counts)
  assert family.get_config("full").eval.full_attention and family.get_config("full").model.memory.kind == "none"


def test_train_then_evaluate_a_babilong_checkpoint(tmp_path, tok):
  config = family.get_config("lm2")
  config.data.tokenizer = tok.path
  config.data.tasks = "qa1,qa4"
  config.data.curriculum = "0:0 20:0,256"
  config.model.update(dict(d_model=32, num_layers=2, d_ff=64, segment_len=64))
  config.train.update(dict(steps=2, warmup_steps=0, batch_size=8, seq_len=128, log_every=1))
  config.checkpoint.every = 2
  trainer.train(config, str(tmp_path))
  out = subprocess.run([sys.executable, "-m", "launch.evaluate", f"--workdir={tmp_path}",
                        "--babilong_lengths=0,256", "--eval_samples=3"], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((tmp_path / "eval_2.json").read_text())["babilong"]
  assert set(results["accuracy"]) == {"qa1", "qa4"}
  assert all(set(acc) == {"0", "256"} and all(a in (0, 1 / 3, 2 / 3, 1) for a in acc.values())
             for acc in results["accuracy"].values())
  assert "| 256 | lm2 |" in out.stdout
  assert (tmp_path / "babilong_2.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "babilong_2.md").exists()
  # The prompt the evaluation feeds is the prefix of the training document before its answer.
  sample = make_sample(generate("qa1", 1, seed=0, split="test")[0], 0)
  doc = encode_sample(tok, sample)
  assert encode_prompt(tok, sample) == doc["tokens"][~doc["loss_mask"]].tolist()


def test_accuracy_records_each_answer_with_its_distance_from_the_fact(tok):
  """babilong_accuracy: one [tokens after the supporting fact, correct] per sample, agreeing with the accuracy;
  the distance checked against the prompt's own token ids (the tokens after the fact's last piece)."""
  from lm2_jax.data.babi import make_samples
  from lm2_jax.evaluate.babilong import babilong_accuracy
  model, params = build(tiny_config("lm2", vocab_size=768))
  got = babilong_accuracy(model, params, tok, tasks=["qa1"], lengths=[0, 256], num_samples=3, batch_size=2,
                          max_new_tokens=2, log=lambda _: None)
  for length in (0, 256):
    records = got["fact_distance"]["qa1"][str(length)]
    assert len(records) == 3 and np.mean([c for _, c in records]) == got["accuracy"]["qa1"][str(length)]
    for sample, (distance, _) in zip(make_samples("qa1", 3, length, split="test", count_tokens=tok.count), records):
      prompt = encode_prompt(tok, sample)
      fact = sample["sentences"][sample["supporting"][-1]]
      upto = sample["context"][:sample["context"].rindex(fact) + len(fact)]
      assert abs(distance - (len(prompt) - 1 - len(tok.encode(upto)))) <= 2
  assert max(d for d, _ in got["fact_distance"]["qa1"]["256"]) > max(d for d, _ in got["fact_distance"]["qa1"]["0"])


def test_qa1_error_classes():
  from benchmarks.babilong_errors import classify
  sample = {"answer": "garden", "question": "Where is Mary?", "fact_positions": [0, 2, 3],
            "sentences": ["Mary went to the kitchen.", "The sky was grey.", "John moved to the office.",
                          "Mary journeyed to the garden."]}
  assert [classify(sample, g) for g in (" garden.", " kitchen.", " office.", " hallway.", " sky.")] == [
      "right", "earlier place of the person", "place of another person", "other", "other"]


def test_further_qa1_questions_ask_about_the_same_story_in_the_same_split(tok):
  from lm2_jax.data.babi.tasks import split_of
  from lm2_jax.data.babi.training import qa1_answers
  for s in generate("qa1", 50, seed=3, split="train"):  # the text rule agrees with the generator's world
    assert qa1_answers(s["story"])[s["question"].split()[-1][:-1]] == s["answer"]
  one = BabilongSource(tok, tasks=("qa1",), curriculum=parse_curriculum("0:0 4:256"), seed=0)
  four = BabilongSource(tok, tasks=("qa1",), curriculum=parse_curriculum("0:0 4:256"), seed=0, questions=4)
  extra = 0
  for i in range(8):
    base, doc = one[i], four[i]
    n = len(base["tokens"]) - 1  # the one-question document, up to its eos, starts the longer one
    np.testing.assert_array_equal(doc["tokens"][:n], base["tokens"][:n])
    np.testing.assert_array_equal(doc["loss_mask"][:n], base["loss_mask"][:n])
    text = tok.decode(doc["tokens"][n:].tolist())
    story = generate("qa1", i + 1, seed=0, split="train")[i]["story"]
    pairs = [p.strip() for p in text.split("Answer:")]
    questions = [q.split(".")[-1].strip() for q in pairs[:-1]]  # the question closing each part
    for q, part in zip(questions, pairs[1:]):
      assert split_of("qa1", story, q) == "train"
      assert part.split(".")[0] == qa1_answers(story)[q.split()[-1][:-1]]
    extra += len(questions)
    answers = tok.decode(doc["tokens"][doc["loss_mask"]].tolist())
    assert answers.count(".") == 1 + len(questions) and doc["tokens"][-1] == tok.eos_id and doc["loss_mask"][-1]
  assert extra > 8  # most stories have more than one other person in the train split
  with pytest.raises(ConfigError, match="data.questions=2: use 1, or more with data.tasks='qa1' only"):
    BabilongSource(tok, tasks=("qa1", "qa2"), curriculum=parse_curriculum("0:0"), questions=2)
