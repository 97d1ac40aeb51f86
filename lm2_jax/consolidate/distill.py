"""The sleep phase: distil what episodic memory holds into the parameters, then free it (DESIGN section 5).

    result = consolidate(model_config, params, tokenizer, tokens, base_offset, base_memory, history, memory,
                         general=token_ids, config=default_config())
    result.params, result.memory, result.report

1. Rank (lm2_jax.consolidate.episodic): the memory's units by read mass, the top `slots` fraction of them
   chosen; the segments behind them ranked by score, taken most-read first up to `max_tokens` tokens; plus the
   session's logged questions (prompt and answer) when `questions`.
2. Replay set: every chosen segment and question is a row; every position of it is a prompt.
3. Teacher: the model with the given parameters theta_0 and the memory; student: parameters theta from theta_0,
   with a fresh memory. On the replay rows x (mask m over real positions) and general-text rows g,
       loss(theta) = sum_t m_t KL(p(. | x_<=t; theta_0, memory) || p(. | x_<=t; theta, fresh)) / sum_t m_t
                     + general_weight * NLL(g; theta, fresh)
   (the general term keeps what the parameters knew: `general` is a token stream the caller names, default the
   built-in prose of lm2_jax.data.babi.prose through the session's tokenizer; with general_loss 'kl' it is
   KL(p(. | g; theta_a, fresh) || p(. | g; theta, fresh)) instead of the NLL: the model's own predictions kept,
   for a model whose training loss did not cover every token). Adam, `steps` steps, all replay rows and
   `general_rows` random windows of `general_len` tokens of the general stream's first 80% per step. Trained: all
   parameters (`rank` 0) or low-rank adapters of the kernels of `targets` in `layers`
   (lm2_jax.consolidate.adapters), merged.
   Four options beyond the issue's recipe, all off by default (their effect: README, "Retention benchmark"):
   - `interference` k > 0: "fresh" above becomes a fresh memory into which k random segments of general text were
     written first (new windows each step), so the student learns to answer from theta while its memory holds
     unrelated text, as it will after the sleep;
   - `rehearse` n > 0: the segments earlier sleeps replayed (their spans in the history), newest first within n
     tokens, are replayed too, with teacher p(. | r; theta_0, fresh): what theta_0 answers for them from its
     parameters is kept, so later sleeps do not overwrite it;
   - `weighting` 'confidence': every KL term (replay, general, rehearsal) weights position t by the teacher's top
     probability w_t = max_v p_teacher(v | x_<=t), as sum_t m_t w_t KL_t / sum_t m_t w_t: the positions where the
     teacher knows the next token (recall from its memory among them) outweigh those it can only guess;
   - `general_anchor` 'first': theta_a, the teacher of a 'kl' general term, is the parameters the session had
     before its first sleep instead of theta_0, so that drift does not add up over sleeps.
4. Reset: the chosen units whose content the replayed segments wrote for at least `min_coverage` of it are set
   to their fresh values (kinds without slots: the whole memory).

The report gives what was consolidated, the KL on the replay set before (theta_0) and after (theta), the general
loss on held-out windows (the stream's last 20%) before and after, steps and seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lm2_jax.consolidate import adapters as adapters_lib
from lm2_jax.consolidate.episodic import Holdings, holdings, reset_units
from lm2_jax.model import LM2Model, ModelConfig, init_params
from lm2_jax.model.config import ConfigError, check
from lm2_jax.train.loss import next_token_loss

GENERAL_SEED, GENERAL_WORDS = 10_000, 12_000  # the default general text: built-in prose, seeds not used elsewhere


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.slots = 1.0            # fraction (0, 1] of the read units consolidated, most read first
  c.max_tokens = 2048      # replay budget: tokens of segments replayed, most-read first (questions come on top)
  c.min_coverage = 0.5     # a chosen slot is reset when the replayed segments wrote at least this share of it
  c.questions = True       # replay the logged questions with the session's answers
  c.steps = 60
  c.learning_rate = 1e-3
  c.general_weight = 1.0
  c.general_loss = "nll"   # the general-text term: 'nll' (next-token loss) or 'kl' (KL from the model before the
                           # sleep, both with a fresh memory: keeps its predictions where it was never trained)
  c.weighting = "uniform"  # the positions of every KL term: 'uniform' or 'confidence' (by the teacher's top
                           # probability: what it knows outweighs what it guesses)
  c.general_anchor = "sleep"  # the teacher of a KL general term: the params before this sleep ('sleep') or before
                              # the session's first sleep ('first')
  c.general_rows = 8       # general-text windows per step
  c.general_len = 0        # tokens per window (0: two segments)
  c.interference = 0       # segments of general text written into the student's memory before each replayed row
                           # (0: a fresh memory): the student learns to answer while the memory holds other text
  c.rehearse = 0           # tokens of segments replayed by earlier sleeps, replayed again (newest first) against
                           # the model before this sleep: later sleeps keep what earlier ones consolidated
  c.rank = 0               # 0: full fine-tuning; > 0: low-rank adapters of this rank
  c.alpha = 0.0            # adapter scale alpha / rank (0: alpha = rank)
  c.layers = "all"         # adapters: decoder layers ('all' or indices)
  c.targets = "attn,mlp"   # adapters: modules whose kernels are adapted
  c.seed = 0
  return c


def with_overrides(config: ml_collections.ConfigDict | None, **overrides) -> ml_collections.ConfigDict:
  """default_config() (or `config`) with fields set from keywords; refuses unknown names and bad values."""
  c = default_config() if config is None else ml_collections.ConfigDict(config.to_dict())
  for k, v in overrides.items():
    check(k in c, f"consolidate.{k}", v, f"not a consolidation field; use one of {sorted(c.keys())}")
    c[k] = v
  check(0 < c.slots <= 1, "consolidate.slots", c.slots, "must be in (0, 1]: the fraction of read units consolidated")
  for name in ("max_tokens", "steps", "general_rows"):
    check(isinstance(c[name], int) and c[name] > 0, f"consolidate.{name}", c[name], "must be a positive integer")
  check(0 <= c.min_coverage <= 1, "consolidate.min_coverage", c.min_coverage, "must be in [0, 1]")
  for name in ("interference", "rehearse", "general_len"):
    check(isinstance(c[name], int) and c[name] >= 0, f"consolidate.{name}", c[name], "must be an integer >= 0")
  check(isinstance(c.rank, int) and c.rank >= 0, "consolidate.rank", c.rank, "must be >= 0 (0: full fine-tuning)")
  check(c.learning_rate > 0, "consolidate.learning_rate", c.learning_rate, "must be > 0")
  check(c.general_weight >= 0, "consolidate.general_weight", c.general_weight, "must be >= 0")
  check(c.general_loss in ("nll", "kl"), "consolidate.general_loss", c.general_loss, "use 'nll' or 'kl'")
  check(c.weighting in ("uniform", "confidence"), "consolidate.weighting", c.weighting,
        "use 'uniform' or 'confidence' (positions weighted by the teacher's top probability)")
  check(c.general_anchor in ("sleep", "first"), "consolidate.general_anchor", c.general_anchor,
        "use 'sleep' (the params before this sleep) or 'first' (before the session's first sleep)")
  return c


class NothingToConsolidate(ValueError):
  """The session holds nothing in episodic memory (no segment completed since its base)."""


@dataclasses.dataclass
class Result:
  params: Any
  memory: Any
  report: dict
  holdings: Holdings


def default_general(tokenizer) -> np.ndarray:
  """The built-in prose through `tokenizer`, as one token stream; refused for a model trained on token ids."""
  from lm2_jax.data.babi.prose import generate_prose  # pylint: disable=import-outside-toplevel
  from lm2_jax.data.id_tokenizer import IdTokenizer  # pylint: disable=import-outside-toplevel
  if isinstance(tokenizer, IdTokenizer):
    raise ConfigError("general: this model reads token ids, so the built-in prose cannot be its general text; give "
                      "a general token stream (Session.sleep(general=ids), launch.consolidate --general=FILE of ids)")
  return np.asarray(tokenizer.encode(generate_prose(GENERAL_SEED, GENERAL_WORDS)), np.int32)


def _tile(model: LM2Model, memory, n: int):
  """A batch-1 memory repeated to batch n."""
  axes = model.memory_axes()
  return jax.tree.map(lambda x, ax: jnp.repeat(x, n, axis=ax.index("batch")), memory, axes,
                      is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x))


def _rows(items: list[list[int]], S: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Token rows and their mask, padded to a power of two of segments and of rows (empty rows: mask 0); longer
  items keep their last max_len tokens."""
  items = [it[-max_len:] for it in items]
  T = -(-max(len(it) for it in items) // S) * S
  T = S * (1 << (T // S - 1).bit_length())  # powers of two of rows and segments: few compilations
  R = 1 << (len(items) - 1).bit_length()
  toks, mask = np.zeros((R, T), np.int32), np.zeros((R, T), bool)
  for i, it in enumerate(items):
    toks[i, :len(it)], mask[i, :len(it)] = it, True
  return toks, mask


def _windows(stream: np.ndarray, length: int, n: int, rng) -> np.ndarray:
  starts = rng.integers(0, len(stream) - length + 1, n)
  return np.stack([stream[s:s + length] for s in starts])


class _Functions:
  """The compiled functions of one model config and training setup (shared across sleeps: `_functions`)."""

  def __init__(self, cfg: ModelConfig, rank: int, alpha: float, learning_rate: float, general_weight: float,
               layers, targets: str, general_mode: str = "nll", weighting: str = "uniform"):
    model = LM2Model(cfg)
    self.chosen = {}
    if rank:
      shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
      self.chosen = adapters_lib.targets_of(shapes, cfg.num_layers, layers, targets)
    self.tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))

    def effective(params, trainable):
      return adapters_lib.merge(params, trainable, self.chosen, rank, alpha) if rank else trainable

    def student(p, toks, prefix):
      """log p(. | toks; p) from a fresh memory, into which `prefix` [R, P] (or None) was written first."""
      P = 0 if prefix is None else prefix.shape[1]
      full = toks if prefix is None else jnp.concatenate([prefix, toks], axis=1)
      return jax.nn.log_softmax(model.apply({"params": p}, full, model.init_memory(toks.shape[0]))[0][:, P:])

    def kl(p, teacher_logp, toks, mask, prefix=None, weighted=False):
      per_pos = jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student(p, toks, prefix)), axis=-1)
      if weighted and weighting == "confidence":
        mask = mask * jnp.exp(teacher_logp.max(-1))
      return jnp.sum(per_pos * mask) / jnp.maximum(mask.sum(), 1e-6)

    def general_loss(p, rows):
      return next_token_loss(model.apply({"params": p}, rows, model.init_memory(rows.shape[0]))[0], rows)[0]

    def general_term(p, anchor, rows):
      if general_mode == "nll":
        return general_loss(p, rows)
      before = jax.lax.stop_gradient(self.teacher(anchor, rows, model.init_memory(rows.shape[0])))
      return kl(p, before, rows, jnp.ones(rows.shape, jnp.float32), weighted=True)

    def step(trainable, opt, params, anchor, teacher_logp, toks, mask, g_rows, prefix, rehearsed):
      def loss_fn(t):
        p = effective(params, t)
        loss = (kl(p, teacher_logp, toks, mask, prefix, weighted=True)
                + general_weight * general_term(p, anchor, g_rows))
        if rehearsed is not None:  # earlier sleeps' segments: keep what theta_0 predicts for them from the params
          r_toks, r_mask, r_prefix, r_teacher = rehearsed
          if r_teacher is None:  # a new prefix each step: theta_0's predictions from that memory, here
            r_teacher = jax.lax.stop_gradient(student(params, r_toks, r_prefix))
          loss += kl(p, r_teacher, r_toks, r_mask, r_prefix, weighted=True)
        return loss
      loss, grads = jax.value_and_grad(loss_fn)(trainable)
      updates, opt = self.tx.update(grads, opt, trainable)
      return optax.apply_updates(trainable, updates), opt, loss

    self.effective = jax.jit(effective)
    self.teacher = jax.jit(lambda p, t, m: jax.nn.log_softmax(model.apply({"params": p}, t, m)[0]))
    self.evaluate = jax.jit(lambda p, lp, t, m, g: (kl(p, lp, t, m), general_loss(p, g)))
    self.step = jax.jit(step)


