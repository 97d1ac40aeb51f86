"""Hugging Face Llama checkpoints in and out (config.json + safetensors, as `save_pretrained` writes them).

    model_config, params = hf_llama.load("path/to/llama")             # a plain Llama (memory kind 'none')
    model_config, params = hf_llama.load(path, model_config=my_cfg)    # add memory: the Llama weights, plus
                                                                       # fresh memory parameters
    hf_llama.save(params, model_config, "out/")                        # `LlamaForCausalLM.from_pretrained`;
                                                                       # an LM2 model loads back whole

Needs neither torch nor transformers: tensors go through `safetensors.numpy` (bfloat16 via ml_dtypes).

Memory parameters are not part of a Llama checkpoint: `save` writes them beside it, in `memory.safetensors`, which
`transformers` ignores. Its tensors are named by their path in our per-layer parameter layout, joined by dots
(`decoder.layer_{i}.memory.<module>.<param>` for layer kinds, e.g. `decoder.layer_3.memory.q_proj.kernel`;
`decoder.memory.<...>` for the model-level kind rmt), each array exactly as in our params (no transposition);
its metadata `model_config` is our `config.model` as JSON. `load` reads them back when the file is present:
`load(path)` then returns the LM2 model it was saved from (config and all parameters). Without the file, or
given a config with other memory, it refuses or initialises fresh memory as documented in `load`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from typing import Any

import flax
import jax
import ml_collections
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from lm2_jax.model.build import init_params
from lm2_jax.model.config import ConfigError, ModelConfig, default_model_config
from lm2_jax.model.decoder import LM2Model
from lm2_jax.model.layout import scan_layout, unscan_layout

# Hugging Face name -> (our path in the per-layer layout, number of leading input dims of our kernel; None for
# vectors and the embedding, which are copied as they are). A Linear weight [out, in] is our kernel
# [in dims..., out dims...] transposed and flattened.
_GLOBAL = {
    "model.embed_tokens.weight": (("embed", "embedding"), None),
    "model.norm.weight": (("final_norm", "scale"), None),
    "lm_head.weight": (("lm_head", "kernel"), 1),
}
_LAYER = {
    "self_attn.q_proj.weight": (("attn", "q_proj", "kernel"), 1),
    "self_attn.k_proj.weight": (("attn", "k_proj", "kernel"), 1),
    "self_attn.v_proj.weight": (("attn", "v_proj", "kernel"), 1),
    "self_attn.o_proj.weight": (("attn", "o_proj", "kernel"), 2),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), 1),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), 1),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), 1),
    "input_layernorm.weight": (("attn_norm", "scale"), None),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), None),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry
MEMORY_FILE = "memory.safetensors"  # the parameters a Llama lacks (module docstring)


def _name_map(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], int | None]]:
  names = {k: v for k, v in _GLOBAL.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
  for i in range(cfg.num_layers):
    for k, (path, n_in) in _LAYER.items():
      names[f"model.layers.{i}.{k}"] = (("decoder", f"layer_{i}", *path), n_in)
  return names


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: expected a Hugging Face checkpoint directory written by "
                            "save_pretrained (config.json + model.safetensors or model.safetensors.index.json)")
  with open(path) as f:
    return json.load(f)


def _model_fields(hf: dict[str, Any], path: str) -> dict[str, Any]:
  """Our config.model shape fields from a Hugging Face LlamaConfig dict (transformers 4.x or 5.x layout)."""
  def need(cond, field, fix):
    if not cond:
      raise ValueError(f"{path}/config.json: {field}={hf.get(field)!r}: {fix}")

  need(hf.get("model_type") == "llama", "model_type", "only Llama checkpoints (model_type 'llama') are supported")
  need(hf.get("hidden_act", "silu") == "silu", "hidden_act", "Llama uses 'silu'; other activations are unsupported")
  need(not hf.get("attention_bias", False), "attention_bias", "attention biases are not supported")
  need(not hf.get("mlp_bias", False), "mlp_bias", "MLP biases are not supported")
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  need(head_dim * heads == hf["hidden_size"], "head_dim", "must equal hidden_size/num_attention_heads")
  rope = dict(hf.get("rope_parameters") or {})           # transformers >= 5
  theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
  scaling = rope or hf.get("rope_scaling") or None        # transformers 4.x
  if scaling is not None:
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    need(rope_type in ("default", "llama3"), "rope_scaling", "only rope_type 'default' and 'llama3' are supported")
    scaling = None if rope_type == "default" else {"rope_type": "llama3", **{
        k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
  return dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
              num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, d_ff=hf["intermediate_size"],
              rope_theta=float(theta), rope_scaling=scaling, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
              norm_eps=float(hf.get("rms_norm_eps", 1e-6)), segment_len=hf.get("max_position_embeddings", 2048))


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    files = sorted(set(_read_json(index)["weight_map"].values()))
  else:
    files = ["model.safetensors"]
  tensors = {}
  for f in files:
    full = os.path.join(path, f)
    if not os.path.exists(full):
      raise FileNotFoundError(f"{full} does not exist; {path} must hold the safetensors files of the checkpoint "
                              "(PyTorch .bin checkpoints are not supported: re-save with safe_serialization=True)")
    tensors.update(load_file(full))
  return tensors


def load(path: str, model_config: Any = None, *, rng: jax.Array | None = None):
  """Reads a Hugging Face Llama checkpoint directory.

  Args:
    path: directory with config.json and model.safetensors (or a sharded model.safetensors.index.json), and
      optionally memory.safetensors (written by `save` for a model with memory).
    model_config: optional `config.model` to load into (for example one with an LM2 memory); its shape fields
      are replaced by the checkpoint's, its other fields (memory, segment_len, dtype, scan_layers, ...) kept.
      Default: the config saved in memory.safetensors when there is one, else a plain Llama, memory 'none',
      segment_len = max_position_embeddings.
    rng: key for the parameters a Llama checkpoint lacks (memory) when it has no memory.safetensors; default
      jax.random.key(0). With the file, the memory parameters are read from it (their names and shapes must be
      those of `model_config`'s memory).
  Returns:
    (model_config ConfigDict, params float32 pytree in the layout `model_config.scan_layers` asks for).
  """
  fields = _model_fields(_read_json(os.path.join(path, "config.json")), path)
  memory_tensors, saved_config = _read_memory(path)
  if model_config is None and saved_config is not None:
    model_config = ml_collections.ConfigDict(saved_config)
  config = copy.deepcopy(model_config) if model_config is not None else default_model_config()
  if model_config is not None:
    fields.pop("segment_len")
  config.update(fields)
  cfg = ModelConfig.from_config(config)
  if cfg.memory.kind != "none" and memory_tensors is None:
    # Exactly what init_params gives this config, so the memory parameters are a fresh initialisation; the Llama
    # tensors are overwritten below, in the per-layer layout.
    params = init_params(LM2Model(cfg), rng if rng is not None else jax.random.key(0))
    params = unscan_layout(params, cfg) if cfg.scan_layers else params
  else:  # every tensor comes from the files: shapes only, no wasted initialisation
    per_layer = LM2Model(dataclasses.replace(cfg, scan_layers=False))
    params = jax.eval_shape(lambda: init_params(per_layer, jax.random.key(0)))

  tensors = _read_tensors(path)
  names = _name_map(cfg)
  missing = sorted(set(names) - set(tensors))
  if missing:
    raise ValueError(f"{path}: the checkpoint lacks {len(missing)} tensors its config.json implies, e.g. "
                     f"{missing[:3]}; is the directory complete?")
  unknown = sorted(k for k in set(tensors) - set(names)
                   if not k.endswith(_IGNORED_SUFFIXES) and not (cfg.tie_embeddings and k == "lm_head.weight"))
  if unknown:
    raise ValueError(f"{path}: tensors this Llama loader does not know: {unknown[:5]}; the checkpoint is not a "
                     "plain LlamaForCausalLM")
  params = jax.tree.map(lambda a: a if isinstance(a, jax.ShapeDtypeStruct) else np.asarray(a), params)
  for name, (our_path, n_in) in names.items():
    node = params
    for key in our_path[:-1]:
      node = node[key]
    target = node[our_path[-1]]
    w = tensors[name].astype(np.float32)
    hf_shape = target.shape if n_in is None else (int(np.prod(target.shape[n_in:])), int(np.prod(target.shape[:n_in])))
    if w.shape != hf_shape:
      raise ValueError(f"{path}: tensor {name} has shape {w.shape}, expected {hf_shape} from config.json")
    node[our_path[-1]] = w if n_in is None else w.T.reshape(target.shape)
  if memory_tensors is not None:
    params = _set_memory(params, cfg, memory_tensors, path)
  if cfg.scan_layers:
    params = scan_layout(params, cfg)
  return config, params


def _memory_names(params, cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
  """memory.safetensors name -> our path, for every parameter (per-layer layout) that a Llama lacks."""
  llama = {our_path for our_path, _ in _name_map(cfg).values()}
  return {".".join(k): k for k in flax.traverse_util.flatten_dict(params) if k not in llama}


def _read_memory(path: str) -> tuple[dict[str, np.ndarray] | None, dict[str, Any] | None]:
  """(tensors, the config.model they were saved with) of path/memory.safetensors; (None, None) without it."""
  full = os.path.join(path, MEMORY_FILE)
  if not os.path.exists(full):
    return None, None
  with safe_open(full, framework="numpy") as f:
    return {k: f.get_tensor(k) for k in f.keys()}, json.loads((f.metadata() or {}).get("model_config", "null"))


def _set_memory(params, cfg: ModelConfig, tensors: dict[str, np.ndarray], path: str):
  """params (per-layer layout) with the memory parameters from memory.safetensors."""
  names = _memory_names(params, cfg)
  if not names:
    logging.warning("hf_llama.load: %s/%s holds memory parameters; memory kind 'none' leaves them out",
                    path, MEMORY_FILE)
    return params
  if set(names) != set(tensors):
    missing, unknown = sorted(set(names) - set(tensors))[:3], sorted(set(tensors) - set(names))[:3]
    raise ValueError(f"{path}/{MEMORY_FILE}: its tensors are not those of config.model.memory={cfg.memory!r} "
                     f"(missing {missing}, unknown {unknown}); "
                     "load with the config it was saved with (the default when model_config is None), or move "
                     f"{MEMORY_FILE} away to start from fresh memory")
  flat = flax.traverse_util.flatten_dict(params)
  for name, key in names.items():
    if tensors[name].shape != flat[key].shape:
      raise ValueError(f"{path}/{MEMORY_FILE}: tensor {name} has shape {tensors[name].shape}, expected "
                       f"{flat[key].shape} from config.model.memory; load with the config it was saved with")
    flat[key] = tensors[name].astype(np.float32)
  return flax.traverse_util.unflatten_dict(flat)


def check_matches(path: str, model_config: Any) -> None:
  """Refuses a `config.model` whose shape fields (vocab_size, d_model, ..., rope) differ from the checkpoint's
  config.json, naming the first: a run that trains on the imported weights must be configured with their shape."""
  fields = _model_fields(_read_json(os.path.join(path, "config.json")), path)
  fields.pop("segment_len")
  want = ModelConfig.from_config(model_config)
  config = copy.deepcopy(model_config)
  config.update(fields)
  got = ModelConfig.from_config(config)
  for name in fields:
    if getattr(want, name) != getattr(got, name):
      raise ConfigError(f"config.model.{name}={getattr(want, name)!r}: the checkpoint {path} has "
                        f"{getattr(got, name)!r} (config.json); set it to that, or import a checkpoint of this shape")


def _hf_config(cfg: ModelConfig) -> dict[str, Any]:
  rope_scaling = None
  if cfg.rope_scaling is not None:
    rope_scaling = {"rope_type": "llama3", **cfg.rope_scaling.__dict__}
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.segment_len,
      "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
      # transformers 4.x reads these two; 5.x reads rope_parameters.
      "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
      "rope_parameters": {"rope_type": "default", **(rope_scaling or {}), "rope_theta": cfg.rope_theta},
  }


def save(params, model_config: Any, path: str, *, dtype: str = "float32") -> None:
  """Writes params as a Hugging Face Llama checkpoint (config.json + model.safetensors) into directory `path`,
  and the memory parameters, if any, into memory.safetensors (see the module docstring).

  dtype: 'float32' or 'bfloat16' for the stored tensors.
  """
  cfg = ModelConfig.from_config(model_config)
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r}: use 'float32' or 'bfloat16'")
  np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
  if cfg.scan_layers:
    params = unscan_layout(params, cfg)
  flat = flax.traverse_util.flatten_dict(params)
  memory = {name: np.asarray(flat[key], np.float32).astype(np_dtype)
            for name, key in _memory_names(params, cfg).items()}
  tensors = {}
  for name, (our_path, n_in) in _name_map(cfg).items():
    node = params
    for key in our_path:
      node = node[key]
    a = np.asarray(node, np.float32)
    if n_in is not None:
      a = a.reshape(int(np.prod(a.shape[:n_in])), -1).T
    tensors[name] = np.ascontiguousarray(a).astype(np_dtype)
  os.makedirs(path, exist_ok=True)
  # Write the files beside their final names, then rename: an interrupted save leaves no half-written checkpoint.
  names = ["model.safetensors", "config.json"]
  save_file(tensors, os.path.join(path, "model.safetensors.tmp"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json.tmp"), "w") as f:
    json.dump({**_hf_config(cfg), "torch_dtype": dtype}, f, indent=2)
  if memory:
    names.append(MEMORY_FILE)
    model_json = (model_config.to_json_best_effort() if hasattr(model_config, "to_json_best_effort")
                  else json.dumps(dict(model_config)))
    save_file(memory, os.path.join(path, MEMORY_FILE + ".tmp"), metadata={"model_config": model_json})
  elif os.path.exists(os.path.join(path, MEMORY_FILE)):  # a memory file of an earlier save does not belong here
    os.remove(os.path.join(path, MEMORY_FILE))
  for name in names:
    os.replace(os.path.join(path, name + ".tmp"), os.path.join(path, name))
