"""Parity with Hugging Face `transformers` Llama: load, run, save, load back."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lm2_jax.interop import hf_llama
from lm2_jax.model import LM2Model, init_params
from lm2_jax.model.config import default_model_config

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            rms_norm_eps=1e-5, max_position_embeddings=64)
CASES = {
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
}


def _hf_model(case):
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**BASE, **CASES[case])).eval()
  with torch.no_grad():  # norms start at 1: perturb them so that a mix-up of norm weights shows
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _our_logits(config, params, tokens):
  logits, _, _ = LM2Model(config).apply({"params": params}, jnp.asarray(tokens))
  return np.asarray(logits)


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_matches_transformers_and_round_trips(case, tmp_path):
  hf = _hf_model(case)
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
  tokens = np.random.default_rng(0).integers(0, BASE["vocab_size"], (2, 48))
  want = _hf_logits(hf, tokens)
  assert np.abs(want).max() > 0.1  # logits are not trivially small

  config, params = hf_llama.load(str(tmp_path / "hf"))
  assert config.memory.kind == "none" and config.segment_len == 64
  np.testing.assert_allclose(_our_logits(config, params, tokens), want, atol=1e-4, rtol=0)

  hf_llama.save(params, config, str(tmp_path / "ours"))
  back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
  assert back.config.num_key_value_heads == hf.config.num_key_value_heads
  assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
  np.testing.assert_allclose(_hf_logits(back, tokens), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("batch,segments", [(1, 6), (3, 8), (20, 2)])
def test_segments_without_memory_are_transformers_on_each_segment(batch, segments, tmp_path):
  """Memory kind 'none' over several segments: each segment's logits are transformers' on that segment alone
  (the decoder runs G segments as one step of batch x G rows, at most decoder.FOLD_ROWS: here all 6 segments
  in one step; 2 steps of 4; and, with 20 rows, one segment per step)."""
  hf = _hf_model("gqa")
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
  config, params = hf_llama.load(str(tmp_path / "hf"))
  config.segment_len = 8
  tokens = np.random.default_rng(1).integers(0, BASE["vocab_size"], (batch, 8 * segments))
  want = np.concatenate([_hf_logits(hf, tokens[:, 8 * s:8 * (s + 1)]) for s in range(segments)], axis=1)
  np.testing.assert_allclose(_our_logits(config, params, tokens), want, atol=1e-4, rtol=0)


def test_rope_scaling_changes_logits(tmp_path):
  """The llama3 case only tests scaling if scaling matters at these positions."""
  hf = _hf_model("llama3_rope")
  hf.save_pretrained(tmp_path, safe_serialization=True)
  config, params = hf_llama.load(str(tmp_path))
  tokens = np.random.default_rng(0).integers(0, BASE["vocab_size"], (1, 48))
  unscaled = config.copy_and_resolve_references()
  unscaled.rope_scaling = None
  diff = np.abs(_our_logits(config, params, tokens) - _our_logits(unscaled, params, tokens)).max()
  assert diff > 1e-3


@pytest.mark.parametrize("kind", ["lm2", "mplus"])
def test_load_into_memory_model_keeps_llama_and_fresh_memory(tmp_path, kind):
  hf = _hf_model("gqa")
  hf.save_pretrained(tmp_path, safe_serialization=True)
  llama_config, llama_params = hf_llama.load(str(tmp_path))

  lm2 = default_model_config()
  lm2.segment_len = 16
  lm2.memory.kind = kind  # mplus: the pool, store and retriever of memoryllm's code
  lm2.memory.num_slots = 8
  lm2.memory.num_heads = 2
  lm2.memory.layers = "1"
  config, params = hf_llama.load(str(tmp_path), lm2, rng=jax.random.key(3))
  assert config.segment_len == 16 and config.num_kv_heads == 2
  # Memory parameters: exactly a fresh initialisation with that key.
  fresh = init_params(LM2Model(config), jax.random.key(3))
  assert "memory" in params["decoder"]["layers_1_2"] and "memory" not in params["decoder"]["layers_0_1"]
  chex.assert_trees_all_equal(params["decoder"]["layers_1_2"]["memory"], fresh["decoder"]["layers_1_2"]["memory"])
  # Llama weights: the per-layer slices equal the plain Llama's.
  np.testing.assert_array_equal(params["decoder"]["layers_0_1"]["attn"]["q_proj"]["kernel"][0],
                                llama_params["decoder"]["layers_0_2"]["attn"]["q_proj"]["kernel"][0])
  np.testing.assert_array_equal(params["decoder"]["layers_1_2"]["mlp"]["down_proj"]["kernel"][0],
                                llama_params["decoder"]["layers_0_2"]["mlp"]["down_proj"]["kernel"][1])
  np.testing.assert_array_equal(params["embed"]["embedding"], llama_params["embed"]["embedding"])

  # Saving drops the memory and gives back the Llama.
  hf_llama.save(params, config, str(tmp_path / "out"))
  back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
  tokens = np.random.default_rng(1).integers(0, BASE["vocab_size"], (1, 20))
  np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(hf, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["rmt", "armt", "hmt"])
def test_load_into_segment_kind_model_keeps_llama_and_fresh_memory(tmp_path, kind):
  """Segment kinds' parameters sit at decoder/memory (model-level); they are a fresh initialisation, the rest is
  Llama."""
  hf = _hf_model("gqa")
  hf.save_pretrained(tmp_path, safe_serialization=True)
  ours = default_model_config()
  ours.segment_len = 16
  ours.memory.update(dict(kind=kind, num_slots=4, sensory_tokens=4, summary_tokens=8, cache_size=3))
  config, params = hf_llama.load(str(tmp_path), ours, rng=jax.random.key(3))
  fresh = init_params(LM2Model(config), jax.random.key(3))
  chex.assert_trees_all_equal(params["decoder"]["memory"], fresh["decoder"]["memory"])
  if kind == "armt":
    group = next(name for name in params["decoder"] if name.startswith("layers_"))
    chex.assert_trees_all_equal(params["decoder"][group]["memory"], fresh["decoder"][group]["memory"])
  hf_llama.save(params, config, str(tmp_path / "out"))
  back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
  tokens = np.random.default_rng(1).integers(0, BASE["vocab_size"], (1, 20))
  np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(hf, tokens), atol=1e-5, rtol=0)


def test_load_into_titans_keeps_llama_and_round_trips_its_memory(tmp_path):
  """titans 'mal' in layer 1 adds a memory and the norm before attention (post_memory_norm): both a fresh
  initialisation, the rest Llama; save writes them beside the Llama, and load reads them back."""
  hf = _hf_model("gqa")
  hf.save_pretrained(tmp_path, safe_serialization=True)
  _, llama_params = hf_llama.load(str(tmp_path))
  titans = default_model_config()
  titans.segment_len = 16
  titans.memory.update(dict(kind="titans", variant="mal", layers="1", num_heads=2, chunk_size=4))
  config, params = hf_llama.load(str(tmp_path), titans, rng=jax.random.key(3))
  fresh = init_params(LM2Model(config), jax.random.key(3))["decoder"]["layers_1_2"]
  for name in ("memory", "post_memory_norm"):
    jax.tree.map(np.testing.assert_array_equal, params["decoder"]["layers_1_2"][name], fresh[name])
  np.testing.assert_array_equal(params["decoder"]["layers_1_2"]["attn"]["q_proj"]["kernel"][0],
                                llama_params["decoder"]["layers_0_2"]["attn"]["q_proj"]["kernel"][1])
  hf_llama.save(params, config, str(tmp_path / "out"))
  back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
  tokens = np.random.default_rng(1).integers(0, BASE["vocab_size"], (1, 20))
  np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(hf, tokens), atol=1e-5, rtol=0)
  _, again = hf_llama.load(str(tmp_path / "out"))
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_load_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_llama.load(str(tmp_path))
  hf = _hf_model("gqa")
  hf.save_pretrained(tmp_path, safe_serialization=True)
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf_llama.load(str(tmp_path))


def test_tensor_shape_mismatch_names_the_tensor(tmp_path):
  _hf_model("gqa").save_pretrained(tmp_path, safe_serialization=True)
  config_path = tmp_path / "config.json"
  hf_config = json.loads(config_path.read_text())
  hf_config["intermediate_size"] = 80  # the tensors were saved with 96
  config_path.write_text(json.dumps(hf_config))
  with pytest.raises(ValueError, match=r"layers.0.mlp.gate_proj.weight has shape \(96, 64\), expected \(80, 64\)"):
    hf_llama.load(str(tmp_path))
