r"""The retention benchmark of the sleep phase (issue 12): facts injected, then distractor contexts, then asked.

  python -m benchmarks.retention --mode=train --kind=lm2 --out=DIR [--steps=1200 --seed=0]    # ~5-15 min on 2 cores
  python -m benchmarks.retention --mode=run --model=DIR --out=DIR2 [--seeds=0,1,2 --trials=4 --sleep_every=4]
  python -m benchmarks.retention --mode=replay_kl --model=DIR [--seed=0]    # where a sleep's replay KL sits

The task (token ids, `FactTask`): a fact is the triple `Q k v` ("the key of k is v"); asking is `Q k` with the
answer `v` the next token. Keys and values are drawn at random per trial, so a trial's facts are new to the
parameters (chance: 1 / num_values). The model is trained (`train`) on streams of segments, each with 1-4 facts
among filler tokens; a fact's key may come back in a later segment with the same value (a question), and the
loss is on every value token: the first time a key appears its value is a guess, after that it is recall through
the memory (a segment sees only its own tokens and the memory).

A trial (`run`): inject one segment holding K facts; then N distractor segments (each with facts on other keys,
so they fill the memory); then ask each of the K facts (greedy next token, on a copy of the state: asking does
not change the session). N runs over 0, 1, 2, 4, ..., 64 along one stream. Arms:

  memory       episodic memory alone (no sleep)
  sleep        `Session.sleep()` after every S contexts (the fact segment counts as one)
  sleep_reset  the sleep arm's parameters with the memory reset to empty: answers from the parameters alone

Each trial starts from the trained parameters. Held-out general-text loss: the task's next-token loss on the
value tokens of held-out training-distribution streams over the general keys (FactTask.general_keys; the trial's
facts and distractors use the others), before and after all the sleeps of a trial, in all and split into recall
(the key came earlier in the stream) and first appearances (a guess); the consolidation's own general-text term
draws other streams of the same kind. Writes retention.json, retention.png (accuracy against N, one line per arm)
and prints a table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
from absl import flags

from launch import cli

PAD, Q = 0, 1


@dataclasses.dataclass(frozen=True)
class FactTask:
  """Vocabulary: 0 pad, 1 Q, keys, values, filler. Segments of `segment_len` tokens hold facts at triple-aligned
  positions (0, 3, 6, ...) among filler. Training draws every key; in the trials the first `general_keys` keys
  are the general text's (the held-out streams and the sleeps' general term) and the others the facts' and
  distractors': general text that asks a key a trial consolidated, with another value, would count knowing the
  fact as forgetting."""
  segment_len: int = 16
  num_keys: int = 48
  general_keys: int = 24
  num_values: int = 32
  num_filler: int = 32

  @property
  def vocab_size(self) -> int:
    return 2 + self.num_keys + self.num_values + self.num_filler

  def key(self, i):
    return 2 + i

  def value(self, i):
    return 2 + self.num_keys + i

  def filler(self, rng, n):
    return 2 + self.num_keys + self.num_values + rng.integers(0, self.num_filler, n)

  def segment(self, rng, facts):
    """One segment [segment_len] with the facts [(key id, value id)] at random triple positions, and the mask of
    their value positions."""
    seg = self.filler(rng, self.segment_len)
    mask = np.zeros(self.segment_len, bool)
    places = np.sort(rng.choice(self.segment_len // 3, len(facts), replace=False)) * 3
    for p, (k, v) in zip(places, facts):
      seg[p:p + 3] = (Q, self.key(k), self.value(v))
      mask[p + 2] = True
    return seg, mask

  def training_stream(self, rng, num_segments, keys=None):
    """(tokens, loss mask) of one training stream over `keys` (default all; at least 4 per segment): 1-4 facts
    per segment, each a new key or (p 0.6, when there is one) the key of an earlier segment again with its value:
    recall through the memory, never within the segment's own attention window."""
    values = rng.integers(0, self.num_values, self.num_keys)
    keys = np.arange(self.num_keys) if keys is None else np.asarray(keys)
    seen, fresh = [], list(keys[rng.permutation(len(keys))])
    toks, masks = [], []
    for _ in range(num_segments):
      facts, used = [], set()
      for _ in range(rng.integers(1, 5)):
        old = [k for k in seen if k not in used]
        k = old[rng.integers(len(old))] if old and rng.random() < 0.6 else fresh.pop()
        used.add(k)
        facts.append((k, values[k]))
      seen += [k for k, _ in facts if k not in seen]
      t, m = self.segment(rng, facts)
      toks.append(t)
      masks.append(m)
    return np.concatenate(toks).astype(np.int32), np.concatenate(masks)

  @staticmethod
  def recall_mask(toks: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The value positions of `mask` whose key came earlier in its row: recall, where a first appearance is a
    guess (its loss is log num_values at best)."""
    recall = np.zeros_like(mask)
    for b, t in zip(*np.nonzero(mask)):
      recall[b, t] = toks[b, t - 1] in toks[b, np.nonzero(mask[b, :t])[0] - 1]
    return recall

  def general_stream(self, rng, num_segments):
    """A training stream over the general keys only: the general text of the trials."""
    return self.training_stream(rng, num_segments, range(self.general_keys))

  def batch(self, rng, batch_size, num_segments):
    pairs = [self.training_stream(rng, num_segments) for _ in range(batch_size)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def model_config(kind: str, task: FactTask):
  from configs import defaults  # pylint: disable=import-outside-toplevel
  config = defaults.get_config()
  m = config.model
  m.update(dict(vocab_size=task.vocab_size, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, d_ff=128,
                segment_len=task.segment_len, bptt_segments=0))
  m.memory.kind = kind
  m.memory.num_heads = 4
  m.memory.num_slots = 16 if kind != "rmt" else 8
  m.memory.update(dict(general_slots=4, num_banks=8, bank_slots=4, top_k=2, write_tokens=2))  # hierarchical
  m.memory.update(dict(sensory_tokens=4, summary_tokens=4))  # hmt: they are tokens of one 16-token segment
  config.data.kind = "recall"  # token ids: the export's tokenizer is an IdTokenizer over the vocabulary
  return config


def train(kind: str, out: str, steps: int, seed: int, batch_size: int = 32, num_segments: int = 4) -> None:
  """Trains the benchmark's model and writes an export directory (launch.export's format) to `out`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from lm2_jax.data.id_tokenizer import IdTokenizer  # pylint: disable=import-outside-toplevel
  from lm2_jax.model import LM2Model, init_params  # pylint: disable=import-outside-toplevel
  from lm2_jax.sessions.export import export  # pylint: disable=import-outside-toplevel
  from lm2_jax.train.loss import next_token_loss  # pylint: disable=import-outside-toplevel

  task = FactTask()
  config = model_config(kind, task)
  model = LM2Model(config.model)
  params = init_params(model, jax.random.key(seed))
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(100, steps - 1), steps, 3e-4), weight_decay=0.01))
  opt = tx.init(params)

  def loss_fn(p, toks, mask):
    logits, _, aux = model.apply({"params": p}, toks)
    loss, acc = next_token_loss(logits, toks, mask)
    return loss + sum(aux["losses"].values(), jnp.float32(0)), (loss, acc)

  @jax.jit
  def step(p, o, toks, mask):
    (_, (loss, acc)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, toks, mask)
    upd, o = tx.update(g, o, p)
    return optax.apply_updates(p, upd), o, loss, acc

  rng = np.random.default_rng(seed)
  start, log = time.perf_counter(), []
  for i in range(steps):
    toks, mask = task.batch(rng, batch_size, num_segments)
    params, opt, loss, acc = step(params, opt, toks, mask)
    if i % 50 == 0 or i == steps - 1:
      log.append({"step": i, "loss": float(loss), "value_acc": float(acc), "seconds": time.perf_counter() - start})
      print(json.dumps(log[-1]), flush=True)
  export(out, config, jax.device_get(params), IdTokenizer(task.vocab_size))
  with open(os.path.join(out, "training_log.json"), "w") as f:
    json.dump({"kind": kind, "steps": steps, "seed": seed, "batch_size": batch_size, "num_segments": num_segments,
               "seconds": time.perf_counter() - start, "log": log}, f, indent=1)
  print(f"wrote {out} in {time.perf_counter() - start:.0f} s")


