"""Packing documents into [B, T] rows as B continuing streams (a Grain IterDataset with checkpointable state).

Row b of every batch continues stream b: documents are taken in order from a random-access dataset of token
arrays and laid end to end in whichever stream needs one next, so a document longer than T continues in the
same row of the next batch, where a memory carried between batches (`data.continuing_stream`) picks it up.
Nothing is padded or dropped. A document is an int32 token array, or a dict {'tokens', 'loss_mask'} whose mask
says which of its tokens carry loss (e.g. only a question's answer).

With `align` = U > 0 tokens (a divisor of T, e.g. the model's segment length), a document that does not fit in
what is left of the current U-token unit starts at the next unit instead, and one no longer than T that does not
fit in what is left of the row starts the next row; what is skipped is padding (token 0, a document id of its
own, no loss). So a document lies within one unit or starts at a unit's first token, as at evaluation, where each
prompt starts a segment; and a document no longer than T lies whole in one row, so a gradient through the memory
(`model.bptt_segments=0`) reaches from its question back to every fact before it (split across rows, the memory
carried between batches is a constant and no gradient crosses the split). A document longer than T continues in
the next row.

A batch: {'tokens': int32 [B, T], 'segment_ids': int32 [B, T] (document id, the same for all tokens of one
document in one stream, > 0), 'loss_mask': bool [B, T] (False at the first token of a document that follows
another in the row: it is not predicted from another document), 'new_document': bool [B] (the row starts a
document, so a carried memory must be reset)}.

State: the next document index and each stream's (document, offset, documents seen); restoring re-reads the
open documents by index, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import grain
import numpy as np

from lm2_jax.model.config import ConfigError

_MAX_ID = 2**30


class PackedStreams(grain.IterDataset):
  """`docs`: a MapDataset (random access, may be endless) of documents (token arrays or dicts with 'tokens' and
  'loss_mask'); `num_docs`: documents in one pass over it (to detect a source of only empty documents)."""

  def __init__(self, docs: grain.MapDataset, *, batch_size: int, seq_len: int, num_docs: int, num_threads: int = 2,
               prefetch: int = 32, align: int = 0):
    super().__init__(docs)
    if not (isinstance(align, int) and align >= 0 and (align == 0 or seq_len % align == 0)):
      raise ConfigError(f"config.data.align_documents={align!r}: use 0 (documents end to end) or a divisor of "
                        f"train.seq_len={seq_len}, e.g. model.segment_len")
    self.docs, self.batch_size, self.seq_len, self.num_docs = docs, batch_size, seq_len, num_docs
    self.align = align
    self.num_threads, self.prefetch = num_threads, prefetch

  def __iter__(self) -> "PackedStreamsIterator":
    return PackedStreamsIterator(self)


class PackedStreamsIterator(grain.DatasetIterator):

  def __init__(self, ds: PackedStreams):
    super().__init__()
    self._ds = ds
    self._pool = concurrent.futures.ThreadPoolExecutor(max(ds.num_threads, 1))
    self._pending: dict[int, concurrent.futures.Future] = {}
    self.set_state({"next_doc": 0, "streams": [[-1, 0, 0]] * ds.batch_size})

  def _fetch(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Document `index` as (tokens, loss mask or None), reading ahead the next `prefetch` ones in background
    threads."""
    for i in range(index, index + self._ds.prefetch):
      if i not in self._pending:
        self._pending[i] = self._pool.submit(self._ds.docs.__getitem__, i)
    for i in [i for i in self._pending if i < index]:
      del self._pending[i]
    return _document(self._pending.pop(index).result())

  def _next_document(self) -> tuple[int, tuple[np.ndarray, np.ndarray | None]]:
    for _ in range(self._ds.num_docs + 1):
      index = self._next_doc
      self._next_doc += 1
      doc = self._fetch(index)
      if len(doc[0]):
        return index, doc
    raise ConfigError(f"config.data: all {self._ds.num_docs} documents of the source are empty after tokenization")

  def __next__(self) -> dict[str, np.ndarray]:
    B, T = self._ds.batch_size, self._ds.seq_len
    tokens = np.empty((B, T), np.int32)
    ids = np.empty((B, T), np.int32)
    loss_mask = np.ones((B, T), bool)
    new_document = np.zeros(B, bool)
    for b, stream in enumerate(self._streams):
      new_document[b] = stream["doc"] < 0 or stream["offset"] == 0  # offset 0: held back by `align`
      filled = 0
      while filled < T:
        if stream["doc"] < 0:
          stream["doc"], (stream["tokens"], stream["mask"]) = self._next_document()
          stream["offset"], stream["seen"] = 0, stream["seen"] + 1
          pad = self._padding(filled, len(stream["tokens"]))
          if pad:  # the document starts after `pad` tokens of padding, in this row or (offset 0) the next
            tokens[b, filled:filled + pad], loss_mask[b, filled:filled + pad] = 0, False
            ids[b, filled:filled + pad] = stream["seen"] % _MAX_ID + 1
            stream["seen"] += 1
            filled += pad
            if filled == T:
              break
          if filled:  # a document after another in the row: its first token is not predicted across the boundary
            loss_mask[b, filled] = False
        n = min(T - filled, len(stream["tokens"]) - stream["offset"])
        tokens[b, filled:filled + n] = stream["tokens"][stream["offset"]:stream["offset"] + n]
        if stream["mask"] is not None:
          loss_mask[b, filled:filled + n] &= stream["mask"][stream["offset"]:stream["offset"] + n]
        ids[b, filled:filled + n] = stream["seen"] % _MAX_ID + 1
        filled += n
        stream["offset"] += n
        if stream["offset"] == len(stream["tokens"]):
          stream["doc"], stream["tokens"], stream["mask"] = -1, None, None
    return {"tokens": tokens, "segment_ids": ids, "loss_mask": loss_mask, "new_document": new_document}

  def _padding(self, filled: int, length: int) -> int:
    """Tokens of padding before a document of `length` tokens that would start at `filled` (module docstring)."""
    U, T = self._ds.align, self._ds.seq_len
    if not U or not filled:
      return 0
    pad = -filled % U if length > -filled % U else 0  # to the next unit, unless it fits in the rest of this one
    return T - filled if length <= T and length > T - filled - pad else pad  # to the next row

  def get_state(self) -> dict[str, Any]:
    return {"next_doc": self._next_doc,
            "streams": [[s["doc"], s["offset"], s["seen"]] for s in self._streams]}

  def set_state(self, state: dict[str, Any]) -> None:
    if len(state["streams"]) != self._ds.batch_size:
      raise ConfigError(f"config.train.batch_size={self._ds.batch_size}: the saved data state has "
                        f"{len(state['streams'])} streams per process; resume with the batch size it was saved with")
    self._next_doc = int(state["next_doc"])
    self._pending.clear()
    self._streams = []
    for doc, offset, seen in state["streams"]:
      tokens, mask = _document(self._ds.docs[doc]) if doc >= 0 else (None, None)
      self._streams.append({"doc": int(doc), "offset": int(offset), "seen": int(seen), "tokens": tokens,
                            "mask": mask})


def _document(doc) -> tuple[np.ndarray, np.ndarray | None]:
  """(int32 tokens, bool loss mask or None) of a token array or a {'tokens', 'loss_mask'} dict."""
  if isinstance(doc, dict):
    return np.asarray(doc["tokens"], np.int32), np.asarray(doc["loss_mask"], bool)
  return np.asarray(doc, np.int32), None
