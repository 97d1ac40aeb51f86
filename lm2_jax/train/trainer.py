"""Sharded train and eval steps, and the training loop with metrics and checkpoints.

    state, metrics = train_step(state, batch)        # jit, state donated, shardings from the logical-axis rules

The state holds the step, params, optimizer state and the training memory. With `config.data.continuing_stream`
the memory written by one batch is read by the next (a continuing stream, as in RMT/LM2 training on long
documents), except in rows whose batch starts a new document (`new_document`, from packed sources); otherwise
every batch starts from a fresh memory. A batch's `segment_ids` keep attention and memory inside documents.
A row longer than `train.window_tokens` runs window by window (`row_windows`).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from lm2_jax.data.pipeline import make_batches
from lm2_jax.model import LM2Model
from lm2_jax.model.config import ConfigError, check
from lm2_jax.parallel import logical_shardings, make_mesh, use_mesh
from lm2_jax.train import guards
from lm2_jax.train.checkpoint import Checkpointer, config_json
from lm2_jax.train.config import check_run_config, window_tokens_of
from lm2_jax.train.flops import measure_peak_flops, train_flops_per_token
from lm2_jax.train.loss import next_token_targets, weighted_cross_entropy
from lm2_jax.train.optimizer import learning_rate_schedule, make_optimizer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  memory: Any


@dataclasses.dataclass
class Setup:
  """Everything a training or evaluation run derives from the config, built once."""
  config: Any
  model: LM2Model
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  state_shardings: Any
  batch_sharding: Any

  @property
  def batch_size(self) -> int:
    return self.config.train.batch_size


def build(config, devices=None) -> Setup:
  """Model, optimizer, mesh (over `devices`, default all) and shardings of `config`."""
  check_run_config(config)
  model = LM2Model(config.model)
  tx = make_optimizer(config.train)
  mesh = make_mesh(config.mesh, devices)
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  check(config.train.batch_size % rows == 0, "train.batch_size", config.train.batch_size,
        f"must be a multiple of the mesh's data x fsdp = {rows} devices that split the batch; change it or "
        "config.mesh")
  specs = nn.get_partition_spec(jax.eval_shape(lambda: _boxed_state(model, tx, config, jax.random.key(0))))
  specs = specs.replace(memory=model.memory_axes())
  return Setup(config, model, tx, mesh, logical_shardings(specs, mesh), _batch_shardings(mesh))


def _batch_shardings(mesh) -> dict[str, Any]:
  """Shardings of the batch fields: [B, T] arrays over ('batch', 'length'), per-row flags over 'batch'."""
  rows = logical_shardings(("batch", "length"), mesh)
  return {"tokens": rows, "segment_ids": rows, "loss_mask": rows,
          "new_document": logical_shardings(("batch",), mesh)}


def _state(model: LM2Model, tx, config, params) -> TrainState:
  """Step 0 of `params`: a fresh optimizer state and training memory."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    memory=model.init_memory(config.train.batch_size))


def _boxed_state(model: LM2Model, tx, config, rng) -> TrainState:
  tokens = jnp.zeros((1, model.config.segment_len), jnp.int32)
  params = model.init(rng, tokens)["params"]  # boxed: the optimizer state inherits the logical axes
  return _state(model, tx, config, params)


def init_state(setup: Setup, params=None) -> TrainState:
  """A fresh state, created directly in its sharded layout; `params` (e.g. imported weights, the structure
  `init_params` gives) replace the initialisation."""
  with use_mesh(setup.mesh):
    if params is not None:
      create = lambda p: _state(setup.model, setup.tx, setup.config, p)
      return jax.jit(create, out_shardings=setup.state_shardings)(params)
    rng = jax.random.key(setup.config.train.seed)
    create = lambda: nn.unbox(_boxed_state(setup.model, setup.tx, setup.config, rng))
    return jax.jit(create, out_shardings=setup.state_shardings)()


def _carried_memory(model, memory, batch):
  """The memory a batch continues: fresh in rows that start a document (`new_document`, from packed sources)."""
  return model.reset_memory(memory, batch["new_document"]) if "new_document" in batch else memory


def _abstract_state(setup: Setup):
  """Shapes and dtypes of a TrainState (no arrays allocated): the template checkpoints restore into."""
  return jax.eval_shape(lambda: nn.unbox(_boxed_state(setup.model, setup.tx, setup.config, jax.random.key(0))))


