"""Validated, hashable model configuration.

`config.model` in the experiment files is an `ml_collections.ConfigDict` (users override fields from the command
line). The model itself reads a `ModelConfig`: a frozen dataclass built once by `ModelConfig.from_config`, which
checks every field and raises `ConfigError` naming the field, the bad value and the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
ROPE_TYPES = ("default", "llama3")
ATTENTION_KERNELS = {"xla": None, "cudnn": "gpu", "splash": "tpu"}  # kernel -> the JAX backend it needs


class ConfigError(ValueError):
  """A configuration value is invalid. The message names the field, the value and the fix."""


def check(ok: bool, field: str, value: Any, fix: str) -> None:
  """Raises ConfigError('config.<field>=<value>: <fix>') unless `ok`."""
  if not ok:
    raise ConfigError(f"config.{field}={value!r}: {fix}")


def as_dict(cfg: Any, field: str) -> dict[str, Any]:
  """A ConfigDict, FrozenConfigDict or mapping as a plain (shallow) dict."""
  if hasattr(cfg, "to_dict"):
    return dict(cfg.to_dict())
  check(isinstance(cfg, Mapping), field, cfg, "expected a ConfigDict or a mapping")
  return dict(cfg)


def check_fields(values: Mapping[str, Any], known: set[str], field: str, required: set[str] | None = None) -> None:
  """Rejects fields nobody reads (usually typos in an override) and missing required ones."""
  for name in sorted(values):
    check(name in known, f"{field}.{name}", values[name], f"unknown field; the fields of config.{field} are {sorted(known)}")
  for name in sorted(known if required is None else required):
    check(name in values, f"{field}.{name}", None, "required field is missing; set it in the config file")


def positive_int(values: Mapping[str, Any], name: str, field: str) -> int:
  v = values[name]
  check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{field}.{name}", v,
        "must be a positive integer")
  return v


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 rotary frequency scaling (the `rope_type: llama3` of Hugging Face configs)."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the decoder needs. Field names match `config.model` (DESIGN section 3)."""
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  d_ff: int
  rope_theta: float
  rope_scaling: RopeScaling | None
  tie_embeddings: bool
  norm_eps: float
  segment_len: int
  bptt_segments: int
  dtype: str
  scan_layers: bool
  remat_policy: str
  memory: Any  # the memory kind's own frozen config (see lm2_jax.model.memory)
  attention_kernel: str = "xla"
  segment_unroll: int = 1  # segments per iteration of the segment scan (XLA sees them as straight-line code)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def memory_layers(self) -> tuple[int, ...]:
    """Indices of the decoder layers that carry a per-layer memory, ascending; () for 'none' and for the
    model-level kind 'rmt', whose memory tokens pass through every layer; armt's associative layers."""
    return self.memory.layers

  def num_segments(self, seq_len: int) -> int:
    """How many segments a sequence of `seq_len` tokens is split into (validates the length)."""
    if seq_len <= self.segment_len:
      return 1
    if seq_len % self.segment_len:
      raise ConfigError(
          f"config.model.segment_len={self.segment_len}: the input has T={seq_len} tokens, which is not a "
          f"multiple of segment_len. Pad or crop T to a multiple of {self.segment_len}, or change segment_len.")
    return seq_len // self.segment_len

  @classmethod
  def from_config(cls, cfg: Any) -> "ModelConfig":
    """Builds and validates a ModelConfig from `config.model` (ConfigDict or mapping)."""
    if isinstance(cfg, ModelConfig):
      return cfg
    from lm2_jax.model import memory as memory_lib  # local: the registry imports this module

    v = as_dict(cfg, "model")
    known = {f.name for f in dataclasses.fields(cls)}
    check_fields(v, known, "model", required=known - {"attention_kernel", "segment_unroll"})

    ints = {n: positive_int(v, n, "model") for n in
            ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff", "segment_len")}
    check(ints["d_model"] % ints["num_heads"] == 0, "model.num_heads", ints["num_heads"],
          f"must divide d_model={ints['d_model']}; pick num_heads from the divisors of d_model")
    check((ints["d_model"] // ints["num_heads"]) % 2 == 0, "model.num_heads", ints["num_heads"],
          f"head_dim = d_model/num_heads = {ints['d_model'] // ints['num_heads']} must be even for rotary embeddings")
    check(ints["num_heads"] % ints["num_kv_heads"] == 0, "model.num_kv_heads", ints["num_kv_heads"],
          f"must divide num_heads={ints['num_heads']} (grouped-query attention); use 1 for multi-query")
    bptt = v["bptt_segments"]
    check(isinstance(bptt, int) and not isinstance(bptt, bool) and bptt >= 0, "model.bptt_segments", bptt,
          "must be an integer >= 0 (0: gradients flow through the carried memory across the whole input)")
    theta = v["rope_theta"]
    check(isinstance(theta, (int, float)) and theta > 0, "model.rope_theta", theta, "must be a positive number")
    eps = v["norm_eps"]
    check(isinstance(eps, (int, float)) and 0 < eps < 1, "model.norm_eps", eps, "must be in (0, 1), e.g. 1e-5")
    check(v["dtype"] in SUPPORTED_DTYPES, "model.dtype", v["dtype"], f"use one of {SUPPORTED_DTYPES}")
    check(v["remat_policy"] in REMAT_POLICIES, "model.remat_policy", v["remat_policy"],
          f"use one of {REMAT_POLICIES}")
    for b in ("tie_embeddings", "scan_layers"):
      check(isinstance(v[b], bool), f"model.{b}", v[b], "must be True or False")

    kernel = v.get("attention_kernel", "xla")
    check(kernel in ATTENTION_KERNELS, "model.attention_kernel", kernel, f"use one of {sorted(ATTENTION_KERNELS)}")
    needs = ATTENTION_KERNELS[kernel]  # the backend is asked only then: configs are read before
    if needs is not None:              # jax.distributed.initialize, which must come before any device is touched
      backend = jax.default_backend()
      check(backend == needs, "model.attention_kernel", kernel,
            f"the {kernel!r} kernel runs on {str(needs).upper()} only and this process's JAX backend is "
            f"{backend!r}; use 'xla' here (the kernels compute the same attention)")
    unroll = v.get("segment_unroll", 1)
    check(isinstance(unroll, int) and not isinstance(unroll, bool) and unroll >= 1, "model.segment_unroll", unroll,
          "must be an integer >= 1 (1: a rolled loop over segments; the number of segments: fully unrolled)")
    memory = memory_lib.parse_config(v["memory"], num_layers=ints["num_layers"], d_model=ints["d_model"])
    return cls(**ints, bptt_segments=bptt, rope_theta=float(theta), rope_scaling=_rope_scaling(v["rope_scaling"]),
               tie_embeddings=v["tie_embeddings"], norm_eps=float(eps), dtype=v["dtype"],
               scan_layers=v["scan_layers"], remat_policy=v["remat_policy"], memory=memory, attention_kernel=kernel,
               segment_unroll=unroll)


def _rope_scaling(value: Any) -> RopeScaling | None:
  if value is None:
    return None
  v = as_dict(value, "model.rope_scaling")
  rope_type = v.pop("rope_type", "llama3")
  check(rope_type in ROPE_TYPES, "model.rope_scaling.rope_type", rope_type, f"use one of {ROPE_TYPES}")
  if rope_type == "default":
    return None
  known = {f.name for f in dataclasses.fields(RopeScaling)}
  check_fields(v, known, "model.rope_scaling")
  out = RopeScaling(factor=float(v["factor"]), low_freq_factor=float(v["low_freq_factor"]),
                    high_freq_factor=float(v["high_freq_factor"]),
                    original_max_position_embeddings=int(v["original_max_position_embeddings"]))
  check(out.factor >= 1, "model.rope_scaling.factor", out.factor, "must be >= 1")
  check(out.high_freq_factor > out.low_freq_factor, "model.rope_scaling.high_freq_factor", out.high_freq_factor,
        f"must exceed low_freq_factor={out.low_freq_factor}")
  return out


def default_model_config() -> ml_collections.ConfigDict:
  """`config.model` with every field at its default; experiment files start from it and change fields."""
  m = ml_collections.ConfigDict()
  m.vocab_size = 32000
  m.d_model = 512
  m.num_layers = 8
  m.num_heads = 8
  m.num_kv_heads = 8
  m.d_ff = 1376
  m.rope_theta = 500000.0
  m.rope_scaling = ml_collections.config_dict.placeholder(dict)  # None, or a llama3 scaling dict
  m.tie_embeddings = False
  m.norm_eps = 1e-5
  m.segment_len = 256          # tokens per segment; self-attention never reaches across segments
  m.bptt_segments = 4          # gradient window through the carried memory, in segments (0: unlimited)
  m.dtype = "float32"          # compute dtype; parameters stay float32
  m.scan_layers = True
  m.remat_policy = "none"      # none | full | dots | dots_with_no_batch_dims
  m.attention_kernel = "xla"   # xla (any backend) | cudnn (GPU flash attention) | splash (TPU)
  m.segment_unroll = 1         # segments unrolled per scan iteration: faster steps, longer compiles

  m.memory = ml_collections.ConfigDict()
  m.memory.kind = "none"       # none | lm2 | hierarchical | rmt | armt | memoryllm | mplus | titans (README: the kinds)
  m.memory.layers = "all"      # 'all', or layer indices: '0,4,8' (or a list in Python); rmt: 'all' only
  m.memory.num_slots = 64      # slots per memory layer; rmt: memory tokens per segment
  m.memory.num_heads = 8
  m.memory.slot_dim = 0        # 0: d_model
  m.memory.read_decay = 0.99   # per-segment decay of the read statistics kept in the memory state
  m.memory.forget_bias = 1.0   # lm2, hierarchical: initial forget-gate bias (+1 keeps 0.73 of a slot per segment)
  m.memory.write_gate = False  # lm2, hierarchical: each token scales its own write (lm2.py docstring)
  # hierarchical (lm2_jax/model/memory/hierarchical.py): general level + banks, each token reads top_k banks
  m.memory.general_slots = 32
  m.memory.num_banks = 64
  m.memory.bank_slots = 32
  m.memory.top_k = 2
  m.memory.write_tokens = 8    # tokens per segment written into the banks
  m.memory.skip_threshold = 0.0  # deep-read gate below which a token skips the deep level (0: never)
  m.memory.balance_loss_weight = 0.01
  m.memory.product_keys = False  # route with product keys (num_banks a square): O(sqrt(num_banks)) per token
  m.memory.capacity_factor = 2.0  # per-bank token capacity per segment, in multiples of the even share
  # memoryllm / mplus (lm2_jax/model/memory/memoryllm.py): a pool of num_slots tokens per layer
  m.memory.update_tokens = 4   # K: tokens a segment writes into the pool (as many dropped at random)
  m.memory.retrieve_tokens = 4  # mplus: r, long-term tokens each query retrieves
  m.memory.ltm_capacity = 64   # mplus: the device-side long-term store per layer (tokens)
  m.memory.retriever_dim = 32  # mplus: width of the retriever's query/key projections
  # armt (lm2_jax/model/memory/armt.py): rmt's tokens plus an associative matrix in each of `layers`
  m.memory.key_dim = 32        # keys and queries before the DPFP feature map (features: 6 * key_dim)
  m.memory.gamma_correction = True  # the normaliser counts only the new part of a key (off: the plain sum)
  # kind titans (lm2_jax/model/memory/titans.py): an MLP memory updated per chunk by gradient steps; num_heads above
  m.memory.variant = "mac"       # mac (memory as context) | mag (gated branch) | mal (memory layer before attention)
  m.memory.depth = 2             # layers of the memory MLP, 1-4
  m.memory.expansion = 2         # its hidden width, in multiples of d_model / num_heads
  m.memory.chunk_size = 32       # tokens per memory update; a token reads the chunks before its own
  m.memory.persistent_tokens = 4  # mac: learned keys/values every token attends to
  m.memory.max_update_norm = 1.0  # gradient norm per head and chunk is clipped to this
  # hmt (lm2_jax/model/memory/hmt.py): sensory tokens, a summary pass, recall over a cache of memory embeddings
  m.memory.sensory_tokens = 32   # k, last tokens of the previous segment read before the segment
  m.memory.summary_tokens = 128  # j, tail of a segment the summary token reads (the recall query)
  m.memory.cache_size = 16       # N, cached memory embeddings
  m.memory.eviction = "fifo"     # fifo | learned (a scorer trained to predict recall attention)
  m.memory.eviction_loss_weight = 1.0
  return m
