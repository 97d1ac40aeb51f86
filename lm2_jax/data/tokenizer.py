"""SentencePiece tokenizers: train one from text files, load an existing `.model`.

    tok = train_tokenizer(["a.txt", "b.txt"], "out/spm", vocab_size=8000)   # writes out/spm.model, out/spm.vocab
    tok = Tokenizer("out/spm.model")
    ids = tok.encode("Hello.")   # list[int]; tok.decode(ids) == "Hello."

Trained tokenizers reserve the ids 0 pad, 1 unk, 2 bos (document start), 3 eos (document end).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import sentencepiece as spm

from lm2_jax.model.config import ConfigError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
  """A loaded SentencePiece model. `path` is the `.model` file."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise ConfigError(f"config.data.tokenizer={path!r}: no such file; train one with "
                        "`python -m launch.train_tokenizer --input=... --output=...` or point to an existing .model")
    self.path = path
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise ConfigError(f"config.data.tokenizer={path!r}: not a SentencePiece model ({e})") from None

  @property
  def vocab_size(self) -> int:
    return int(self._sp.GetPieceSize())

  @property
  def bos_id(self) -> int:
    return int(self._sp.bos_id())  # -1 when the model has none

  @property
  def eos_id(self) -> int:
    return int(self._sp.eos_id())

  @property
  def pad_id(self) -> int:
    return int(self._sp.pad_id())

  def encode(self, text: str) -> list[int]:
    return list(self._sp.EncodeAsIds(text))

  def count(self, text: str) -> int:
    """How many tokens `text` encodes to (a length measure for BABILong samples)."""
    return len(self._sp.EncodeAsIds(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.DecodeIds([int(i) for i in ids])

  def check_vocab(self, model_vocab_size: int) -> None:
    """Refuses a model whose embedding table cannot hold every id of this tokenizer."""
    if self.vocab_size > model_vocab_size:
      raise ConfigError(f"config.model.vocab_size={model_vocab_size}: the tokenizer {self.path} has "
                        f"{self.vocab_size} pieces; set model.vocab_size to at least {self.vocab_size}")


def train_tokenizer(files: Sequence[str], model_prefix: str, *, vocab_size: int, model_type: str = "unigram",
                    character_coverage: float = 0.9995, max_sentences: int = 1_000_000) -> Tokenizer:
  """Trains a SentencePiece model on text files (one sentence or paragraph a line); writes
  `model_prefix.model` and `.vocab` and returns the loaded tokenizer."""
  if not files:
    raise ConfigError("--input: no text files given; pass a comma-separated list of files or a glob")
  for f in files:
    if not os.path.isfile(f):
      raise ConfigError(f"--input: {f!r} is not a file")
    if os.path.getsize(f) == 0:
      raise ConfigError(f"--input: {f!r} is empty; remove it from the list")
  if model_type not in ("unigram", "bpe", "char", "word"):
    raise ConfigError(f"--model_type={model_type!r}: use unigram, bpe, char or word")
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  try:
    spm.SentencePieceTrainer.train(
        input=",".join(files), model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, input_sentence_size=max_sentences, shuffle_input_sentence=True,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, minloglevel=2)
  except RuntimeError as e:
    raise ConfigError(f"--vocab_size={vocab_size}: SentencePiece could not train on {len(files)} file(s): {e}. "
                      "A vocabulary larger than the text supports is the usual cause: lower --vocab_size or "
                      "add text.") from None
  return Tokenizer(model_prefix + ".model")