def row_windows(model_config, seq_len: int, window_tokens: int) -> int:
  """How many windows the steps run a row of `seq_len` tokens in, one after another (`train.window_tokens`).

  A window is a whole number of the memory's gradient windows (`model.bptt_segments` x `segment_len` tokens),
  the most that fit in `window_tokens` (at least one) and divide the row. No gradient crosses a window (the
  memory entering one is cut from the graph), so the sum of the windows' gradients is the row's gradient; but
  only one window's activations are held at a time, so a step's memory does not grow with the row (a 64K-token
  lm2 step: 2.2 GB against 13.9 GB; benchmarks/long_document.py, README "Performance"). 1 when the row fits
  `window_tokens`, when gradients flow through the whole row (`bptt_segments=0`) or when `window_tokens` is 0."""
  unit = model_config.bptt_segments * model_config.segment_len
  if not unit or not window_tokens or seq_len <= window_tokens or seq_len % unit:
    return 1
  k = max(1, window_tokens // unit)
  while (seq_len // unit) % k:
    k -= 1
  return seq_len // (k * unit)


def _window_loss(model, params, batch, memory, total, rng, windows):
  """One window: (its share of the row's objective, (summed cross-entropy, summed correct, new memory, aux)).
  `batch` holds tokens, targets, weights ([B, N]) and optionally segment_ids and memory_document ([B], the
  document of the token before the window); `total` is the row's weight; `windows` in the row (auxiliary
  losses are means over segments: each window adds its mean / windows). A whole row (windows == 1) leaves out its
  last position, which predicts nothing (weight 0), as `next_token_loss` does."""
  logits, new_memory, aux = model.apply({"params": params}, batch["tokens"], memory,
                                        segment_ids=batch.get("segment_ids"),
                                        memory_document=batch.get("memory_document"),
                                        rngs=None if rng is None else {"memory": rng})
  n = logits.shape[1] - 1 if windows == 1 else logits.shape[1]
  ce, correct = weighted_cross_entropy(logits[:, :n], batch["targets"][:, :n], batch["weights"][:, :n])
  return ce / total + sum(aux["losses"].values(), jnp.float32(0)) / windows, (ce, correct, new_memory, aux)


def _loss_and_grads(model, params, batch, memory, rng=None, with_grads=True, window_tokens=0):
  """The batch's loss, accuracy, memory after it, aux (statistics and auxiliary losses averaged over segments)
  and, `with_grads`, the gradients of loss + auxiliary losses, window by window (`row_windows`). `rng`: the
  `memory` RNG stream (MemoryLLM's random drops), folded with the window index; without it stochastic kinds
  draw from their state."""
  tokens = batch["tokens"]
  B, T = tokens.shape
  W = row_windows(model.config, T, window_tokens)
  targets, weights = next_token_targets(tokens, batch.get("loss_mask"))
  total = jnp.maximum(weights.sum(), 1.0)
  rows = {"tokens": tokens, "targets": targets, "weights": weights}
  if "segment_ids" in batch:
    rows["segment_ids"] = batch["segment_ids"]

  def window(memory, xs, rng):
    fn = lambda p: _window_loss(model, p, xs, memory, total, rng, W)
    if with_grads:
      return jax.grad(fn, has_aux=True)(params)
    return None, fn(params)[1]

  if W == 1:
    grads, (ce, correct, new_memory, aux) = window(memory, rows, rng)
  else:
    # [B, T] -> [W, B, T / W]. The memory entering a window belongs to the document of the token before it, as
    # within one call (the row's first window: its first token's, after `new_document` in _carried_memory).
    xs = jax.tree.map(lambda a: a.reshape(B, W, T // W).swapaxes(0, 1), rows)
    if "segment_ids" in rows:
      ids = rows["segment_ids"]
      xs["memory_document"] = jnp.concatenate([ids[:, :1], ids[:, T // W - 1:-1:T // W]], axis=1).T

    def body(carry, x):
      memory, acc = carry
      xs, w = x
      g, out = window(memory, xs, None if rng is None else jax.random.fold_in(rng, w))
      acc = acc if g is None else jax.tree.map(jnp.add, acc, g)
      return (out[2], acc), (out[0], out[1], out[3])

    acc = jax.tree.map(jnp.zeros_like, params) if with_grads else None
    (new_memory, grads), (ce, correct, aux) = jax.lax.scan(body, (memory, acc), (xs, jnp.arange(W)))
    ce, correct, aux = ce.sum(), correct.sum(), jax.tree.map(lambda a: a.mean(axis=0), aux)
  return ce / total, correct / total, new_memory, aux, grads


def _memory_metrics(aux) -> dict[str, jax.Array]:
  """How the memory was read: entropy of the read mass over slots (nats; log N = uniform) and the top slot's
  share (of the general level for hierarchical memory), averaged over memory layers and batch; the mean input
  gate, forget gate and write strength of lm2's write (of the general level's for hierarchical memory); for
  hierarchical memory also the share of tokens that read the deep level, of banks touched, of picks dropped
  over a bank's capacity, the busiest bank's share of picks, and the auxiliary losses."""
  stats = aux["memory_stats"]
  out = {f"memory/loss_{k}": v for k, v in aux["losses"].items()}
  mass = stats.get("read_mass", stats.get("general", {}).get("read_mass"))
  if mass is not None:
    out["memory/read_entropy"] = -(mass * jnp.log(mass + 1e-9)).sum(-1).mean()
    out["memory/read_max"] = mass.max(-1).mean()
  for name in ("in_gate", "forget_gate", "write_strength"):  # lm2, or hierarchical's general level
    gate = stats.get(name, stats.get("general", {}).get(name))
    if gate is not None:
      out[f"memory/{name}"] = gate.mean()
  for name in ("deep_tokens", "deep_banks", "deep_dropped"):
    if name in stats:
      out[f"memory/{name}"] = stats[name].mean()
  if "bank_usage" in stats:
    out["memory/bank_usage_max"] = stats["bank_usage"].max(-1).mean()
  return out


def make_train_step(setup: Setup):
  model, tx, config = setup.model, setup.tx, setup.config
  schedule = learning_rate_schedule(config.train)
  continuing = config.data.continuing_stream
  window_tokens = window_tokens_of(config)

  def step_fn(state: TrainState, batch):
    memory = _carried_memory(model, state.memory, batch) if continuing else model.init_memory(setup.batch_size)
    rng = jax.random.fold_in(jax.random.key(config.train.seed), state.step)
    loss, accuracy, new_memory, aux, grads = _loss_and_grads(model, state.params, batch, memory, rng,
                                                             window_tokens=window_tokens)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    health = guards.step_health(loss, grads, params)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step // config.train.grad_accum_steps), **_memory_metrics(aux),
               "health": health}
    updated = (params, opt_state, new_memory if continuing else state.memory)
    if config.train.nonfinite == "skip":
      updated = guards.keep_if(health["ok"], updated, (state.params, state.opt_state, state.memory))
    return TrainState(state.step + 1, *updated), metrics

  # Batch arrays arrive placed by put_batch; their shardings are taken as they are.
  return jax.jit(step_fn, in_shardings=(setup.state_shardings, None),
                 out_shardings=(setup.state_shardings, None), donate_argnums=(0,))


def make_eval_step(setup: Setup):
  """(params, batch, memory) -> (metrics {'loss', 'accuracy', ...}, memory after the batch); jit, any batch size
  and length. Rows of a batch flagged `new_document` start from a fresh memory; pass `model.init_memory(B)` to
  evaluate every batch from a fresh memory, or the returned memory to follow continuing streams."""
  model, window_tokens = setup.model, window_tokens_of(setup.config)

  def eval_fn(params, batch, memory):
    loss, accuracy, new_memory, aux, _ = _loss_and_grads(model, params, batch, _carried_memory(model, memory, batch),
                                                         with_grads=False, window_tokens=window_tokens)
    return {"loss": loss, "accuracy": accuracy, **_memory_metrics(aux)}, new_memory

  return jax.jit(eval_fn)


def restore(workdir: str, config=None, step: int | None = None):
  """(config, setup, state) of the checkpoint at `step` in `workdir`, verified; without `step`, of the newest
  checkpoint that verifies (a damaged one is reported and skipped, nothing is moved). `config` defaults to the
  one the checkpoint was written with; a given one must be compatible with it."""
  ckpt = Checkpointer(workdir)

  def load(step):
    if config is None:
      saved = ml_collections.ConfigDict(ckpt.saved_config(step))
    else:
      saved = config
      ckpt.check_compatible(step, config)
    setup = build(saved)
    return saved, setup, ckpt.restore(step, _abstract_state(setup), setup.state_shardings)[0]

  try:
    if step is not None and step not in ckpt.steps():
      raise ConfigError(f"--step={step}: {workdir!r} has no checkpoint at that step; it has {ckpt.steps()}")
    restored = ckpt.newest_good(load) if step is None else load(step)
    if restored is None:
      raise ConfigError(f"--workdir={workdir!r}: no checkpoint there; train one with launch.train")
  finally:
    ckpt.close()
  return restored


def start_from(config, workdir: str, params) -> None:
  """Writes a step-0 checkpoint of `params` (e.g. imported weights) with a fresh optimizer state, training memory
  and data iterator, so that `train(config, workdir)` starts from them. Refuses a workdir with checkpoints."""
  ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
  try:
    if ckpt.latest_step() is not None:
      raise ConfigError(f"--workdir={workdir!r}: already holds checkpoints (steps {ckpt.manager.all_steps()}); "
                        "give a new workdir")
    data_state = make_batches(config).get_state()
    ckpt.save(0, init_state(build(config), params), data_state, config)
  finally:
    ckpt.close()
  _write_config(workdir, config)


def _write_config(workdir: str, config) -> None:
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  (epath.Path(workdir) / "config.json").write_text(json.dumps(config_json(config), indent=2))


def put_batch(setup: Setup, batch: dict[str, np.ndarray]):
  """A host batch (this process's rows) -> global arrays sharded over the batch axes."""
  length = batch["tokens"].shape[1]
  check(length == setup.config.train.seq_len, "train.seq_len", setup.config.train.seq_len,
        f"the data gives sequences of {length} tokens; set train.seq_len to match the data")
  check(batch["tokens"].max() < setup.model.config.vocab_size and batch["tokens"].min() >= 0, "model.vocab_size",
        setup.model.config.vocab_size,
        f"the data holds token ids in [{batch['tokens'].min()}, {batch['tokens'].max()}]; the vocabulary must "
        "cover them (check the tokenizer and config.model.vocab_size)")
  for name in batch:
    check(name in setup.batch_sharding, "data", name,
          f"the data gives a field the trainer does not know; the fields are {sorted(setup.batch_sharding)}")
  return {k: jax.make_array_from_process_local_data(setup.batch_sharding[k], v) for k, v in batch.items()}


class MetricsLog:
  """Per logged step: one JSON object appended to DIR/metrics.jsonl and scalars in TensorBoard event files in
  DIR (process 0 only). Files are opened on the first write."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if jax.process_index() != 0:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is None:
      from tensorboardX import SummaryWriter  # no TensorFlow needed
      self._tb = SummaryWriter(self.workdir, flush_secs=30)
    for name, value in row.items():
      if name != "step":
        self._tb.add_scalar(name, value, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def peak_flops(config) -> tuple[float, str]:
  """(peak FLOP/s of the devices, where it came from): `config.train.peak_flops` when set (> 0), otherwise one
  device's matmul rate in the model's compute dtype measured now (`measure_peak_flops`: 1024^3 on CPU, 8192^3 on
  an accelerator, where a small matmul is far from the peak) times the device count (on CPU, the host's devices
  share its cores: one device's rate)."""
  configured = config.train.get("peak_flops", 0.0)
  if configured:
    return float(configured), "config.train.peak_flops"
  dtype, cpu = jnp.dtype(config.model.dtype), jax.devices()[0].platform == "cpu"
  size = 1024 if cpu else 8192
  rate = measure_peak_flops(size, dtype) * (1 if cpu else jax.device_count())
  return rate, f"measured ({size}^3 {dtype.name} matmul)"


class Progress:
  """A progress bar on a terminal, plain log lines otherwise."""

  def __init__(self, total: int, start: int):
    self.total, self.start, self.t0 = total, start, time.perf_counter()
    self.tty = sys.stdout.isatty()

  def update(self, step: int, loss: float, tokens_per_s: float | None, mfu: float | None) -> None:
    done = step - self.start
    elapsed = time.perf_counter() - self.t0
    left = elapsed / max(done, 1) * (self.total - step)
    speed = "" if tokens_per_s is None else f" {tokens_per_s:,.0f} tok/s,"
    speed += "" if mfu is None else f" MFU {100 * mfu:.1f}%,"
    text = f"step {step}/{self.total} loss {loss:.4f}{speed} {left:.0f} s left"
    if self.tty:
      width = 30
      filled = int(width * step / self.total)
      print(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}   ", end="", flush=True)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self.tty:
      print()


def train(config, workdir: str, data=None) -> TrainState:
  """Trains `config` in `workdir`, resuming from its newest good checkpoint (a damaged one is reported and
  moved to DIR/damaged_checkpoints/).

  `data`: an iterator of host batches with `get_state`/`set_state` (default: `make_batches(config)`).
  Writes DIR/config.json, DIR/metrics.jsonl, TensorBoard events and DIR/checkpoints/, each only once the first
  step has run, so a run refused for bad input leaves the workdir as it was. A step with a non-finite loss,
  gradient or update raises guards.NonFiniteError (or is skipped: `train.nonfinite`). SIGINT (Ctrl-C) and
  SIGTERM stop the run after the current step: it saves a checkpoint, then raises guards.Interrupted.
  """
  t = config.train
  setup = build(config)
  data = make_batches(config) if data is None else data
  ckpt = Checkpointer(workdir, keep=config.checkpoint.keep)

  def load(step):
    ckpt.check_compatible(step, config)
    return (step, *ckpt.restore(step, _abstract_state(setup), setup.state_shardings))

  restored = ckpt.newest_good(load, set_aside=True)
  if restored is None:
    start, state = 0, init_state(setup)
  else:
    start, state, data_state = restored
    data.set_state(data_state)

  step_fn = make_train_step(setup)
  log = MetricsLog(workdir)
  progress = Progress(t.steps, start)
  nonfinite = guards.NonFiniteCheck(t.nonfinite, ckpt.latest_step)
  tokens_per_step = t.batch_size * t.seq_len
  flops_per_token = train_flops_per_token(setup.model.config, t.seq_len)
  if flops_per_token is None:
    print(f"no FLOP formula for memory kind {config.model.memory.kind!r} (lm2_jax/train/flops.py): MFU not reported",
          flush=True)
  else:
    peak, peak_source = peak_flops(config)
    print(f"model FLOPs per token (train step): {flops_per_token:.4g}; peak {peak:.4g} FLOP/s, {peak_source}",
          flush=True)
  step, last_t, last_step = start, time.perf_counter(), start

  def save():
    nonfinite.flush()  # only a finite state is saved
    if step != (ckpt.latest_step() or 0):
      ckpt.save(step, state, data.get_state(), config)  # the data state after this step: no batch is drawn early

  try:
    with use_mesh(setup.mesh), guards.StopSignals() as stop:
      while step < t.steps and not stop.requested():
        state, metrics = step_fn(state, put_batch(setup, next(data)))
        step += 1
        if step == start + 1:  # compiled, and the data and config passed their checks: the clock starts now
          jax.block_until_ready(metrics)
          last_t, last_step = time.perf_counter(), step
          if jax.process_index() == 0:
            _write_config(workdir, config)
        nonfinite.push(step, metrics.pop("health"), metrics["learning_rate"])
        if step % t.log_every == 0 or step == t.steps:
          nonfinite.flush()
          metrics = jax.device_get(metrics)
          now = time.perf_counter()
          if step > last_step:  # tokens/s and MFU of the steps since the last row (never of the compiling step)
            metrics["tokens_per_s"] = tokens_per_step * (step - last_step) / (now - last_t)
            if flops_per_token is not None:
              metrics["mfu"] = flops_per_token * metrics["tokens_per_s"] / peak
          last_t, last_step = now, step
          log.write(step, metrics)
          progress.update(step, float(metrics["loss"]), metrics.get("tokens_per_s"), metrics.get("mfu"))
        if step % config.checkpoint.every == 0 or step == t.steps:
          save()
      if stop.agreed is not None:
        save()
  except KeyboardInterrupt:  # a second Ctrl-C: quit now; an unfinished save is ignored on resume
    ckpt = None
    raise
  finally:
    progress.close()
    log.close()
    if ckpt is not None:
      ckpt.wait()
      ckpt.close()
  if stop.agreed is not None:
    raise guards.Interrupted(f"stopped by {signal.Signals(stop.agreed).name} at step {step} of {t.steps}; saved "
                             f"checkpoint {step} in {workdir}: run the same command to resume", stop.agreed)
  return state
