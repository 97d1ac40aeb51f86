"""Random-access document sources: plain text files, ArrayRecord files of token ids, TFDS datasets.

Each is a sequence (`len`, `[i]`): text sources give a document's text (str), `TokenRecords` its token ids
(int32 array). They go into `grain.MapDataset.source` (lm2_jax.data.pipeline).

ArrayRecord format: one record per document, its token ids as little-endian int32 bytes
(`write_token_records` writes it).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence

import numpy as np

from lm2_jax.model.config import ConfigError

TEXT_SPLITS = ("file", "paragraph", "line")


def expand_paths(pattern: str, field: str = "config.data.paths") -> list[str]:
  """A comma-separated list of files or globs -> sorted, distinct files; an error names what matched nothing."""
  if not pattern:
    raise ConfigError(f"{field}={pattern!r}: give one or more files or globs, comma-separated")
  files = []
  for part in pattern.split(","):
    matched = sorted(p for p in glob.glob(os.path.expanduser(part.strip())) if os.path.isfile(p))
    if not matched:
      raise ConfigError(f"{field}={pattern!r}: {part.strip()!r} matches no file; check the path")
    files += matched
  return sorted(set(files))


class TextFiles:
  """Documents from plain UTF-8 text files: a whole file, each blank-line-separated paragraph, or each line is
  one document (`split`). Empty documents are dropped; an empty file is an error."""

  def __init__(self, pattern: str, split: str = "file"):
    if split not in TEXT_SPLITS:
      raise ConfigError(f"config.data.text_split={split!r}: use one of {TEXT_SPLITS}")
    self.docs: list[str] = []
    for path in expand_paths(pattern):
      text = _read_text(path)
      if not text.strip():
        raise ConfigError(f"config.data.paths: {path} is empty; remove it or fix the glob")
      if split == "file":
        parts = [text]
      elif split == "paragraph":
        parts = [p for p in (" ".join(b.split("\n")) for b in text.split("\n\n"))]
      else:
        parts = text.split("\n")
      self.docs += [p.strip() for p in parts if p.strip()]

  def __len__(self) -> int:
    return len(self.docs)

  def __getitem__(self, index: int) -> str:
    return self.docs[index]


def _read_text(path: str, max_invalid: float = 0.01) -> str:
  """The file's text; ConfigError for a file that is not UTF-8 text (NUL bytes, or more than `max_invalid` of
  its characters undecodable): a binary file trained on as text is noise."""
  with open(path, "rb") as f:
    raw = f.read()
  text = raw.decode("utf-8", errors="replace")
  invalid = text.count("\ufffd") / max(len(text), 1)
  if b"\0" in raw or invalid > max_invalid:
    why = "it holds NUL bytes" if b"\0" in raw else f"{invalid:.0%} of it is not valid UTF-8"
    raise ConfigError(f"config.data.paths: {path} is not UTF-8 text ({why}); give text files, or token ids in "
                      "ArrayRecord files with data.kind='array_record'")
  return text


class TokenRecords:
  """Documents of token ids from ArrayRecord files (one record per document, little-endian int32 bytes)."""

  def __init__(self, pattern: str):
    import grain  # local: keeps this module importable for writing records alone

    self.paths = expand_paths(pattern)
    try:
      self._source = grain.sources.ArrayRecordDataSource(self.paths)
    except Exception as e:  # array_record raises plain RuntimeErrors for files it cannot read
      raise ConfigError(f"config.data.paths={pattern!r}: not readable as ArrayRecord files ({e}); write them "
                        "with lm2_jax.data.sources.write_token_records") from None
    if len(self._source) == 0:
      raise ConfigError(f"config.data.paths={pattern!r}: the ArrayRecord files hold no records")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> np.ndarray:
    return np.frombuffer(self._source[index], dtype="<i4").astype(np.int32)


def write_token_records(path: str, documents: Iterable[Sequence[int]]) -> int:
  """Writes one ArrayRecord file with a record per document (its token ids); returns the number written."""
  from array_record.python.array_record_module import ArrayRecordWriter

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  writer = ArrayRecordWriter(path, "group_size:1")
  n = 0
  try:
    for doc in documents:
      writer.write(np.asarray(doc, dtype="<i4").tobytes())
      n += 1
  finally:
    writer.close()
  return n


class TfdsText:
  """Documents from a prepared TFDS dataset's text feature, read with `tfds.data_source` (no TensorFlow; the
  dataset must have been prepared in ArrayRecord format, e.g. `tfds build NAME --file_format=array_record`)."""

  def __init__(self, name: str, split: str, data_dir: str | None = None, feature: str = "text"):
    import tensorflow_datasets as tfds

    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # DatasetNotFoundError, AssertionError (not prepared), ValueError (split)
      first = str(e).split("\n")[0]
      raise ConfigError(f"config.data.tfds_name={name!r} (split {split!r}, data_dir {data_dir!r}): cannot open "
                        f"it ({type(e).__name__}: {first}). Prepare it offline in ArrayRecord format and point "
                        "data.tfds_data_dir at it.") from None
    if len(self._source) == 0:
      raise ConfigError(f"config.data.tfds_split={split!r}: the split of {name!r} is empty")
    example = self._source[0]
    if feature not in example:
      raise ConfigError(f"config.data.text_feature={feature!r}: {name!r} has features {sorted(example)}")
    self.feature = feature

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    text = self._source[index][self.feature]
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
