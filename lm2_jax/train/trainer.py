"""Sharded train and eval steps, and the training loop with metrics and checkpoints.

    state, metrics = train_step(state, batch)        # jit, state donated, shardings from the logical-axis rules

The state holds the step, params, optimizer state and the training memory. With `config.data.continuing_stream`
the memory written by one batch is read by the next (a continuing stream, as in RMT/LM2 training on long
documents), except in rows whose batch starts a new document (`new_document`, from packed sources); otherwise
every batch starts from a fresh memory. A batch's `segment_ids` keep attention and memory inside documents.
"""

from __future__ import annotations

import dataclasses
import json
import os
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

from lm2_jax.data.pipeline import make_batches
from lm2_jax.model import LM2Model
from lm2_jax.model.config import ConfigError, check
from lm2_jax.parallel import logical_shardings, make_mesh, use_mesh
from lm2_jax.train.checkpoint import Checkpointer, config_json
from lm2_jax.train.loss import next_token_loss
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


def _loss_fn(model, params, batch, memory):
  logits, new_memory, aux = model.apply({"params": params}, batch["tokens"], memory,
                                        segment_ids=batch.get("segment_ids"))
  loss, accuracy = next_token_loss(logits, batch["tokens"], batch.get("loss_mask"))
  total = loss + sum(aux["losses"].values(), jnp.float32(0))
  return total, (loss, accuracy, new_memory, aux)


def _memory_metrics(aux) -> dict[str, jax.Array]:
  """How the memory was read: entropy of the read mass over slots (nats; log N = uniform) and the top slot's
  share (of the general level for hierarchical memory), averaged over memory layers and batch; for
  hierarchical memory also the share of tokens that read the deep level, of banks touched, of picks dropped
  over a bank's capacity, the busiest bank's share of picks, and the auxiliary losses."""
  stats = aux["memory_stats"]
  out = {f"memory/loss_{k}": v for k, v in aux["losses"].items()}
  mass = stats.get("read_mass", stats.get("general", {}).get("read_mass"))
  if mass is not None:
    out["memory/read_entropy"] = -(mass * jnp.log(mass + 1e-9)).sum(-1).mean()
    out["memory/read_max"] = mass.max(-1).mean()
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

  def step_fn(state: TrainState, batch):
    memory = _carried_memory(model, state.memory, batch) if continuing else model.init_memory(setup.batch_size)
    grads, (loss, accuracy, new_memory, aux) = jax.grad(
        lambda p: _loss_fn(model, p, batch, memory), has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step // config.train.grad_accum_steps), **_memory_metrics(aux)}
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           memory=new_memory if continuing else state.memory)
    return new_state, metrics

  # Batch arrays arrive placed by put_batch; their shardings are taken as they are.
  return jax.jit(step_fn, in_shardings=(setup.state_shardings, None),
                 out_shardings=(setup.state_shardings, None), donate_argnums=(0,))


def make_eval_step(setup: Setup):
  """(params, batch, memory) -> (metrics {'loss', 'accuracy', ...}, memory after the batch); jit, any batch size
  and length. Rows of a batch flagged `new_document` start from a fresh memory; pass `model.init_memory(B)` to
  evaluate every batch from a fresh memory, or the returned memory to follow continuing streams."""
  model = setup.model

  def eval_fn(params, batch, memory):
    _, (loss, accuracy, new_memory, aux) = _loss_fn(model, params, batch, _carried_memory(model, memory, batch))
    return {"loss": loss, "accuracy": accuracy, **_memory_metrics(aux)}, new_memory

  return jax.jit(eval_fn)


def restore(workdir: str, config=None, step: int | None = None):
  """(config, setup, state) of the checkpoint at `step` (default: the latest) in `workdir`. `config` defaults to
  the one the checkpoint was written with; a given one must be compatible with it."""
  ckpt = Checkpointer(workdir, keep=1)
  try:
    steps = sorted(ckpt.manager.all_steps())
    if not steps:
      raise ConfigError(f"--workdir={workdir!r}: no checkpoints in {ckpt.directory}; give the workdir of a "
                        "training run (python -m launch.train --config=... --workdir=DIR writes them)")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ConfigError(f"--step={step}: no checkpoint at that step in {workdir!r}; the steps there are {steps}")
    if config is None:
      config = ml_collections.ConfigDict(ckpt.saved_config(step))
    else:
      ckpt.check_compatible(step, config)
    setup = build(config)
    state, _ = ckpt.restore(step, _abstract_state(setup), setup.state_shardings)
  finally:
    ckpt.close()
  return config, setup, state


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
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config_json(config), f, indent=2)


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
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if jax.process_index() != 0:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
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


class Progress:
  """A progress bar on a terminal, plain log lines otherwise."""

  def __init__(self, total: int, start: int):
    self.total, self.start, self.t0 = total, start, time.perf_counter()
    self.tty = sys.stdout.isatty()

  def update(self, step: int, loss: float, tokens_per_s: float) -> None:
    done = step - self.start
    elapsed = time.perf_counter() - self.t0
    left = elapsed / max(done, 1) * (self.total - step)
    text = f"step {step}/{self.total} loss {loss:.4f} {tokens_per_s:,.0f} tok/s, {left:.0f} s left"
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
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  `data`: an iterator of host batches with `get_state`/`set_state` (default: `make_batches(config)`).
  Writes DIR/config.json, DIR/metrics.jsonl, TensorBoard events and DIR/checkpoints/, each only once the first
  step has run, so a run refused for bad input leaves the workdir as it was. Ctrl-C saves a checkpoint, then
  re-raises.
  """
  t = config.train
  setup = build(config)
  data = make_batches(config) if data is None else data
  ckpt = Checkpointer(workdir, keep=config.checkpoint.keep)
  start = ckpt.latest_step()
  if start is None:
    state = init_state(setup)
  else:
    ckpt.check_compatible(start, config)
    state, data_state = ckpt.restore(start, _abstract_state(setup), setup.state_shardings)
    data.set_state(data_state)
  start = int(start or 0)

  step_fn = make_train_step(setup)
  log = MetricsLog(workdir)
  progress = Progress(t.steps, start)
  tokens_per_step = t.batch_size * t.seq_len
  step, last_t, last_step = start, time.perf_counter(), start
  try:
    with use_mesh(setup.mesh):
      while step < t.steps:
        state, metrics = step_fn(state, put_batch(setup, next(data)))
        if step == start and jax.process_index() == 0:  # the data and config passed their checks
          os.makedirs(workdir, exist_ok=True)
          _write_config(workdir, config)
        step += 1
        if step % t.log_every == 0 or step == t.steps:
          metrics = jax.device_get(metrics)
          now = time.perf_counter()
          metrics["tokens_per_s"] = tokens_per_step * (step - last_step) / (now - last_t)
          last_t, last_step = now, step
          log.write(step, metrics)
          progress.update(step, float(metrics["loss"]), metrics["tokens_per_s"])
        if step % config.checkpoint.every == 0 or step == t.steps:
          ckpt.save(step, state, data.get_state(), config)
  except KeyboardInterrupt:
    if step > (ckpt.latest_step() or 0):
      print(f"\ninterrupted: saving step {step} before exiting", flush=True)
      ckpt.save(step, state, data.get_state(), config)
    raise
  finally:
    progress.close()
    log.close()
    ckpt.wait()
    ckpt.close()
  return state
