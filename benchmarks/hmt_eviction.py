r"""HMT retention: learned eviction against FIFO when the needed segment is older than the cache.

  python -m benchmarks.hmt_eviction [--seeds=0,1 --steps=400 --lr=5e-3 --segments=8 --distractors=values
                                     --format=value --cache_size=2 --gap_curriculum=... --clip_norm=0
                                     --out=benchmarks/hmt_eviction.json]
  python -m benchmarks.hmt_eviction --steps=1000 --gap_curriculum="0:0,1" \
      --out=benchmarks/hmt_eviction_in_cache_gaps.json        # the README's comparison

The task (generated; tokens: 1 needle marker, 2 query, 3 other-segment marker, keys 8..23, values 24..39, filler
40..63): rows of `segments` segments of 16 tokens. One segment is the needle, [marker, v, v, ..., v] (`--format=
value`; `pairs`: [marker, k1, v1, ..., filler] with `pairs` key-value pairs); the last segment asks [query, query]
(`pairs`: [query, k_i]) and the next token must be v (v_i). With `--distractors=values` every other segment is
[other-marker, u, u, ..., u] with its own random value u (interference: a memory that keeps the latest segment
keeps the wrong value); with `filler` they are random filler tokens. The needle stands G segments before the query
segment (G = 0: just before it), G uniform in 0 .. segments - 2 in training, or the gaps `--gap_curriculum`
names from each step on ('0:0,1': only the gaps at which the needle is still in a cache of 2, so that both arms
learn the recall route on the same data and evaluation asks how far each eviction rule carries it). With a cache
of N = 2 memory embeddings, FIFO holds only the last two segments' embeddings when the query segment's memory is
recalled, so for G >= 2 the needle's embedding has left the cache (the information can still travel down the
chain of memory tokens: each segment's memory token starts from what it recalled).

Both arms train the same model (2 layers, d_model 64, sensory 4, summary 8 tokens, gradients through all
segments) with the same data and seeds on the answer token's cross-entropy (plus the learned arm's eviction loss,
which trains only its scorer); only `memory.eviction` differs. Accuracy: argmax at the answer position over 512
fresh rows per G; `accuracy_older_than_cache` averages G = N .. segments - 2. Chance is 1/16.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from launch import cli
from lm2_jax.data.babi.training import parse_curriculum
from lm2_jax.model import LM2Model, init_params
from lm2_jax.model.config import ConfigError, default_model_config

_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds (model init and data).")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps per arm and seed.")
_BATCH = flags.DEFINE_integer("batch", 32, "Rows per step.")
_LR = flags.DEFINE_float("lr", 5e-3, "Adam learning rate.")
_CLIP = flags.DEFINE_float("clip_norm", 0.0, "Clip the gradient to this global norm before Adam (0: no clipping).")
_CACHE = flags.DEFINE_integer("cache_size", 2, "Cached memory embeddings N.")
_EVAL = flags.DEFINE_integer("eval_rows", 512, "Evaluation rows per gap.")
_ARMS = flags.DEFINE_list("arms", ["fifo", "learned"], "Eviction rules to train.")
_PAIRS = flags.DEFINE_integer("pairs", 1, "Key-value pairs in the needle (the query asks one of them).")
_FORMAT = flags.DEFINE_enum("format", "value", ["value", "pairs"], "Needle: one value repeated, or key-value pairs.")
_SEGMENTS = flags.DEFINE_integer("segments", 8, "Segments per row (the needle is 0 .. segments - 2 before the query).")
_DISTRACTORS = flags.DEFINE_enum("distractors", "values", ["values", "filler"],
                                 "Other segments: [other-marker, a random value repeated] (interference) or filler.")
_GAPS = flags.DEFINE_string("gap_curriculum", None,
                            "Training gaps by step, 'from_step:gap,gap,... ...' (e.g. '0:0,1 1500:0,1,2,3,4,5,6'); "
                            "default: gaps 0 .. segments - 2 throughout.")
_OUT = flags.DEFINE_string("out", "benchmarks/hmt_eviction.json", "Where the results go (JSON).")

SEG = 16
MARK, QUERY, OTHER, KEYS, VALUES, FILLER, VOCAB = 1, 2, 3, (8, 24), (24, 40), (40, 64), 64


def model_config(eviction: str):
  m = default_model_config()
  m.update(dict(vocab_size=VOCAB, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, d_ff=128, segment_len=SEG,
                bptt_segments=0))
  m.memory.update(dict(kind="hmt", sensory_tokens=4, summary_tokens=8, cache_size=_CACHE.value, eviction=eviction))
  return m


def make_batch(rng: np.random.Generator, rows: int, gaps=None):
  """-> tokens [rows, S * SEG], answer position [rows] (the query key's position), answer [rows], gap [rows]."""
  SEGMENTS, MAX_GAP = _SEGMENTS.value, _SEGMENTS.value - 2
  T = SEGMENTS * SEG
  tokens = rng.integers(*FILLER, size=(rows, T))
  if _DISTRACTORS.value == "values":
    tokens = np.repeat(rng.integers(*VALUES, size=(rows, SEGMENTS)), SEG, axis=1)
    tokens[:, ::SEG] = OTHER
  gap = rng.integers(0, MAX_GAP + 1, size=rows) if gaps is None else np.asarray(gaps)
  P = _PAIRS.value
  keys = np.stack([rng.choice(np.arange(*KEYS), P, replace=False) for _ in range(rows)])
  values = rng.integers(*VALUES, size=(rows, P))
  ask = rng.integers(0, P, size=rows)
  r = np.arange(rows)
  needle = (SEGMENTS - 2 - gap) * SEG
  tokens[r, needle] = MARK
  if _FORMAT.value == "pairs":
    for i in range(P):
      tokens[r, needle + 1 + 2 * i] = keys[:, i]
      tokens[r, needle + 2 + 2 * i] = values[:, i]
  else:  # "value": the needle is the value repeated; the query asks for it (keys unused)
    keys[r, ask] = QUERY
    tokens[r[:, None], needle[:, None] + 1 + np.arange(SEG - 1)] = values[r, ask][:, None]
  q = (SEGMENTS - 1) * SEG
  tokens[:, q] = QUERY
  tokens[:, q + 1] = keys[r, ask]
  tokens[:, q + 2] = values[r, ask]
  return tokens.astype(np.int32), np.full(rows, q + 1), values[r, ask], gap


def gap_stages():
  """--gap_curriculum as ((from_step, gaps), ...), or None (gaps uniform in 0 .. segments - 2)."""
  if _GAPS.value is None:
    return None
  try:
    stages = parse_curriculum(_GAPS.value)
  except ConfigError:
    stages = ()
  if not stages or max(max(gs) for _, gs in stages) > _SEGMENTS.value - 2:
    raise app.UsageError(f"--gap_curriculum={_GAPS.value!r}: write stages 'from_step:gap,gap,...' separated by "
                         f"spaces, the first from step 0, gaps in 0 .. segments - 2 = {_SEGMENTS.value - 2}")
  return stages


def run_arm(eviction: str, seed: int) -> dict:
  model = LM2Model(model_config(eviction))
  params = init_params(model, jax.random.key(seed))
  opt = optax.adam(_LR.value)
  if _CLIP.value > 0:
    opt = optax.chain(optax.clip_by_global_norm(_CLIP.value), opt)
  opt_state = opt.init(params)

  def answer_logits(p, tokens, pos):
    logits, _, aux = model.apply({"params": p}, tokens)
    return logits[jnp.arange(tokens.shape[0]), pos], aux

  def loss_fn(p, tokens, pos, answer):
    logits, aux = answer_logits(p, tokens, pos)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, answer).mean()
    return ce + sum(aux["losses"].values(), 0.0), (ce, aux["losses"])

  @jax.jit
  def step(p, s, tokens, pos, answer):
    (_, (ce, losses)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, tokens, pos, answer)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, ce, losses

  @jax.jit
  def evaluate(p, tokens, pos, answer):
    logits, aux = answer_logits(p, tokens, pos)
    return (logits.argmax(-1) == answer).mean(), aux["memory_stats"]

  rng = np.random.default_rng(seed)
  stages = gap_stages()
  t0, log = time.time(), []
  for i in range(_STEPS.value):
    gaps = None if stages is None else rng.choice([gs for s, gs in stages if s <= i][-1], size=_BATCH.value)
    tokens, pos, answer, _ = make_batch(rng, _BATCH.value, gaps)
    params, opt_state, ce, losses = step(params, opt_state, tokens, pos, answer)
    if i % 100 == 0 or i == _STEPS.value - 1:
      log.append((i, float(ce), {k: float(v) for k, v in losses.items()}))
      print(f"{eviction} seed {seed} step {i} ce {float(ce):.3f} {log[-1][2]} ({time.time() - t0:.0f} s)", flush=True)
  eval_rng = np.random.default_rng(1000 + seed)
  MAX_GAP = _SEGMENTS.value - 2
  acc, kept = {}, {}
  for gap in range(MAX_GAP + 1):
    tokens, pos, answer, _ = make_batch(eval_rng, _EVAL.value, gaps=[gap] * _EVAL.value)
    a, stats = evaluate(params, tokens, pos, answer)
    acc[gap] = float(a)
    # per row, the largest of the slots' ages averaged over segments; mean over rows
    kept[gap] = float(np.asarray(stats["age"]).max(-1).mean())
  old = float(np.mean([acc[g] for g in range(_CACHE.value, MAX_GAP + 1)]))
  return {"eviction": eviction, "seed": seed, "steps": _STEPS.value, "gap_curriculum": _GAPS.value,
          "clip_norm": _CLIP.value, "train_seconds": time.time() - t0,
          "accuracy_by_gap": acc, "accuracy_older_than_cache": old, "mean_oldest_age": kept, "log": log}


def main(_):
  results = []
  for seed in [int(s) for s in _SEEDS.value]:
    for eviction in _ARMS.value:
      results.append(run_arm(eviction, seed))
      r = results[-1]
      print(f"RESULT {eviction} seed {seed}: accuracy by gap {r['accuracy_by_gap']}, gaps >= cache "
            f"{r['accuracy_older_than_cache']:.3f} ({r['train_seconds']:.0f} s)", flush=True)
      with open(_OUT.value, "w") as f:
        json.dump(results, f, indent=1)
  for eviction in _ARMS.value:
    old = [r["accuracy_older_than_cache"] for r in results if r["eviction"] == eviction]
    print(f"SUMMARY {eviction}: accuracy when the needle is older than the cache, per seed {old}, "
          f"mean {np.mean(old):.3f}")


if __name__ == "__main__":
  cli.run(main)
