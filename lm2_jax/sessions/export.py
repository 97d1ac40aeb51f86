"""Inference exports: the parameters (optionally a session's memory), the config and the tokenizer in one directory.

    export("out/", config, params, tokenizer, session="ckpt/session")   # or python -m launch.export
    config, params, tokenizer = load_export("out/")
    s = Session(params, config, tokenizer)   # or Session.restore("out/session", params, config, tokenizer)

An export directory holds
  params/          the parameters: ocp.StandardCheckpointer().restore("out/params") reads them with plain Orbax
  config.json      the experiment config (inference needs config.model)
  tokenizer.model  the SentencePiece model, or tokenizer.json ({"kind": "token_ids", "vocab_size": N}) for a model
                   trained on raw token ids (IdTokenizer)
  session/         optional: a session written by Session.save (memory/ in Orbax, session.json)
It is written beside its final name and renamed into place, so an interrupted export leaves nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lm2_jax.data.id_tokenizer import IdTokenizer
from lm2_jax.data.pipeline import tokenizer_for
from lm2_jax.data.tokenizer import Tokenizer
from lm2_jax.model import LM2Model, init_params
from lm2_jax.model.config import ConfigError
from lm2_jax.sessions.session import check_saved
from lm2_jax.train import trainer
from lm2_jax.train.checkpoint import config_json

SESSION_DIR = "session"


def inference_tokenizer(config) -> Tokenizer:
  """The tokenizer of a checkpoint's config: `config.data.tokenizer` for text sources (babilong's trained on first
  use), else the token ids themselves (IdTokenizer over config.model.vocab_size)."""
  return tokenizer_for(config) or IdTokenizer(config.model.vocab_size)


def load_checkpoint(workdir: str, step: int | None = None):
  """(config, params as host arrays, tokenizer) of a training checkpoint (default: the latest)."""
  config, _, state = trainer.restore(workdir, None, step)
  return config, jax.device_get(state.params), inference_tokenizer(config)


def export(out: str, config, params, tokenizer: Tokenizer, session: str | None = None) -> None:
  """Writes the export directory `out` (which must not exist); `session`: a Session.save directory to include,
  refused before anything is written if it was saved under another model."""
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise ConfigError(f"--out={out!r}: already exists; give a new directory (an export never overwrites)")
  if session is not None:
    check_saved(session, params, config)
  with atomic_directory(out) as tmp:
    write_export(tmp, config, params, tokenizer)
    if session is not None:
      shutil.copytree(session, os.path.join(tmp, SESSION_DIR))


@contextlib.contextmanager
def atomic_directory(out: str):
  """Yields a new directory beside `out` to fill; renamed to `out` when the block ends, removed if it raises (an
  interrupted write leaves nothing at `out`)."""
  out = os.path.abspath(out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".partial-", dir=os.path.dirname(out))
  try:
    yield tmp
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_export(path: str, config, params, tokenizer: Tokenizer) -> None:
  """params/, config.json and the tokenizer of an export, written into the existing directory `path`."""
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(path, "params"), jax.tree.map(np.asarray, params))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_json(config), f, indent=2)
  if isinstance(tokenizer, IdTokenizer):
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
      json.dump({"kind": "token_ids", "vocab_size": tokenizer.vocab_size}, f)
  else:
    shutil.copyfile(tokenizer.path, os.path.join(path, "tokenizer.model"))


def load_export(path: str):
  """(config, params, tokenizer) of an export directory; the tokenizer is checked against the model."""
  path = os.path.abspath(path)
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise ConfigError(f"--export={path!r}: no config.json there; give a directory written by python -m launch.export")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  tokenizer = _read_tokenizer(path)
  tokenizer.check_vocab(config.model.vocab_size)
  shapes = jax.eval_shape(lambda: init_params(LM2Model(config.model), jax.random.key(0)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckpt:
    params = ckpt.restore(os.path.join(path, "params"),
                          jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes))
  return config, params, tokenizer


def _read_tokenizer(path: str) -> Tokenizer:
  ids_file, spm_file = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
  if os.path.isfile(ids_file):
    with open(ids_file) as f:
      return IdTokenizer(json.load(f).get("vocab_size"), ids_file)
  if os.path.isfile(spm_file):
    return Tokenizer(spm_file)
  raise ConfigError(f"--export={path!r}: neither tokenizer.model nor tokenizer.json there; export again with "
                    "python -m launch.export")
