"""Small configs and utilities shared by the tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.model import LM2Model, init_params
from lm2_jax.model.config import default_model_config


def tiny_config(kind="lm2", **overrides):
  """A 2-layer, d_model 32 config; `overrides` set config.model fields, `memory_<field>` set memory fields."""
  m = default_model_config()
  m.update(dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, segment_len=8,
                bptt_segments=0))
  m.memory.kind = kind
  m.memory.num_slots = 6
  m.memory.num_heads = 2
  m.memory.update(dict(general_slots=4, num_banks=6, bank_slots=4, top_k=2, write_tokens=3))  # hierarchical
  m.memory.chunk_size = 4  # titans: two memory updates per segment
  m.memory.update(dict(sensory_tokens=2, summary_tokens=3, cache_size=2))  # hmt
  for k, v in overrides.items():
    if k.startswith("memory_"):
      m.memory[k[len("memory_"):]] = v
    else:
      m[k] = v
  return m


def build(config, seed=0):
  """The model and fresh parameters; armt's value projections, which start at zero (a fresh armt reads nothing
  from its associative memory), get random values, so that tests exercise that memory."""
  model = LM2Model(config)
  return model, jax.tree.map(lambda a: a, _params(model.config, seed))  # fresh containers: tests may edit them


@functools.lru_cache(maxsize=None)
def _params(config, seed):
  """Parameters of `build`, initialised once per (ModelConfig, seed) in a test process."""
  model = LM2Model(config)
  params = init_params(model, jax.random.key(seed))
  if model.config.memory.kind == "armt":
    def values(path, a):
      return 0.5 * jax.random.normal(jax.random.key(seed + 1), a.shape) if "v_proj" in str(path) and "'memory'" in str(path) else a
    params = jax.tree_util.tree_map_with_path(values, params)
  return params


def logits_fn(model, params):
  """jit-compiled tokens -> logits, starting from a fresh memory (`forward`'s compilation, shared by the tests of
  one config)."""
  apply = forward(model.config)
  return lambda toks: apply(params, toks)[0]


def random_tokens(seed, shape, vocab=64):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


@functools.lru_cache(maxsize=None)
def forward(config):
  """jit (params, tokens[, memory[, segment_ids]]) -> (logits, memory after them), from a fresh memory when none
  is given; one per ModelConfig, so that calls with the same shapes share one compilation."""
  model = LM2Model(config)
  return jax.jit(lambda params, tokens, memory=None, segment_ids=None:
                 model.apply({"params": params}, tokens, memory, segment_ids=segment_ids)[:2])


def recompute_everything(model, params, prompt, new, length=None):
  """Greedy decoding that runs the whole sequence from a fresh memory for every new token, padded to `length`
  (default: whole segments; causal, so the padding is never read)."""
  S = model.config.segment_len
  T = length or -(-(len(prompt) + new) // S) * S
  apply = forward(model.config)
  seq = list(prompt)
  for _ in range(new):
    toks = np.zeros((1, T), np.int32)
    toks[0, :len(seq)] = seq
    seq.append(int(jnp.argmax(apply(params, toks)[0][0, len(seq) - 1])))
  return seq[len(prompt):]