@functools.lru_cache(maxsize=8)
def _functions(*key) -> _Functions:
  return _Functions(*key)


def rehearsal(tokens: list[int], history: list[dict], budget: int) -> list[list[int]]:
  """The segments earlier sleeps replayed (the spans their history entries logged), newest first within `budget`
  tokens, returned in stream order."""
  spans = [span for e in history if e["kind"] == "sleep" for span in e["report"]["segments"]["spans"]]
  out, used = [], 0
  for a, b in reversed(spans):
    if used + b - a > budget:
      break
    out.append(tokens[a:b])
    used += b - a
  return out[::-1]


def choose(h: Holdings, c) -> tuple[list, list[int], list]:
  """-> (chosen units, indices of the replayed segments in stream order, units to reset)."""
  read = [u for u in h.units if u.read_mass > 0]
  chosen = read[:max(1, int(np.ceil(c.slots * len(read))))] if read else []
  score = sum((u.read_mass * u.shares for u in chosen), np.zeros(len(h.segments)))
  S = len(h.segments[0]["tokens"])
  order = [int(s) for s in np.argsort(-score, kind="stable") if score[s] > 0][:max(1, c.max_tokens // S)]
  replayed = sorted(order)
  reset = [u for u in chosen if u.shares[replayed].sum() >= c.min_coverage] if replayed else []
  return chosen, replayed, reset


def consolidate(model_config, params, tokenizer, tokens: list[int], base_offset: int, base_memory,
                history: list[dict], memory, general: np.ndarray | None = None, config=None,
                first_params=None) -> Result:
  """The sleep phase on one session's stream (module docstring). `first_params`: the parameters before the
  session's first sleep (general_anchor 'first'; default `params`). Raises NothingToConsolidate when no segment
  was written into memory since `base_offset`."""
  start_time = time.perf_counter()
  c = with_overrides(config)
  cfg = ModelConfig.from_config(model_config)
  model = LM2Model(cfg)
  if cfg.memory.kind == "none":
    raise NothingToConsolidate("memory kind 'none' has no episodic memory: nothing to consolidate")
  h = holdings(model, params, tokenizer, tokens, base_offset, base_memory, history, memory)
  if h.empty:
    raise NothingToConsolidate(
        f"the session's memory holds nothing: no segment of {cfg.segment_len} tokens was completed since token "
        f"{base_offset} ({len(tokens) - base_offset} tokens since, pending in the context)")
  chosen, replayed, reset = choose(h, c)
  S = cfg.segment_len
  items = [h.segments[i]["tokens"] for i in replayed]
  if c.questions:
    items += [q["tokens"] for q in h.questions]
  toks_R, mask_R = _rows(items, S, 4 * S)
  general = default_general(tokenizer) if general is None else np.asarray(general, np.int32).reshape(-1)
  g_len = c.general_len or 2 * S
  cut = int(len(general) * 0.8)
  check(cut - g_len >= 0 and len(general) - cut >= g_len, "general", f"{len(general)} tokens",
        f"too short: needs at least {int(np.ceil(g_len / 0.2))} tokens (windows of {g_len} in its first 80% and "
        "its last 20%)")
  rng = np.random.default_rng(c.seed)
  held_out = _windows(general[cut:], g_len, max(c.general_rows, 8), np.random.default_rng(c.seed + 1))

  fn = _functions(cfg, c.rank, c.alpha or float(max(c.rank, 1)), c.learning_rate, c.general_weight,
                  c.layers if isinstance(c.layers, (str, int)) else tuple(c.layers), c.targets, c.general_loss,
                  c.weighting)
  teacher_logp = fn.teacher(params, toks_R, _tile(model, memory, len(toks_R)))
  kl_before, general_before = (float(x) for x in fn.evaluate(params, teacher_logp, toks_R, mask_R, held_out))
  rehearsed = rehearsal(tokens, history, c.rehearse)
  rehearsed_rows = _rows(rehearsed, S, 4 * S) if rehearsed else None
  r_teacher = (None if rehearsed_rows is None or c.interference else  # fixed without interference: computed once
               fn.teacher(params, rehearsed_rows[0], model.init_memory(len(rehearsed_rows[0]))))

  def prefix(n):  # interference: n rows of general text for the student's memory, new each step
    return _windows(general[:cut], c.interference * S, n, rng) if c.interference else None

  anchor = params if c.general_anchor == "sleep" or first_params is None else first_params
  trainable = params if not c.rank else adapters_lib.init(params, fn.chosen, c.rank, jax.random.key(c.seed))
  opt = fn.tx.init(trainable)
  for _ in range(c.steps):
    trainable, opt, _ = fn.step(trainable, opt, params, anchor, teacher_logp, toks_R, mask_R,
                                _windows(general[:cut], g_len, c.general_rows, rng), prefix(len(toks_R)),
                                None if rehearsed_rows is None else
                                (*rehearsed_rows, prefix(len(rehearsed_rows[0])), r_teacher))
  new_params = jax.device_get(fn.effective(params, trainable))
  kl_after, general_after = (float(x) for x in fn.evaluate(new_params, teacher_logp, toks_R, mask_R, held_out))
  new_memory = reset_units(model, memory, h.slot_arrays, reset)

  report = {
      "kind": cfg.memory.kind,
      "units": {"read": sum(u.read_mass > 0 for u in h.units), "chosen": len(chosen), "reset": len(reset),
                "reset_units": [{"array": u.array, "index": list(u.index), "read_mass": round(u.read_mass, 6)}
                                for u in reset]},
      "top_units": h.describe(),
      "segments": {"in_memory": len(h.segments), "replayed": len(replayed),
                   "spans": [[h.segments[i]["start"], h.segments[i]["end"]] for i in replayed]},
      "questions_replayed": len(h.questions) if c.questions else 0,
      "rehearsed_tokens": int(sum(map(len, rehearsed))),
      "replay_tokens": int(mask_R.sum()),
      "kl_before": kl_before, "kl_after": kl_after,
      "general_loss_before": general_before, "general_loss_after": general_after,
      "general_tokens": int(len(general)),
      "training": ("full fine-tuning" if not c.rank else
                   f"low-rank adapters (rank {c.rank}) on {len(fn.chosen)} kernels of layers {c.layers!r}"),
      "steps": c.steps, "seconds": round(time.perf_counter() - start_time, 3),
      "config": c.to_dict(),
  }
  return Result(new_params, new_memory, report, h)
