"""Model FLOPs per token (lm2_jax.train.flops) against two independent counts of the compiled model.

1. XLA's own count (`compiled.cost_analysis()['flops']`) of the forward pass. XLA counts a while loop's body once,
   not once per trip, so these configs run one segment with unrolled layers (no loop). XLA also counts every
   elementwise op (norms, rotary, softmax, activations: about 1 FLOP per element), which the formula leaves out,
   and it removes duplicated work (CSE), which the formula never counts: so XLA's count must lie at or above the
   formula, by at most the elementwise share. That share is O(D + X + V) per token per op against the matmuls'
   O(D^2 + X D + D V): 1.0-1.5% at these sizes; 3% is the bound asserted.
2. A brute-force count of the matmuls in the traced program (every dot_general in the jaxpr, 2 x output size x
   contracted size, times the trip count of each enclosing scan), on rows of several segments with scanned
   layers: exactly the formula for `none`, `rmt`, `armt` and `hmt`; for `lm2` the traced program also projects the slot keys a
   second time in the write (XLA merges the two), 2 N S^2 / L per memory layer more than the formula; for
   `memoryllm` and `mplus` the self-update pass projects q, k, v of the same input again (2 D E (H + 2G) per
   memory layer), and `mplus` computes two statistics by einsum (2 C + 2 R).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.model import LM2Model, init_params
from lm2_jax.model.config import default_model_config
from lm2_jax.train import trainer
from lm2_jax.train.flops import forward_flops_per_token, train_flops_per_token

HIERARCHICAL = dict(general_slots=8, num_banks=4, bank_slots=8, top_k=2, write_tokens=4, capacity_factor=1.0)
HMT = dict(sensory_tokens=4, summary_tokens=8, cache_size=3, eviction="fifo")
HMT_LEARNED = {**HMT, "eviction": "learned"}
MEMORYLLM = dict(update_tokens=4)
MPLUS = dict(update_tokens=4, retrieve_tokens=4, ltm_capacity=16, retriever_dim=32)


def _config(kind, segment_len, scan_layers, **memory):
  m = default_model_config()
  m.update(dict(vocab_size=512, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=256,
                segment_len=segment_len, bptt_segments=0, scan_layers=scan_layers))
  m.memory.update(dict(kind=kind, num_slots=8, num_heads=4, **memory))
  return m


def _forward(config, batch, length):
  """The model's forward (logits and new memory, so that the write is not dead code) and its parameters' shapes."""
  model = LM2Model(config)
  tokens = jnp.zeros((batch, length), jnp.int32)
  params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  return model, (lambda p: model.apply({"params": p}, tokens)[:2]), params


def _matmul_flops(jaxpr, trips=1):
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += trips * 2 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in contract])
    inner = trips * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else trips
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          total += _matmul_flops(sub, inner)
  return total


@pytest.mark.parametrize("kind,memory", [("none", {}), ("lm2", {}), ("rmt", {}), ("armt", {}), ("hierarchical", HIERARCHICAL),
                                         ("hierarchical", {**HIERARCHICAL, "num_banks": 16, "product_keys": True}),
                                         ("memoryllm", MEMORYLLM), ("mplus", MPLUS)])
def test_formula_matches_xla_cost_analysis(kind, memory):
  batch, length = 2, 64
  model, forward, params = _forward(_config(kind, length, False, **memory), batch, length)
  cost = jax.jit(forward).lower(params).compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"] / (batch * length)
  formula = sum(forward_flops_per_token(model.config, length).values())
  assert formula <= xla <= 1.03 * formula, (formula, xla)


@pytest.mark.parametrize("kind,memory", [("none", {}), ("lm2", {}), ("lm2", {"write_gate": True}), ("rmt", {}),
                                         ("armt", {}), ("hmt", HMT), ("hmt", HMT_LEARNED),
                                         ("memoryllm", MEMORYLLM), ("mplus", MPLUS), ("titans", {}),
                                         ("titans", dict(variant="mag", depth=1)),
                                         ("titans", dict(variant="mal", depth=3, chunk_size=16))])
def test_formula_matches_matmuls_of_traced_program(kind, memory):
  batch, length, segment = 2, 96, 32
  model, forward, params = _forward(_config(kind, segment, True, **memory), batch, length)
  traced = _matmul_flops(jax.make_jaxpr(forward)(params).jaxpr) / (batch * length)
  cfg = model.config
  d, h, g, e, memory_layers = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, len(cfg.memory.layers)
  reprojection = memory_layers * 2 * d * e * (h + 2 * g)  # the self-update pass projects q, k, v of the same input
  not_model_flops = {  # matmuls the traced program has and the formula rightly leaves out
      "lm2": 2 * 8 * d ** 2 / segment * cfg.num_layers,  # the slot keys projected a second time in the write
      "memoryllm": reprojection,
      # ... and M+'s statistics: the share of tokens that picked each store token, their mean retriever query
      "mplus": reprojection + memory_layers * (2 * MPLUS["ltm_capacity"] + 2 * MPLUS["retriever_dim"]),
  }.get(kind, 0)
  formula = sum(forward_flops_per_token(cfg, length).values())
  np.testing.assert_allclose(traced, formula + not_model_flops, rtol=1e-3)
  assert train_flops_per_token(cfg, length) == 3 * formula


def test_dense_decoder_is_six_n_plus_attention():
  """The textbook count: 6 x (matmul parameters) per token, plus 12 x layers x X x D for attention."""
  cfg = LM2Model(_config("none", 128, True)).config
  matmul_params = cfg.num_layers * (2 * cfg.d_model ** 2 + 2 * cfg.d_model * cfg.num_kv_heads * cfg.head_dim
                                    + 3 * cfg.d_model * cfg.d_ff) + cfg.d_model * cfg.vocab_size
  expected = 6 * matmul_params + 12 * cfg.num_layers * 128 * cfg.d_model
  assert train_flops_per_token(cfg, 1024) == expected


def test_trainer_logs_tokens_per_s_and_mfu(tmp_path):
  """metrics.jsonl: tokens/s of the steps since the last row, never of the compiling first step, and
  MFU = model FLOPs per token x tokens/s / config.train.peak_flops."""
  from test_trainer import small_config

  config = small_config(steps=3)
  config.train.peak_flops = 1e9
  trainer.train(config, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3] and "tokens_per_s" not in rows[0]
  per_token = train_flops_per_token(LM2Model(config.model).config, config.train.seq_len)
  for r in rows[1:]:
    assert r["tokens_per_s"] > 0
    np.testing.assert_allclose(r["mfu"], per_token * r["tokens_per_s"] / 1e9, rtol=1e-6)
