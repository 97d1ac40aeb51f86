"""Data: sentencepiece tokenizers, document sources, and packing documents into continuing streams."""

import json

import numpy as np
import pytest

from configs import defaults
from lm2_jax.data import pipeline, sources
from lm2_jax.data.babi.prose import generate_prose
from lm2_jax.data.packing import PackedStreams
from lm2_jax.data.tokenizer import Tokenizer, train_tokenizer
from lm2_jax.model import ConfigError

import grain


def write_corpus(directory, num_files=3, words=1500):
  """Plain-text files of the built-in prose generator, blank lines between paragraphs."""
  directory.mkdir(parents=True, exist_ok=True)
  paths = []
  for i in range(num_files):
    path = directory / f"doc{i}.txt"
    path.write_text(generate_prose(seed=i, num_words=words))
    paths.append(str(path))
  return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  paths = write_corpus(root / "text")
  tok = train_tokenizer(paths, str(root / "spm"), vocab_size=200)
  return root, paths, tok


def test_tokenizer_trains_loads_and_round_trips(corpus):
  root, _, tok = corpus
  loaded = Tokenizer(str(root / "spm.model"))
  text = "The old captain walked slowly towards the harbour."
  ids = loaded.encode(text)
  assert ids == tok.encode(text) and loaded.decode(ids) == text
  assert loaded.vocab_size == 200 and (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (0, 2, 3)
  assert all(0 <= i < 200 for i in ids)


def test_tokenizer_errors(corpus, tmp_path):
  _, _, tok = corpus
  with pytest.raises(ConfigError, match=r"config.model.vocab_size=100: the tokenizer .* has 200 pieces"):
    tok.check_vocab(100)
  tok.check_vocab(200)
  with pytest.raises(ConfigError, match=r"config.data.tokenizer='/nonexistent.model': no such file"):
    Tokenizer("/nonexistent.model")
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ConfigError, match="is empty"):
    train_tokenizer([str(tmp_path / "empty.txt")], str(tmp_path / "spm"), vocab_size=50)
  (tmp_path / "small.txt").write_text("a few words only\n")
  with pytest.raises(ConfigError, match=r"--vocab_size=5000: .*lower --vocab_size"):
    train_tokenizer([str(tmp_path / "small.txt")], str(tmp_path / "spm"), vocab_size=5000)


def test_text_files_documents_and_errors(tmp_path):
  (tmp_path / "a.txt").write_text("first para\nstill first\n\nsecond para\n")
  (tmp_path / "b.txt").write_text("third\n")
  assert sources.TextFiles(str(tmp_path / "*.txt"), "paragraph").docs == ["first para still first", "second para",
                                                                         "third"]
  assert len(sources.TextFiles(str(tmp_path / "*.txt"), "file")) == 2
  assert sources.TextFiles(str(tmp_path / "a.txt"), "line").docs == ["first para", "still first", "second para"]
  with pytest.raises(ConfigError, match=r"config.data.paths=.*missing/\*.txt' matches no file"):
    sources.TextFiles(str(tmp_path / "missing/*.txt"))
  (tmp_path / "c.txt").write_text("  \n")
  with pytest.raises(ConfigError, match=r"c.txt is empty"):
    sources.TextFiles(str(tmp_path / "*.txt"))
  with pytest.raises(ConfigError, match="text_split='sentence'"):
    sources.TextFiles(str(tmp_path / "a.txt"), "sentence")


def _docs(lengths):
  """Document i holds i * 1000 + 0, 1, 2, ...: any token names its document and its offset."""
  return [np.arange(n, dtype=np.int32) + 1000 * i for i, n in enumerate(lengths)]


def _stream_packer(docs, batch_size, seq_len, align=0):
  ds = grain.MapDataset.source(docs).repeat()
  return iter(PackedStreams(ds, batch_size=batch_size, seq_len=seq_len, num_docs=len(docs), align=align))


def _stream(rows, b):
  """Stream b of the batches `rows`, end to end: (tokens, document ids, loss mask, where the document id
  changes)."""
  tokens, ids, mask = (np.concatenate([r[k][b] for r in rows]) for k in ("tokens", "segment_ids", "loss_mask"))
  return tokens, ids, mask, np.flatnonzero(np.diff(ids, prepend=-1))


def test_packed_streams_lay_documents_end_to_end():
  rng = np.random.default_rng(0)
  docs = _docs(rng.integers(1, 40, 30))
  B, T, steps = 3, 16, 20
  it = _stream_packer(docs, B, T)
  rows = [next(it) for _ in range(steps)]
  taken = []
  for b in range(B):
    tokens, ids, mask, starts = _stream(rows, b)
    pieces = np.split(tokens, starts[1:])
    for k, piece in enumerate(pieces):
      index = piece[0] // 1000
      want = docs[index % len(docs)] if k < len(pieces) - 1 else docs[index % len(docs)][:len(piece)]
      np.testing.assert_array_equal(piece, want)  # whole documents, in order, nothing padded or dropped
      taken.append(index)
    for r, row in enumerate(rows):  # a row starts a document exactly when its first token is a document's first
      assert row["new_document"][b] == (row["tokens"][b, 0] % 1000 == 0)
    # No loss at a document's first token inside a row (it would be predicted from the previous document).
    inside = starts[(starts % T) != 0]
    assert not mask[inside].any() and mask.sum() == len(mask) - len(inside)
  # Every document once per pass over the source, none skipped, and the source repeats when it runs out.
  assert len(taken) > len(docs)
  assert sorted(taken) == sorted(i % len(docs) for i in range(len(taken)))


