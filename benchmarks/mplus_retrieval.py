r"""M+ retrieval of planted memory tokens: the share of ground-truth long-term tokens the retriever retrieves.

  python -m benchmarks.mplus_retrieval [--seeds=0,1 --steps=400 --fillers=8]

Task (vocab 64, segments of 16): a fact segment (one key token and one value token, the pair repeated 8 times),
`fillers` segments of random filler tokens, then a question segment [query marker, key, value, fillers...]; the
loss is on the value only. Pool N=8, K=4 written per segment: by the question the fact's memory tokens have
mostly been dropped into the long-term store (C=64), among the filler segments' dropped tokens.

Measured as M+ measures its retriever: the share of ground-truth memory tokens retrieved. Ground truth: the store
tokens written into the pool by the fact segment (`store_age` = 1, the row's first write). For every memory layer,
the question segment's tokens each retrieve their top r=2 (`picked`, averaged over the segment's tokens); recall =
sum(picked x ground truth) / number of ground-truth tokens; chance = r / store tokens (a random pick of r).
Reported before training (random retriever) and after `steps` Adam steps (batch 16) trained on the language-model
loss only, per seed, with answer accuracy.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from lm2_jax.model import LM2Model, init_params
from lm2_jax.model.config import default_model_config

_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds (model init, data).")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps.")
_FILLERS = flags.DEFINE_integer("fillers", 8, "Filler segments between the fact and the question.")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch size.")
_EVAL = flags.DEFINE_integer("eval_rows", 128, "Rows evaluated.")
SEG, KEYS, VALUES, FILLER, MARK = 16, (2, 18), (18, 34), (34, 64), 1


def config():
  m = default_model_config()
  m.update(dict(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, d_ff=128, segment_len=SEG,
                bptt_segments=0))
  m.memory.update(dict(kind="mplus", layers="all", num_slots=8, update_tokens=4, ltm_capacity=64,
                       retrieve_tokens=2, retriever_dim=16))
  return m


def batch(rng, rows):
  """tokens [rows, (fillers + 2) * SEG], loss mask (the value in the question), value ids."""
  F = _FILLERS.value
  toks = rng.integers(*FILLER, (rows, (F + 2) * SEG))
  key, value = rng.integers(*KEYS, rows), rng.integers(*VALUES, rows)
  toks[:, :SEG:2], toks[:, 1:SEG:2] = key[:, None], value[:, None]
  q = (F + 1) * SEG
  toks[:, q], toks[:, q + 1], toks[:, q + 2] = MARK, key, value
  mask = np.zeros_like(toks, np.float32)
  mask[:, q + 2] = 1
  return jnp.asarray(toks, jnp.int32), jnp.asarray(mask), value


def run(seed):
  model = LM2Model(config())
  params = init_params(model, jax.random.key(seed))
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  def loss_fn(p, toks, mask, key):
    logits = model.apply({"params": p}, toks, rngs={"memory": key})[0]
    lp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(lp, toks[:, 1:, None], -1)[..., 0]
    return (nll * mask[:, 1:]).sum() / mask.sum()

  @jax.jit
  def step(p, opt, toks, mask, key):
    loss, g = jax.value_and_grad(loss_fn)(p, toks, mask, key)
    updates, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, updates), opt, loss

  @jax.jit
  def measure(p, toks, key):
    """-> (recall, chance, answer correct) per row, from the question segment's retrieval in every memory layer."""
    q = (_FILLERS.value + 1) * SEG
    _, memory, _ = model.apply({"params": p}, toks[:, :q], rngs={"memory": key})
    logits, _, aux = model.apply({"params": p}, toks[:, q:], memory, rngs={"memory": key})
    truth = (memory["store_age"] == 1) & (memory["store_filled"] > 0)  # [layers, B, C]
    picked = aux["memory_stats"]["picked"]
    recall = (picked * truth).sum(-1) / jnp.maximum(truth.sum(-1), 1)
    chance = jnp.minimum(2.0 / jnp.maximum(memory["store_filled"].sum(-1), 1), 1.0)
    correct = jnp.argmax(logits[:, 1], -1) == toks[:, q + 2]
    return recall.mean(0), chance.mean(0), correct, truth.sum(-1).mean(0)

  rng = np.random.default_rng(1000 + seed)
  eval_toks, _, _ = batch(np.random.default_rng(99), _EVAL.value)

  def report(p, steps, seconds):
    recall, chance, correct, n_truth = jax.tree.map(np.asarray, measure(p, eval_toks, jax.random.key(7)))
    return {"seed": seed, "steps": steps, "recall_of_planted_tokens": round(float(recall.mean()), 3),
            "chance": round(float(chance.mean()), 3), "planted_tokens_in_store": round(float(n_truth.mean()), 2),
            "answer_accuracy": round(float(correct.mean()), 3), "train_seconds": round(seconds, 1)}

  rows = [report(params, 0, 0.0)]
  print(json.dumps(rows[-1]), flush=True)
  t = time.time()
  for i in range(_STEPS.value):
    toks, mask, _ = batch(rng, _BATCH.value)
    params, opt, loss = step(params, opt, toks, mask, jax.random.fold_in(jax.random.key(seed), i))
    if (i + 1) % 100 == 0:
      print(json.dumps({"seed": seed, "step": i + 1, "loss": round(float(loss), 3)}), flush=True)
  rows.append(report(params, _STEPS.value, time.time() - t))
  print(json.dumps(rows[-1]), flush=True)
  return rows


def main(_):
  for seed in map(int, _SEEDS.value):
    run(seed)


if __name__ == "__main__":
  app.run(main)
