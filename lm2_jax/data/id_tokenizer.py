"""The "tokenizer" of a model trained on raw token ids (the recall task): text is whitespace-separated ids.

    tok = IdTokenizer(82)
    tok.encode("1 17")   # [1, 17]
    tok.decode([40])     # "40"

Same interface as `Tokenizer` (encode, decode, count, bos_id/eos_id/pad_id, vocab_size, check_vocab), so a
`Session` or `launch.chat` runs such a model unchanged. It has no bos, eos or pad (-1).
"""

from __future__ import annotations

from collections.abc import Sequence

from lm2_jax.data.tokenizer import Tokenizer
from lm2_jax.model.config import ConfigError


class IdTokenizer(Tokenizer):
  """Ids 0 .. vocab_size - 1 written as decimal integers. `path` names where it came from (in messages)."""

  bos_id = eos_id = pad_id = -1

  def __init__(self, vocab_size: int, path: str = "<token ids>"):  # pylint: disable=super-init-not-called
    if not isinstance(vocab_size, int) or vocab_size <= 0:
      raise ConfigError(f"{path}: vocab_size={vocab_size!r}; must be a positive integer")
    self._vocab_size, self.path = vocab_size, path

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  def encode(self, text: str) -> list[int]:
    fix = f"type whitespace-separated integers from 0 to {self.vocab_size - 1}"
    ids = []
    for word in text.split():
      try:
        i = int(word)
      except ValueError:
        raise ConfigError(f"text: {word!r} is not a token id; this model reads token ids, not text: {fix}") from None
      if not 0 <= i < self.vocab_size:
        raise ConfigError(f"text: token id {i} is outside the vocabulary [0, {self.vocab_size}); {fix}")
      ids.append(i)
    return ids

  def count(self, text: str) -> int:
    return len(self.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    return " ".join(str(int(i)) for i in ids)