def replay_kl(model_dir: str, seed: int, contexts: int = 4) -> None:
  """Where the sleep's replay KL sits: injects `contexts` segments of a trial (4 facts, then 2 per segment) into a
  session, computes on them the two sides of the replay KL of lm2_jax.consolidate, the teacher (the model with
  the session's memory) and the student at theta_0 (a fresh memory), and prints per type of the predicted token
  (a key after Q, a value after its key, any other) the teacher's top probability, the KL per position, its
  share of the total, and how often each side's top guess is the token that comes."""
  import jax  # pylint: disable=import-outside-toplevel
  from lm2_jax.consolidate.distill import _tile  # pylint: disable=import-outside-toplevel
  from lm2_jax.sessions import Session  # pylint: disable=import-outside-toplevel
  from lm2_jax.sessions.export import load_export  # pylint: disable=import-outside-toplevel

  config, params, tok = load_export(model_dir)
  task, rng = FactTask(), np.random.default_rng(seed)
  values = rng.integers(0, task.num_values, task.num_keys)
  session, segments = Session(params, config, tok), []
  for i in range(contexts):
    keys = task.general_keys + rng.choice(task.num_keys - task.general_keys, 4 if i == 0 else 2, replace=False)
    segments.append(task.segment(rng, [(int(k), int(values[k])) for k in keys])[0])
    session.inject(" ".join(map(str, segments[-1])))
  rows, model = np.stack(segments).astype(np.int32), session.model
  memory = _tile(model, session.state.memory, len(rows))
  teacher = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, rows, memory)[0]), np.float64)[:, :-1]
  student = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, rows)[0]), np.float64)[:, :-1]
  kl = np.sum(np.exp(teacher) * (teacher - student), -1)  # position t predicts token t + 1
  nxt, before = rows[:, 1:], np.roll(rows, 1, 1)[:, :-1]
  kind = np.where(rows[:, :-1] == Q, "key", np.where(before == Q, "value", "other"))
  for name in ("value", "key", "other"):
    m = kind == name
    print(f"{name:5s} positions {m.sum():3d}  teacher top-p {np.exp(teacher.max(-1))[m].mean():.3f}  "
          f"KL/position {kl[m].mean():.4f}  share of KL {kl[m].sum() / kl.sum():.4f}  top guess right: teacher "
          f"{np.mean(teacher.argmax(-1)[m] == nxt[m]):.2f}, fresh memory "
          f"{np.mean(student.argmax(-1)[m] == nxt[m]):.2f}")


