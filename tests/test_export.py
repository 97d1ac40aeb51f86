"""Exports for inference (plain Orbax), the Hugging Face round trip with memory parameters, and launch.import_hf."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors import safe_open

from helpers import forward, random_tokens
from lm2_jax.interop import hf_llama
from lm2_jax.model import ModelConfig
from lm2_jax.model.config import ConfigError
from lm2_jax.sessions import Session
from lm2_jax.sessions.export import export, load_checkpoint, load_export
from lm2_jax.train import trainer

CONTEXT = " ".join(map(str, range(100, 140)))


def _equal(a, b):
  chex.assert_trees_all_equal(jax.device_get(a), jax.device_get(b))


def _logits(config, params, tokens):
  return np.asarray(forward(ModelConfig.from_config(config))(params, tokens)[0])


@pytest.fixture(scope="module")
def exported(recall_workdir, tmp_path_factory):
  """launch.export of the checkpoint with a session that injected CONTEXT: (export dir, session memory)."""
  tmp = tmp_path_factory.mktemp("export")
  config, params, tokenizer = load_checkpoint(recall_workdir)
  session = Session(params, config, tokenizer)
  session.inject(CONTEXT)
  session.save(str(tmp / "session"))
  out = subprocess.run([sys.executable, "-m", "launch.export", f"--workdir={recall_workdir}", f"--out={tmp / 'out'}",
                        f"--session={tmp / 'session'}"], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return tmp / "out", session.state.memory


def test_export_restores_with_plain_orbax_and_gives_the_same_logits(exported, recall_workdir):
  out, memory = exported
  config, _, state = trainer.restore(recall_workdir)
  with ocp.StandardCheckpointer() as ckpt:
    params = ckpt.restore(out / "params")
    _equal(ckpt.restore(out / "session" / "memory"), memory)
  tokens = random_tokens(0, (2, 48), config.model.vocab_size)
  np.testing.assert_array_equal(_logits(config.model, params, tokens), _logits(config.model, state.params, tokens))
  # The library loader gives the same, with the checkpoint's config and a tokenizer of token ids.
  loaded_config, loaded_params, tokenizer = load_export(str(out))
  assert loaded_config.to_dict() == config.to_dict()
  _equal(loaded_params, params)
  assert tokenizer.encode("1 7 255") == [1, 7, 255] and tokenizer.vocab_size == config.model.vocab_size


def test_export_refuses_an_existing_directory_and_a_foreign_session_writing_nothing(recall_workdir, tmp_path):
  config, params, tokenizer = load_checkpoint(recall_workdir)
  (tmp_path / "taken").mkdir()
  with pytest.raises(ConfigError, match="--out=.*taken'.*already exists; give a new directory"):
    export(str(tmp_path / "taken"), config, params, tokenizer)
  other = config.model.copy_and_resolve_references()
  other.bptt_segments = 1
  Session(params, other, tokenizer).save(str(tmp_path / "other"))
  with pytest.raises(ConfigError, match="saved under another model config.*'bptt_segments': \\(1, 2\\)"):
    export(str(tmp_path / "out"), config, params, tokenizer, session=str(tmp_path / "other"))
  assert sorted(os.listdir(tmp_path)) == ["other", "taken"] and not os.listdir(tmp_path / "taken")


def test_chat_refuses_a_tokenizer_larger_than_the_model(exported, tmp_path):
  out, _ = exported
  shutil.copytree(out, tmp_path / "export")
  (tmp_path / "export" / "tokenizer.json").write_text(json.dumps({"kind": "token_ids", "vocab_size": 1000}))
  run = subprocess.run([sys.executable, "-m", "launch.chat", f"--export={tmp_path / 'export'}"], input="1 2\n",
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 1 and run.stdout == ""
  assert run.stderr.strip() == (f"error: config.model.vocab_size=256: the tokenizer "
                                f"{tmp_path / 'export' / 'tokenizer.json'} has 1000 pieces; set model.vocab_size "
                                "to at least 1000")


def test_hf_round_trip_with_memory_gives_identical_logits(recall_workdir, tmp_path):
  config, _, state = trainer.restore(recall_workdir)
  hf_llama.save(state.params, config.model, str(tmp_path))
  with safe_open(str(tmp_path / "memory.safetensors"), framework="numpy") as f:
    names = set(f.keys())
  assert "decoder.layer_1.memory.q_proj.kernel" in names
  assert all(re.match(r"decoder\.layer_[01]\.memory\.", n) for n in names), names
  loaded_config, loaded = hf_llama.load(str(tmp_path))  # the config comes back from memory.safetensors
  assert ModelConfig.from_config(loaded_config) == ModelConfig.from_config(config.model)
  _equal(loaded, state.params)
  tokens = random_tokens(1, (2, 48), config.model.vocab_size)
  np.testing.assert_array_equal(_logits(loaded_config, loaded, tokens), _logits(config.model, state.params, tokens))
  # Memory parameters of another config are refused, naming the file; a model without memory drops the file.
  other = config.model.copy_and_resolve_references()
  other.memory.layers = "1"
  with pytest.raises(ValueError, match=r"memory.safetensors: its tensors are not those of config.model.memory=.*"
                     r"unknown \['decoder.layer_0.memory"):
    hf_llama.load(str(tmp_path), other)
  llama_config, llama = hf_llama.load(str(pathlib.Path(recall_workdir).parent / "llama"))
  hf_llama.save(llama, llama_config, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_import_hf_writes_a_step_0_checkpoint_that_training_resumes(recall_workdir):
  """The Llama weights of ../llama at step 0 (memory parameters beside them: fresh, as test_hf_llama checks of
  hf_llama.load), and training went on from them."""
  llama_dir = str(pathlib.Path(recall_workdir).parent / "llama")
  config, _, imported = trainer.restore(recall_workdir, step=0)
  assert int(imported.step) == 0
  _, llama = hf_llama.load(llama_dir)
  for name in ("embed", "final_norm", "lm_head"):
    _equal(imported.params[name], llama[name])
  group = imported.params["decoder"]["layers_0_2"]  # tiny.py: both layers carry memory, scanned as one group
  for module in ("attn", "mlp", "attn_norm", "mlp_norm"):
    _equal(group[module], llama["decoder"]["layers_0_2"][module])
  assert np.asarray(group["memory"]["q_proj"]["kernel"]).std() > 0
  # The fixture trained steps 1 and 2 on top of the import: small steps away from it.
  with open(os.path.join(recall_workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]
  trained = trainer.restore(recall_workdir, step=2)[2].params["embed"]["embedding"]
  assert 0 < np.abs(trained - imported.params["embed"]["embedding"]).max() < 0.01


def test_import_hf_refuses_a_config_of_another_shape(recall_workdir):
  config = trainer.restore(recall_workdir, step=0)[0]
  config.model.d_model = 32
  with pytest.raises(ConfigError, match=r"config.model.d_model=32: the checkpoint .*llama has 64 \(config.json\)"):
    hf_llama.check_matches(str(pathlib.Path(recall_workdir).parent / "llama"), config.model)
