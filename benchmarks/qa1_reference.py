r"""Is bare bAbI qa1 learnable at our scale? A reference decoder written apart from lm2_jax.model, on the same data.

  python -m benchmarks.qa1_reference [--steps=12000] [--d_model=64] [--layers=4] [--heads=4] [--batch=32]
                                     [--learning_rate=1e-3] [--eval_every=500] [--seed=0]
                                     [--curriculum_steps=K --max_sentences=N --not_latest] [--alibi]
                                     [--story_loss] [--workers=N]

Every LM2-family model we trained on qa1 without distractors (the 0K stage of the BABILong curriculum) stalls
at 38-51% (README, "Retention"): it answers the latest place anyone went to, not the latest place of the person
asked about. This script asks whether the stall is ours or the task's at this scale. The model shares no code
with lm2_jax.model: a plain GPT-2-style decoder in a few lines of jax.numpy (learned absolute positions,
pre-LayerNorm, GELU MLP of width 4 d_model, tied embeddings), one sample per row (96 tokens, right-padded),
AdamW (weight decay 0.01) with `warmup_steps` of warmup and cosine decay. Data:
lm2_jax.data.babi.training.BabilongSource('qa1', curriculum '0:0'), loss on the answer, its '.' and eos (as
the trainer's `loss_mask`).

Printed once: the share of the 500 test-split samples whose answer is the latest place in the story (what a
model that ignores the name scores). Then every `eval_every` steps: the training loss of the last batch, the
accuracy of the answer's first token on those samples, teacher-forced (argmax after " Answer:"), and how often
the model's answer is the latest place.

A curriculum for the first `curriculum_steps` steps, then the plain distribution:
  --max_sentences=N   train only on stories of at most N sentences;
  --not_latest        train only on samples whose answer is not the latest place in the story, where a model that
                      ignores the name is always wrong.

--story_loss puts the loss on every token after bos (the story and question too), not on the answer only: more
signal per sample, as a language model's pretraining gives. The accuracy printed is still the answer's.
--workers=N draws the training samples in N processes (a GPU host outruns one Python process generating them).
"""

import multiprocessing
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from launch import cli
from lm2_jax.data.babi.training import BabilongSource, ensure_tokenizer, parse_curriculum