def _general_stream(task: FactTask, seed: int, streams: int = 64, num_segments: int = 6) -> np.ndarray:
  """Training-distribution streams laid end to end: the general text of this model."""
  rng = np.random.default_rng(seed)
  return np.concatenate([task.general_stream(rng, num_segments)[0] for _ in range(streams)])


class Trials:
  """The trials of one trained model (module docstring)."""

  def __init__(self, model_dir: str, sleep_every: int, n_max: int, num_facts: int, budget: dict):
    import jax  # pylint: disable=import-outside-toplevel
    from lm2_jax.model import LM2Model  # pylint: disable=import-outside-toplevel
    from lm2_jax.sessions.export import load_export  # pylint: disable=import-outside-toplevel
    from lm2_jax.train.loss import next_token_loss  # pylint: disable=import-outside-toplevel
    self.config, self.params0, self.tok = load_export(model_dir)
    self.task, self.sleep_every, self.num_facts, self.budget = FactTask(), sleep_every, num_facts, budget
    self.ns = [0] + [2 ** i for i in range(int(np.log2(n_max)) + 1)]
    model = LM2Model(self.config.model)
    held = [self.task.general_stream(np.random.default_rng(10**6 + i), 6) for i in range(64)]
    toks, mask = np.stack([h[0] for h in held]), np.stack([h[1] for h in held])
    recall = self.task.recall_mask(toks, mask)
    masks = {"": mask, "_recall": recall, "_first": mask & ~recall}  # all value tokens; recall; first appearances

    @jax.jit
    def held_out_loss(p):
      logits = model.apply({"params": p}, toks)[0]
      return {name: next_token_loss(logits, toks, m)[0] for name, m in masks.items()}
    self.held_out_loss = held_out_loss
    self.general = _general_stream(self.task, 2 * 10**6)

  def probe(self, session, facts, fresh_memory=False) -> float:
    """Accuracy on the facts: greedy next token after `Q k` from the session's state (or a fresh memory, same
    params), without changing the session."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    dec = session._dec  # pylint: disable=protected-access
    st = dec.fresh(session.params, 1) if fresh_memory else session.state
    hits = [int(jnp.argmax(dec.feed(session.params, st, [[Q, self.task.key(k)]]).logits_BV[0])) == self.task.value(v)
            for k, v in facts]
    return float(np.mean(hits))

  def trial(self, seed: int, index: int) -> dict:
    from lm2_jax.sessions import Session  # pylint: disable=import-outside-toplevel
    task, rng = self.task, np.random.default_rng([seed, index])
    keys = task.general_keys + rng.permutation(task.num_keys - task.general_keys)
    values = rng.integers(0, task.num_values, task.num_keys)
    facts = [(int(k), int(values[k])) for k in keys[:self.num_facts]]
    others = keys[self.num_facts:]
    mem, slp = (Session(self.params0, self.config, self.tok) for _ in range(2))
    text = lambda ids: " ".join(map(str, ids))
    out = {"memory": {}, "sleep": {}, "sleep_reset": {}, "sleeps": []}
    contexts = [task.segment(rng, facts)[0]]
    for n in range(1, max(self.ns) + 1):
      distractor = [(int(k), int(values[k])) for k in rng.choice(others, 2, replace=False)]
      contexts.append(task.segment(rng, distractor)[0])
    for n, ctx in enumerate(contexts):
      mem.inject(text(ctx))
      slp.inject(text(ctx))
      if (n + 1) % self.sleep_every == 0:
        before = self.probe(slp, facts)
        report = slp.sleep(general=self.general, **self.budget)
        out["sleeps"].append({"after_contexts": n + 1, "memory_acc_before": before,
                              "reset_acc_after": self.probe(slp, facts, fresh_memory=True),
                              "memory_acc_after": self.probe(slp, facts), **{k: report[k] for k in (
                                  "kl_before", "kl_after", "general_loss_before", "general_loss_after", "seconds")}})
      if n in self.ns:
        out["memory"][n] = self.probe(mem, facts)
        out["sleep"][n] = self.probe(slp, facts)
        out["sleep_reset"][n] = self.probe(slp, facts, fresh_memory=True)
    for when, p in (("before", self.params0), ("after", slp.params)):
      for name, loss in self.held_out_loss(p).items():
        out[f"held_out_loss_{when}{name}"] = float(loss)
    return out


def run(model_dir: str, out: str, seeds: list[int], trials: int, sleep_every: int, n_max: int, num_facts: int,
        budget: dict) -> dict:
  t = Trials(model_dir, sleep_every, n_max, num_facts, budget)
  os.makedirs(out, exist_ok=True)
  start, results = time.perf_counter(), []
  for seed in seeds:
    for i in range(trials):
      results.append({"seed": seed, "trial": i, **t.trial(seed, i)})
      with open(os.path.join(out, "trials.jsonl"), "a") as f:  # kept as they come: a cut run keeps its trials
        f.write(json.dumps(results[-1]) + "\n")
      print(json.dumps({"seed": seed, "trial": i, "memory": results[-1]["memory"], "sleep": results[-1]["sleep"],
                        "sleep_reset": results[-1]["sleep_reset"], "seconds": time.perf_counter() - start}),
            flush=True)
  summary = summarize(results, t.ns, seeds)
  with open(os.path.join(out, "retention.json"), "w") as f:
    json.dump({"model": model_dir, "kind": t.config.model.memory.kind, "seeds": seeds, "trials_per_seed": trials,
               "sleep_every": sleep_every, "num_facts": num_facts, "budget": budget, "ns": t.ns,
               "chance": 1 / t.task.num_values, "seconds": time.perf_counter() - start, "summary": summary,
               "trials": results}, f, indent=1)
  plot(summary, t.ns, os.path.join(out, "retention.png"), t.config.model.memory.kind, sleep_every)
  print(table(summary, t.ns))
  return summary


def summarize(results: list[dict], ns: list[int], seeds: list[int]) -> dict:
  """Per arm and N: the mean accuracy over trials of each seed, then mean and std over seeds; the targets."""
  def per_seed(values):
    by = [np.mean([v for r, v in zip(results, values) if r["seed"] == s]) for s in seeds]
    return {"mean": float(np.mean(by)), "std": float(np.std(by)), "per_seed": [float(b) for b in by]}
  s = {arm: {n: per_seed([r[arm][n] for r in results]) for n in ns} for arm in ("memory", "sleep", "sleep_reset")}
  base = s["memory"][0]["mean"]
  capacity = next((n for n in ns if s["memory"][n]["mean"] < base / 2), None)
  first = [r["sleeps"][0] for r in results if r["sleeps"]]
  s["capacity"] = capacity
  at = min((n for n in ns if capacity and n >= 4 * capacity), default=None)
  s["at_4x_capacity"] = None if at is None else {"n": at, "memory": s["memory"][at]["mean"],
                                                 "sleep": s["sleep"][at]["mean"]}
  s["first_sleep"] = {"memory_acc_before": per_seed([f["memory_acc_before"] for f in first]),
                      "reset_acc_after": per_seed([f["reset_acc_after"] for f in first])}
  for part in ("", "_recall", "_first"):  # all value tokens, recall ones, first appearances
    if f"held_out_loss_before{part}" in results[0]:
      s[f"held_out_loss{part}"] = {w: per_seed([r[f"held_out_loss_{w}{part}"] for r in results])
                                   for w in ("before", "after")}
  return s


def table(s: dict, ns: list[int]) -> str:
  rows = ["| arm | " + " | ".join(f"N={n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
  for arm in ("memory", "sleep", "sleep_reset"):
    rows.append(f"| {arm} | " + " | ".join(f"{s[arm][n]['mean']:.2f}±{s[arm][n]['std']:.2f}" for n in ns) + " |")
  return "\n".join(rows)


def plot(s: dict, ns: list[int], path: str, kind: str, sleep_every: int) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  x = [max(n, 0.5) for n in ns]
  labels = {"memory": "episodic memory alone", "sleep": f"sleep every {sleep_every} contexts",
            "sleep_reset": "after the last sleep, memory reset"}
  for arm, label in labels.items():
    m = np.array([s[arm][n]["mean"] for n in ns])
    e = np.array([s[arm][n]["std"] for n in ns])
    ax.errorbar(x, m, yerr=e, marker="o", label=label, capsize=3)
  ax.set_xscale("log", base=2)
  ax.set_xticks(x, [str(n) for n in ns])
  ax.set_xlabel("distractor contexts N")
  ax.set_ylabel("accuracy on the injected facts")
  ax.set_title(f"retention ({kind})")
  ax.set_ylim(0, 1)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


_MODE = flags.DEFINE_enum("mode", None, ["train", "run", "replay_kl"],
                          "train: the benchmark's model; run: the trials; replay_kl: where a sleep's replay KL sits.")
_KIND = flags.DEFINE_string("kind", "lm2", "train: memory kind.")
_OUT = flags.DEFINE_string("out", None, "train: the export directory to write; run: the results directory.")
_STEPS = flags.DEFINE_integer("steps", 1200, "train: optimizer steps.")
_SEED = flags.DEFINE_integer("seed", 0, "train: seed; replay_kl: seed of the facts.")
_MODEL = flags.DEFINE_string("model", None, "run, replay_kl: the export directory of a trained model.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "run: seeds.")
_TRIALS = flags.DEFINE_integer("trials", 4, "run: trials per seed.")
_SLEEP_EVERY = flags.DEFINE_integer("sleep_every", 4, "run: contexts between sleeps (S).")
_N_MAX = flags.DEFINE_integer("n_max", 64, "run: the largest N (a power of two).")
_FACTS = flags.DEFINE_integer("facts", 4, "run: facts injected (K).")
_SLEEP_STEPS = flags.DEFINE_integer("sleep_steps", 50, "run: consolidation steps per sleep.")
_SLEEP_LR = flags.DEFINE_float("sleep_lr", 3e-3, "run: consolidation learning rate.")
_SLEEP_RANK = flags.DEFINE_integer("sleep_rank", 0, "run: adapter rank (0: full fine-tuning).")
_SLEEP_INTERFERENCE = flags.DEFINE_integer("sleep_interference", 0, "run: consolidate.interference (general "
                                           "segments in the student's memory; 0: fresh).")
_SLEEP_REHEARSE = flags.DEFINE_integer("sleep_rehearse", 0, "run: consolidate.rehearse (tokens of earlier sleeps' "
                                       "segments replayed again).")
_SLEEP_GENERAL_WEIGHT = flags.DEFINE_float("sleep_general_weight", 1.0, "run: consolidate.general_weight.")
_SLEEP_GENERAL = flags.DEFINE_enum("sleep_general", "kl", ["nll", "kl"], "run: the general-text term of a sleep.")
_SLEEP_WEIGHTING = flags.DEFINE_enum("sleep_weighting", "uniform", ["uniform", "confidence"],
                                     "run: consolidate.weighting (the positions of the KL terms).")
_SLEEP_ANCHOR = flags.DEFINE_enum("sleep_anchor", "sleep", ["sleep", "first"], "run: consolidate.general_anchor.")
_SLEEP_GENERAL_LEN = flags.DEFINE_integer("sleep_general_len", 0, "run: consolidate.general_len (0: two segments).")
_SLEEP_GENERAL_ROWS = flags.DEFINE_integer("sleep_general_rows", 8, "run: consolidate.general_rows (windows per step).")
_SLEEP_TARGETS = flags.DEFINE_string("sleep_targets", "attn,mlp", "run: consolidate.targets (with --sleep_rank).")
flags.mark_flags_as_required(["mode"])


def main(argv):
  del argv
  from lm2_jax.model.config import ConfigError  # pylint: disable=import-outside-toplevel
  if _MODE.value != "replay_kl" and not _OUT.value:
    raise ConfigError(f"--out=None: --mode={_MODE.value} writes a directory; name it with --out=DIR")
  if _MODE.value != "train" and not _MODEL.value:
    raise ConfigError(f"--model=None: --mode={_MODE.value} reads a trained model; give --model=DIR (an export "
                      "of --mode=train)")
  if _MODE.value == "train":
    train(_KIND.value, _OUT.value, _STEPS.value, _SEED.value)
  elif _MODE.value == "replay_kl":
    replay_kl(_MODEL.value, _SEED.value)
  else:
    budget = {"steps": _SLEEP_STEPS.value, "learning_rate": _SLEEP_LR.value, "rank": _SLEEP_RANK.value,
              "general_loss": _SLEEP_GENERAL.value, "general_weight": _SLEEP_GENERAL_WEIGHT.value,
              "interference": _SLEEP_INTERFERENCE.value, "rehearse": _SLEEP_REHEARSE.value,
              "general_anchor": _SLEEP_ANCHOR.value, "weighting": _SLEEP_WEIGHTING.value,
              "general_len": _SLEEP_GENERAL_LEN.value, "general_rows": _SLEEP_GENERAL_ROWS.value,
              "targets": _SLEEP_TARGETS.value}
    run(_MODEL.value, _OUT.value, [int(x) for x in _SEEDS.value], _TRIALS.value, _SLEEP_EVERY.value, _N_MAX.value,
        _FACTS.value, budget)


if __name__ == "__main__":
  cli.run(main)