@pytest.mark.parametrize("unit", [16, 4])
def test_aligned_documents_start_a_unit_and_lie_whole_in_one_row(unit):
  rng = np.random.default_rng(2)
  docs = _docs(rng.integers(1, 40, 30))[1:]  # not document 0, whose first token would look like padding
  B, T, steps = 2, 16, 40
  it = _stream_packer(docs, B, T, align=unit)
  rows = [next(it) for _ in range(steps)]
  taken = []
  for b in range(B):
    tokens, ids, mask, starts = _stream(rows, b)
    ends = np.append(starts[1:], len(ids))
    for start, end in zip(starts, ends):
      piece = tokens[start:end]
      if not piece.any():  # padding: up to a unit's end, without loss
        assert end % unit == 0 and not mask[start:end].any()
        continue
      index = piece[0] // 1000 - 1
      doc = docs[index % len(docs)]
      if end < len(tokens):
        np.testing.assert_array_equal(piece, doc)
        taken.append(index)
      if len(doc) <= T:
        assert start // T == (end - 1) // T, f"document {index} of {len(doc)} tokens split across rows"
      if start // unit != (end - 1) // unit:
        assert start % unit == 0, f"document {index} of {len(doc)} tokens crosses a unit it does not start"
      assert not mask[start] or start % T == 0  # no loss at a first token inside a row
    for row in rows:
      assert row["new_document"][b] == (row["tokens"][b, 0] % 1000 == 0)
  assert sorted(taken) == sorted(i % len(docs) for i in range(len(taken)))  # in order, none skipped


def test_alignment_must_divide_the_row():
  with pytest.raises(ConfigError, match=r"data.align_documents=5: use 0 .* a divisor of train.seq_len=16"):
    _stream_packer(_docs([3]), 1, 16, align=5)


@pytest.mark.parametrize("align", [0, 4])
def test_packed_streams_resume_exactly(align):
  docs = _docs(np.random.default_rng(1).integers(5, 50, 20))
  it = _stream_packer(docs, 2, 16, align)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(4)]
  resumed = _stream_packer(docs, 2, 16, align)
  resumed.set_state(state)
  for a, b in zip(want, [next(resumed) for _ in range(4)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(ConfigError, match="train.batch_size=3"):
    _stream_packer(docs, 3, 16).set_state(state)


def test_all_empty_documents_are_refused():
  with pytest.raises(ConfigError, match="all 3 documents of the source are empty"):
    next(_stream_packer([np.zeros(0, np.int32)] * 3, 2, 8))


def _text_config(**data):
  config = defaults.get_config()
  config.train.batch_size, config.train.seq_len = 4, 32
  config.model.vocab_size = 200
  config.data.update(data)
  return config


def test_text_files_pipeline_tokenises_and_packs(corpus):
  root, paths, tok = corpus
  config = _text_config(kind="text_files", paths=str(root / "text" / "*.txt"), text_split="paragraph",
                        tokenizer=str(root / "spm.model"), shuffle_seed=3)
  batch = next(pipeline.make_batches(config))
  assert batch["tokens"].shape == (4, 32) and batch["tokens"].max() < 200
  assert (batch["tokens"][:, 0] == tok.bos_id).all() and batch["new_document"].all()
  # The first row begins with a whole tokenised paragraph of the corpus.
  paragraphs = sources.TextFiles(str(root / "text" / "*.txt"), "paragraph").docs
  row = batch["tokens"][0]
  assert any(list(row[1:1 + 10]) == tok.encode(p)[:10] for p in paragraphs)
  config.model.vocab_size = 100
  with pytest.raises(ConfigError, match="vocab_size=100"):
    pipeline.make_batches(config)
  config.data.tokenizer = ""
  with pytest.raises(ConfigError, match="config.data.tokenizer=''"):
    pipeline.make_batches(config)


def test_array_record_round_trip(tmp_path):
  docs = _docs([7, 30, 3, 12])
  assert sources.write_token_records(str(tmp_path / "train.array_record"), docs) == 4
  records = sources.TokenRecords(str(tmp_path / "*.array_record"))
  assert len(records) == 4
  for i, d in enumerate(docs):
    np.testing.assert_array_equal(records[i], d)
  config = _text_config(kind="array_record", paths=str(tmp_path / "*.array_record"))
  config.model.vocab_size = 4000
  batch = next(pipeline.make_batches(config))
  np.testing.assert_array_equal(batch["tokens"][0, :7], docs[0])
  (tmp_path / "bad.array_record").write_bytes(b"not an array record")
  with pytest.raises(ConfigError, match="not readable as ArrayRecord"):
    sources.TokenRecords(str(tmp_path / "bad.array_record"))


def test_tfds_source_reads_a_prepared_dataset(corpus, tmp_path):
  import tensorflow_datasets as tfds

  root, _, tok = corpus
  texts = [generate_prose(seed=10 + i, num_words=60) for i in range(6)]

  class TinyProse(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, t in enumerate(texts):
        yield i, {"text": t}

  TinyProse(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  source = sources.TfdsText("tiny_prose", "train", str(tmp_path))
  assert sorted(source[i] for i in range(len(source))) == sorted(texts)
  config = _text_config(kind="tfds", tfds_name="tiny_prose", tfds_data_dir=str(tmp_path),
                        tokenizer=str(root / "spm.model"))
  row = next(pipeline.make_batches(config))["tokens"][0]
  assert any(list(row[1:9]) == tok.encode(t)[:8] for t in texts)
  with pytest.raises(ConfigError, match=r"config.data.text_feature='body': 'tiny_prose' has features \['text'\]"):
    sources.TfdsText("tiny_prose", "train", str(tmp_path), feature="body")
  with pytest.raises(ConfigError, match=r"config.data.tfds_name='tiny_prose' \(split 'test'"):
    sources.TfdsText("tiny_prose", "test", str(tmp_path))