_STEPS = flags.DEFINE_integer("steps", 12000, "Training steps.")
_D = flags.DEFINE_integer("d_model", 64, "Width.")
_LAYERS = flags.DEFINE_integer("layers", 4, "Decoder layers.")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads.")
_BATCH = flags.DEFINE_integer("batch", 32, "Samples per step.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate (warmup, then cosine decay to 0).")
_WARMUP = flags.DEFINE_integer("warmup_steps", 100, "Linear warmup steps (at most steps - 1).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 500, "Steps between evaluations.")
_CURRICULUM = flags.DEFINE_integer("curriculum_steps", 0, "Steps of the curriculum (see the docstring).")
_MAX_SENTENCES = flags.DEFINE_integer("max_sentences", 10, "Curriculum: at most this many story sentences.")
_NOT_LATEST = flags.DEFINE_bool("not_latest", False, "Curriculum: only answers that are not the latest place.")
_SEED = flags.DEFINE_integer("seed", 0, "Data and initialisation seed.")
_ALIBI = flags.DEFINE_bool("alibi", False, "Add ALiBi's recency bias to the attention scores: -slope_h * (q - k), "
                           "slopes 2^(-8 h / heads) for h = 1..heads (Press et al., 2022).")
_STORY_LOSS = flags.DEFINE_bool("story_loss", False, "Loss on every token after bos, not on the answer only.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Processes drawing training samples (0: this one).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "workdir/babilong/spm.model", "The BABILong configs' tokenizer.")

ROW = 96  # a bare qa1 sample has at most 94 tokens: bos, 10 sentences of at most 8, question, cue, answer, eos


def _latest_place(tokens, period, question_mark):
  """The token before the story's last '.' (each qa1 sentence ends '... the <place>.')."""
  q = int(np.argmax(tokens == question_mark))
  return tokens[np.where(tokens[:q] == period)[0][-1] - 1]


def _source(tok, split, seed):
  return BabilongSource(tok, tasks=("qa1",), curriculum=parse_curriculum("0:0"), seed=seed, split=split)


_WORKER_SOURCE = None


def _init_worker(tokenizer, seed):
  global _WORKER_SOURCE
  _WORKER_SOURCE = _source(ensure_tokenizer(tokenizer, 768), "train", seed)


def _draw(index):
  return _WORKER_SOURCE[index]


class Batches:
  """Rows of qa1 samples, drawn in order from `source`, optionally filtered (the curriculum switches). With a
  process `pool` (whose workers hold the same source, `_init_worker`), samples are drawn ahead in chunks."""

  def __init__(self, source: BabilongSource, period: int, question_mark: int, pool=None, chunk=8192):
    self.source, self.period, self.question_mark, self.next = source, period, question_mark, 0
    self.pool, self.chunk, self.ahead, self.ahead_from = pool, chunk, [], 0

  def _doc(self, index):
    if self.pool is None:
      return self.source[index]
    if not self.ahead_from <= index < self.ahead_from + len(self.ahead):
      self.ahead_from = index
      self.ahead = self.pool.map(_draw, range(index, index + self.chunk), chunksize=256)
    return self.ahead[index - self.ahead_from]

  def _keep(self, doc, max_sentences, not_latest):
    t = doc["tokens"]
    if int((t == self.period).sum()) - 1 > max_sentences:  # the answer's '.' is not a sentence
      return False
    answer = t[int(np.argmax(doc["loss_mask"]))]
    return not (not_latest and _latest_place(t, self.period, self.question_mark) == answer)

  def take(self, n, max_sentences=10**9, not_latest=False):
    x_BT, mask_BT = np.zeros((n, ROW), np.int32), np.zeros((n, ROW), bool)
    for b in range(n):
      while True:
        doc = self._doc(self.next)
        self.next += 1
        if self._keep(doc, max_sentences, not_latest):
          break
      L = len(doc["tokens"])
      if L > ROW:
        raise ValueError(f"a qa1 sample of {L} tokens does not fit ROW={ROW}")
      x_BT[b, :L], mask_BT[b, :L] = doc["tokens"], doc["loss_mask"]
    return x_BT, mask_BT


def init_params(key, vocab, d, layers):
  keys = iter(jax.random.split(key, 4 + 4 * layers))
  normal = lambda *shape: 0.02 * jax.random.normal(next(keys), shape)
  block = lambda: {"qkv": normal(d, 3 * d), "out": normal(d, d), "up": normal(d, 4 * d), "down": normal(4 * d, d),
                   "norm1": jnp.ones(d), "norm2": jnp.ones(d)}
  return {"embed": normal(vocab, d), "pos": normal(ROW, d), "blocks": [block() for _ in range(layers)],
          "norm": jnp.ones(d)}


def _layer_norm(x, g):
  x = x - x.mean(-1, keepdims=True)
  return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g


def forward(params, x_BT, heads, alibi=False):
  """-> logits [B, T, vocab]."""
  h_BTD = params["embed"][x_BT] + params["pos"]
  B, T, D = h_BTD.shape
  causal_TT = jnp.tril(jnp.ones((T, T), bool))
  slopes_H = 2.0 ** (-8.0 * np.arange(1, heads + 1) / heads) if alibi else np.zeros(heads)
  bias_HTT = -slopes_H[:, None, None] * (np.arange(T)[:, None] - np.arange(T)[None, :])
  for p in params["blocks"]:
    q, k, v = (a.reshape(B, T, heads, D // heads) for a in jnp.split(_layer_norm(h_BTD, p["norm1"]) @ p["qkv"], 3, -1))
    scores = jnp.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(D // heads) + bias_HTT
    att = jax.nn.softmax(jnp.where(causal_TT, scores, -1e9), axis=-1)
    h_BTD = h_BTD + jnp.einsum("bhqk,bkhe->bqhe", att, v).reshape(B, T, D) @ p["out"]
    h_BTD = h_BTD + jax.nn.gelu(_layer_norm(h_BTD, p["norm2"]) @ p["up"]) @ p["down"]
  return _layer_norm(h_BTD, params["norm"]) @ params["embed"].T


def main(argv):
  del argv
  tok = ensure_tokenizer(_TOKENIZER.value, 768)
  period, question_mark = tok.encode(".")[-1], tok.encode("?")[-1]
  pool = None
  if _WORKERS.value:
    pool = multiprocessing.get_context("spawn").Pool(_WORKERS.value, _init_worker, (_TOKENIZER.value, _SEED.value))
  train = Batches(_source(tok, "train", _SEED.value), period, question_mark, pool)
  x_test, mask_test = Batches(_source(tok, "test", _SEED.value), period, question_mark).take(500)
  first_test = mask_test.argmax(1)  # the answer's first token
  answer_test = x_test[np.arange(500), first_test]
  latest_test = np.array([_latest_place(x, period, question_mark) for x in x_test])
  heads = _HEADS.value

  def loss_fn(params, x_BT, mask_BT):
    ce = optax.softmax_cross_entropy_with_integer_labels(forward(params, x_BT, heads, _ALIBI.value)[:, :-1], x_BT[:, 1:])
    if _STORY_LOSS.value:  # every real token after bos: up to and including eos, the last of the loss mask
      last_B = mask_BT.shape[1] - 1 - jnp.argmax(mask_BT[:, ::-1], axis=1)
      mask_BT = jnp.arange(mask_BT.shape[1])[None] <= last_B[:, None]
    return (ce * mask_BT[:, 1:]).sum() / mask_BT[:, 1:].sum()

  schedule = optax.warmup_cosine_decay_schedule(0.0, _LR.value, min(_WARMUP.value, _STEPS.value - 1), _STEPS.value)
  tx = optax.adamw(schedule, weight_decay=0.01)
  params = init_params(jax.random.PRNGKey(_SEED.value), tok.vocab_size, _D.value, _LAYERS.value)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x_BT, mask_BT):
    loss, grads = jax.value_and_grad(loss_fn)(params, x_BT, mask_BT)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def predict(params, x_BT, first_B):
    return jnp.take_along_axis(forward(params, x_BT, heads, _ALIBI.value).argmax(-1), first_B[:, None] - 1, 1)[:, 0]

  n_params = sum(a.size for a in jax.tree.leaves(params))
  print(f"reference GPT: {n_params:,} parameters, d_model {_D.value}, {_LAYERS.value} layers, {heads} heads; "
        f"test answers that are the latest place: {np.mean(latest_test == answer_test):.3f}", flush=True)
  t0 = time.perf_counter()
  for i in range(_STEPS.value):
    early = i < _CURRICULUM.value
    x, m = train.take(_BATCH.value, _MAX_SENTENCES.value if early else 10**9, early and _NOT_LATEST.value)
    params, opt_state, loss = step(params, opt_state, x, m)
    if (i + 1) % _EVAL_EVERY.value == 0 or i + 1 == _STEPS.value:
      pred = np.asarray(predict(params, x_test, first_test))
      print(f"step {i + 1}: loss {float(loss):.3f}, test accuracy {np.mean(pred == answer_test):.3f}, "
            f"answers the latest place {np.mean(pred == latest_test):.3f} ({time.perf_counter() - t0:.0f} s, "
            f"{train.next:,} samples drawn)", flush=True)
  if pool is not None:
    pool.close()


if __name__ == "__main__":
  cli.run(main)
