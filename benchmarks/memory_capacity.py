r"""Read cost against capacity: flat LM2 memory vs hierarchical memory at 1x, 4x, 16x, 64x the slots.

  python -m benchmarks.memory_capacity [--d_model=128 --batch=8 --segments=4 --steps=7]
                                      [--override=scan_layers=False --override=segment_unroll=4]

Each row compiles one training step (forward + backward through all segments, jit); then `--steps` rounds each
time every row once, one after the other, so that a change in the machine's load falls on all rows alike. A row
reports its median step and the median over rounds of its step over flat `lm2` at the first capacity in the same
round (with the rounds' range). `--override` sets config.model fields on every row. The flat `lm2`
memory of C x 64 slots is read by every token in full; the `hierarchical` memory holds the same C x 64 slots as 32
general slots plus banks of 16 slots, of which each token reads its top 2: 64 slots read per token at every
capacity, as flat LM2 at 1x. Peak memory is XLA's temporary buffer size for the compiled step plus its
arguments (CPU: `compiled.memory_analysis()`).
"""

import statistics

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import machine, model_overrides, timed_calls
from launch import compile_cache
from lm2_jax.model import LM2Model, count_params, init_params
from lm2_jax.model.config import default_model_config
from lm2_jax.train.loss import next_token_loss

_D = flags.DEFINE_integer("d_model", 128, "Model width (= slot width).")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size.")
_SEG = flags.DEFINE_integer("segment_len", 64, "Tokens per segment.")
_SEGMENTS = flags.DEFINE_integer("segments", 4, "Segments per sequence.")
_STEPS = flags.DEFINE_integer("steps", 7, "Rounds; each times one step of every row.")
_BPTT = flags.DEFINE_integer("bptt_segments", 0, "Gradient window through the carried memory (0: all segments).")
_CAPACITIES = flags.DEFINE_list("capacities", ["1", "4", "16", "64"], "Capacity multiples of 64 slots.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "config.model field=value for every row (a Python literal "
                                       "or a string), e.g. scan_layers=False, segment_unroll=4.")
BASE_SLOTS, GENERAL, BANK_SLOTS, TOP_K = 64, 32, 16, 2


def model_config(kind: str, capacity: int):
  m = default_model_config()
  m.update(dict(vocab_size=512, d_model=_D.value, num_layers=2, num_heads=4, num_kv_heads=4, d_ff=2 * _D.value,
                segment_len=_SEG.value, bptt_segments=_BPTT.value))
  m.update(model_overrides(_OVERRIDES.value, "--override"))
  m.memory.kind, m.memory.num_heads = kind, 4
  if kind == "lm2":
    m.memory.num_slots = capacity * BASE_SLOTS
  else:
    m.memory.update(dict(general_slots=GENERAL, bank_slots=BANK_SLOTS, top_k=TOP_K, write_tokens=8,
                         num_banks=(capacity * BASE_SLOTS - GENERAL) // BANK_SLOTS))
  return m


def build(kind: str, capacity: int) -> dict:
  """Compile one train step; -> the row's fields and `run`, which calls the step."""
  model = LM2Model(model_config(kind, capacity))
  params = init_params(model, jax.random.key(0))
  B, T = _BATCH.value, _SEG.value * _SEGMENTS.value
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 512, dtype=jnp.int32)

  def loss(p, memory):
    logits, memory, aux = model.apply({"params": p}, tokens, memory)
    return next_token_loss(logits, tokens)[0] + sum(aux["losses"].values(), 0.0)

  memory = model.init_memory(B)
  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, memory).compile()
  mem = compiled.memory_analysis()
  peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes) if mem is not None else float("nan")
  run = lambda: compiled(params, memory)
  timed_calls(run, 0)
  cfg = model.config.memory
  read = cfg.num_slots if kind == "lm2" else cfg.general_slots + cfg.top_k * cfg.bank_slots
  total = cfg.num_slots if kind == "lm2" else cfg.general_slots + cfg.num_banks * cfg.bank_slots
  return {"kind": kind, "capacity": capacity, "slots": total, "read_per_token": read, "run": run,
          "peak_mb": peak / 2**20, "memory_params": count_params(model)["memory"]}


def main(argv):
  del argv
  compile_cache.enable()
  rows = [build(kind, int(c)) for c in _CAPACITIES.value for kind in ("lm2", "hierarchical")]
  times = [[] for _ in rows]
  for _ in range(_STEPS.value):
    for r, t in zip(rows, times):
      t.append(timed_calls(r["run"], 0)[0])
  base = next(t for r, t in zip(rows, times) if r["kind"] == "lm2" and r["capacity"] == int(_CAPACITIES.value[0]))
  print(f"train step, batch {_BATCH.value} x {_SEGMENTS.value} segments of {_SEG.value}, d_model {_D.value}, "
        f"{jax.devices()[0].platform} ({machine()}), overrides {_OVERRIDES.value or 'none'}; {_STEPS.value} rounds, "
        "medians")
  print("| memory | capacity | slots | slots read per token | step ms | vs lm2 1x (rounds' range) | peak MB | "
        "memory params |")
  print("|---|---|---|---|---|---|---|---|")
  for r, t in zip(rows, times):
    ratios = [a / b for a, b in zip(t, base)]
    print(f"| {r['kind']} | {r['capacity']}x | {r['slots']} | {r['read_per_token']} | "
          f"{1e3 * statistics.median(t):.1f} | {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
          f"{r['peak_mb']:.1f} | {r['memory_params']:,} |")


if __name__ == "__main__":
  app.run(main)
