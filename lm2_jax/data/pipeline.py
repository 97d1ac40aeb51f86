"""Grain pipelines: sources -> per-process shard -> (shuffle) -> batches, as checkpointable iterators.

    data = make_batches(config)          # by config.data.kind; next(data) -> {name: np.ndarray [B_local, ...]}
    data.get_state() / data.set_state()  # JSON-able; go into checkpoints

`recall`: the built-in task (lm2_jax.data.recall), one sample per row. `text_files`, `array_record`, `tfds`:
documents tokenised and packed as continuing streams with document ids (lm2_jax.data.packing). `babilong`:
BABILong samples of bAbI tasks in distractor text (lm2_jax.data.babi.training), packed the same way, with loss on
the answers only and a curriculum of lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from lm2_jax.data import recall, sources
from lm2_jax.data.babi.babilong import TextDocuments, TextFolder
from lm2_jax.data.babi.training import BabilongSource, ensure_tokenizer, parse_curriculum
from lm2_jax.data.packing import PackedStreams
from lm2_jax.data.tokenizer import Tokenizer
from lm2_jax.model.config import ConfigError

DATA_KINDS = ("recall", "text_files", "array_record", "tfds", "babilong")


def _stack(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _local_batch_size(global_batch_size: int) -> int:
  if global_batch_size % jax.process_count():
    raise ConfigError(f"config.train.batch_size={global_batch_size}: must be a multiple of the "
                      f"{jax.process_count()} JAX processes")
  return global_batch_size // jax.process_count()


def batches(source: Any, global_batch_size: int, *, shuffle_seed: int | None = None, num_threads: int = 2,
            prefetch: int = 8) -> grain.DatasetIterator:
  """Iterator over {name: [global_batch / process_count, ...]} numpy batches of this process's shard.

  `source` is random access (`__len__`, `__getitem__`) and yields one row per item. The iterator's
  `get_state()` / `set_state()` make it checkpointable: a restored iterator continues with exactly the batch
  that would have come next.
  """
  local = _local_batch_size(global_batch_size)
  ds = grain.MapDataset.source(source)
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=shuffle_seed)
  ds = ds[jax.process_index()::jax.process_count()]
  ds = ds.batch(local, drop_remainder=True, batch_fn=_stack)
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))


def document_source(data_cfg) -> Any:
  """The random-access document source `config.data` names (texts, or token arrays for ArrayRecord)."""
  kind = data_cfg.kind
  if kind == "text_files":
    return sources.TextFiles(data_cfg.paths, data_cfg.text_split)
  if kind == "array_record":
    return sources.TokenRecords(data_cfg.paths)
  if kind == "tfds":
    return sources.TfdsText(data_cfg.tfds_name, data_cfg.tfds_split, data_cfg.tfds_data_dir, data_cfg.text_feature)
  raise ConfigError(f"config.data.kind={kind!r}: not a document source; use one of {DATA_KINDS[1:4]}")


def tokenizer_for(config) -> Tokenizer | None:
  """The tokenizer of a text source, checked against the model's vocabulary (None for token sources)."""
  if config.data.kind in ("recall", "array_record"):
    return None
  if config.data.kind == "babilong":
    return babilong_tokenizer(config)
  if not config.data.tokenizer:
    raise ConfigError(f"config.data.tokenizer={config.data.tokenizer!r}: data.kind={config.data.kind!r} needs a "
                      "SentencePiece .model; train one with `python -m launch.train_tokenizer`")
  tok = Tokenizer(config.data.tokenizer)
  tok.check_vocab(config.model.vocab_size)
  return tok


def babilong_tokenizer(config) -> Tokenizer:
  """The tokenizer at `config.data.tokenizer`, trained there on built-in text if missing, checked against the
  model's vocabulary."""
  tok = ensure_tokenizer(config.data.tokenizer, config.model.vocab_size)
  tok.check_vocab(config.model.vocab_size)
  return tok


def babilong_distractor(data_cfg, split: str = "train"):
  """The distractor text `config.data.distractor` names: '' the built-in prose, 'tfds:NAME' the texts of a
  prepared TFDS dataset (split `tfds_split` for training, `tfds_eval_split` for evaluation; `tfds_data_dir`,
  `text_feature`), otherwise a folder of .txt files."""
  spec = data_cfg.distractor
  if not spec:
    return None
  if spec.startswith("tfds:"):
    name = spec[len("tfds:"):]
    tfds_split = data_cfg.tfds_split if split == "train" else data_cfg.tfds_eval_split
    try:
      texts = sources.TfdsText(name, tfds_split, data_cfg.tfds_data_dir, data_cfg.text_feature)
    except ConfigError as e:
      raise ConfigError(f"config.data.distractor={spec!r}: {e}") from None
    return TextDocuments(texts, f"config.data.distractor={spec!r} (split {tfds_split!r})")
  return TextFolder(spec)


def babilong_tasks(config) -> list[str]:
  """The bAbI tasks `config.data.tasks` names (comma-separated)."""
  return [t.strip() for t in config.data.tasks.split(",") if t.strip()]


def babilong_source(config, split: str = "train") -> BabilongSource:
  d = config.data
  return BabilongSource(babilong_tokenizer(config), tasks=babilong_tasks(config),
                        curriculum=parse_curriculum(d.curriculum), seed=d.seed, split=split,
                        distractor=babilong_distractor(d, split), questions=d.questions)


def packed_batches(source: Any, global_batch_size: int, seq_len: int, *, tokenizer: Tokenizer | None = None,
                   shuffle_seed: int | None = None, num_threads: int = 2,
                   align: int = 0) -> grain.DatasetIterator:
  """Documents of `source` (texts with a tokenizer, or token arrays) -> this process's shard -> shuffled each
  pass when `shuffle_seed` is set -> endless -> packed into continuing streams of `seq_len` tokens."""
  local = _local_batch_size(global_batch_size)
  ds = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
  num_docs = len(ds)
  if num_docs == 0:
    raise ConfigError(f"config.data: the source has {len(source)} documents, fewer than the "
                      f"{jax.process_count()} processes that each read a shard of it")
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=shuffle_seed)
  ds = ds.repeat()
  if tokenizer is not None:
    bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
    ds = ds.map(lambda text: np.asarray(bos + tokenizer.encode(text) + eos, np.int32))
  return iter(PackedStreams(ds, batch_size=local, seq_len=seq_len, num_docs=num_docs, num_threads=num_threads,
                            align=align))


def make_batches(config, *, seed_offset: int = 0) -> grain.DatasetIterator:
  """The training batches `config.data` describes, for `config.train.batch_size` x `config.train.seq_len`."""
  d, t = config.data, config.train
  if d.kind not in DATA_KINDS:
    raise ConfigError(f"config.data.kind={d.kind!r}: use one of {DATA_KINDS}")
  if d.kind == "recall":
    return batches(recall.from_config(config, seed_offset=seed_offset), t.batch_size, shuffle_seed=d.shuffle_seed)
  if d.kind == "babilong":  # every document is its own seeded draw: nothing to shuffle
    return packed_batches(babilong_source(config), t.batch_size, t.seq_len, align=d.align_documents)
  source = document_source(d)
  return packed_batches(source, t.batch_size, t.seq_len, tokenizer=tokenizer_for(config),
                        shuffle_seed=d.shuffle_seed, align=d.align_documents)
