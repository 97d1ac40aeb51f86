r"""Side by side: our training step against the PyTorch peers, at one shape, on this machine.

  python -m benchmarks.peers [--steps=5] [--threads=2] [--entries=...] [--lm2_src=DIR]
  pip install -e '.[peers]'     # the peers: torch (CPU), recurrent-memory-transformer-pytorch, titans-pytorch

Every entry runs in its own process (a worker: `--worker=NAME`), pinned to the same `--threads` cores with the
same thread settings (OMP/MKL threads, torch.set_num_threads, CPU affinity, which XLA's thread pool follows). Each
worker builds its model, compiles or warms up, and then runs one training step (forward, backward, AdamW with
gradient clipping) whenever the parent asks; the parent asks the workers in turn, `--steps` rounds, so that the
load of a shared machine falls on all entries alike, and reports each entry's median. Tokens per step are
batch x seq_len for every entry.

Entries (default shape: batch 4 x 512 tokens, width 256, 4 layers, 4 heads of 64, 128-token segments, vocab 1024,
float32, 16 memory slots or tokens, feed-forward width 682 = the peers' GEGLU width at ff_mult 4):
  ours/none, ours/lm2, ours/rmt, ours/armt, ours/hierarchical, ours/titans, ours/hmt
      lm2_jax.train.trainer's jit train step (the one `launch.train` runs), memory `kind` from configs/defaults.py
      with the shape above; `hierarchical` keeps its default banks (32 general slots + 64 banks of 32, top 2);
      `armt` is rmt's 16 tokens plus an associative matrix in every layer (key_dim 32: 192 features).
      `titans` is MAC in every layer with the config's defaults (memory MLP depth 2, expansion 2, 4 persistent
      tokens), --heads memory heads and chunks of --titans_chunk tokens.
      `hmt` its defaults (32 sensory tokens, 128 summary tokens, a cache of 16, FIFO).
      Gradients flow through all segments (bptt_segments=0), as in both peers.
  rmt-pytorch       RecurrentMemoryTransformerWrapper(RecurrentMemoryTransformer(...)) at the same shape, the
                    library's defaults otherwise; loss = wrapper(x, return_loss=True).
  titans-pytorch    MemoryAsContextTransformer (MAC) at the same shape, 16 long-term + 4 persistent memory
                    tokens, the library's defaults otherwise; loss = model(x, return_loss=True).
  lm2-official/layer, ours/lm2-layer   only with --lm2_src=DIR (the official LM2 source: its `src/memory.py`,
                    never vendored here): one memory layer alone, forward and backward, on [batch, W, W] inputs with
                    W = width = slots = tokens (the official layer needs tokens = slots = width); ours is
                    lm2_jax.model.memory.lm2 (read, then write) at the same sizes.

An entry of ours may carry model-config overrides after a colon, to time variants side by side in one run:
`ours/none:remat_policy=full+segment_unroll=4+scan_layers=False` (values as Python literals or bare strings).

Prints, per entry, its parameter count, median step time and tokens/s, for ours also the model FLOP/s
(`lm2_jax.train.flops`, attention and memory included) and the MFU against the float32 matmul peak (`--peak_flops`,
or measured in each of our workers on its pinned cores, `flops.measure_peak_flops`, the best of them taken), then
the ratio of each of ours to each peer (tokens/s over tokens/s; > 1: ours is faster). A peer whose package is
missing is skipped with a message.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import machine, model_overrides
from launch import compile_cache

OURS = ("ours/none", "ours/lm2", "ours/rmt", "ours/armt", "ours/hierarchical", "ours/titans", "ours/hmt")
PEERS = ("rmt-pytorch", "titans-pytorch")
LAYER_PAIR = ("ours/lm2-layer", "lm2-official/layer")
PEERS_HINT = "pip install -e '.[peers]'"

_ENTRIES = flags.DEFINE_list("entries", [*OURS, *PEERS], f"Entries to run, of {[*OURS, *PEERS]}.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per entry (the median is reported), after 2 warm-up steps.")
_THREADS = flags.DEFINE_integer("threads", len(os.sched_getaffinity(0)), "CPU cores (and threads) per entry.")
_LM2_SRC = flags.DEFINE_string("lm2_src", None, "The official LM2 source (a directory holding src/memory.py or "
                               "memory.py): adds its memory layer against ours.")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows per step.")
_SEQ = flags.DEFINE_integer("seq_len", 512, "Tokens per row.")
_D = flags.DEFINE_integer("d_model", 256, "Width.")
_LAYERS = flags.DEFINE_integer("layers", 4, "Decoder layers.")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads (and memory heads).")
_DFF = flags.DEFINE_integer("d_ff", 682, "Our SwiGLU width (682: the peers' GEGLU width, int(256 * 4 * 2/3)).")
_SEG = flags.DEFINE_integer("segment_len", 128, "Tokens per segment.")
_VOCAB = flags.DEFINE_integer("vocab", 1024, "Vocabulary size.")
_SLOTS = flags.DEFINE_integer("slots", 16, "Memory slots (lm2) / memory tokens (rmt, titans long-term).")
_TITANS_CHUNK = flags.DEFINE_integer("titans_chunk", 32, "ours/titans: tokens per memory update (memory.chunk_size).")
_PEAK = flags.DEFINE_float("peak_flops", 0.0, "FLOP/s that MFU is measured against (0: measured in each worker).")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one entry as a worker process.")


# ---------------------------------------------------------------------------------------------------- workers


def _overrides(spec: str) -> dict:
  """The model overrides of an entry, 'a=1+b=full' -> {'a': 1, 'b': 'full'}."""
  return model_overrides(spec.split("+"), "--entries")


def _ours(kind: str, overrides: dict):
  """(step function, parameter count, model FLOPs per token) of our trainer's train step with memory `kind` and
  `overrides` of config.model."""
  import jax
  import numpy as np

  from configs import defaults
  from lm2_jax.model import count_params
  from lm2_jax.train import flops, trainer

  config = defaults.get_config()
  config.model.update(dict(vocab_size=_VOCAB.value, d_model=_D.value, num_layers=_LAYERS.value,
                           num_heads=_HEADS.value, num_kv_heads=_HEADS.value, d_ff=_DFF.value,
                           segment_len=_SEG.value, bptt_segments=0))
  config.model.memory.update(dict(kind=kind, num_slots=_SLOTS.value, num_heads=_HEADS.value,
                                  chunk_size=_TITANS_CHUNK.value))
  config.model.update(overrides)
  config.train.update(dict(batch_size=_BATCH.value, seq_len=_SEQ.value, warmup_steps=1))
  setup = trainer.build(config)
  state = trainer.init_state(setup)
  step_fn = trainer.make_train_step(setup)
  tokens = np.random.default_rng(0).integers(0, _VOCAB.value, (_BATCH.value, _SEQ.value), dtype=np.int32)
  batch = trainer.put_batch(setup, {"tokens": tokens})

  def step():
    nonlocal state
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)

  return step, count_params(setup.model)["total"], flops.train_flops_per_token(setup.model.config, _SEQ.value)


def _ours_lm2_layer():
  """Our LM2 memory layer alone (read, then write) on [B, W, W] inputs, W slots of width W: jit value_and_grad +
  AdamW."""
  import jax
  import jax.numpy as jnp
  import optax

  from lm2_jax.model import ModelConfig
  from lm2_jax.model.config import default_model_config
  from lm2_jax.model.memory.lm2 import LM2Memory

  w = _D.value
  m = default_model_config()
  m.update(dict(d_model=w, num_heads=_HEADS.value, num_kv_heads=_HEADS.value))
  m.memory.update(dict(kind="lm2", num_slots=w, num_heads=_HEADS.value))
  cfg = ModelConfig.from_config(m)
  layer = LM2Memory(cfg)
  h_BLD = jax.random.normal(jax.random.key(1), (_BATCH.value, w, w))
  state = LM2Memory.init_state(cfg.memory, _BATCH.value)

  def read_write(module, state, h_BLD):
    delta_BLD, stats = module.read(state, h_BLD)
    return delta_BLD, module.write(state, h_BLD, stats)

  params = layer.init(jax.random.key(0), state, h_BLD, method=read_write)["params"]
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
  opt_state = tx.init(params)

  def loss_fn(p):
    delta_BLD, new_state = layer.apply({"params": p}, state, h_BLD, method=read_write)
    return jnp.mean(delta_BLD ** 2) + jnp.mean(new_state["slots"] ** 2)

  @jax.jit
  def train_step(p, o):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  def step():
    nonlocal params, opt_state
    params, opt_state, loss = train_step(params, opt_state)
    jax.block_until_ready(loss)

  return step, sum(x.size for x in jax.tree.leaves(params))


def _torch_step(model, loss_fn, x):
  """One torch training step: forward, backward, clipping, AdamW (as our trainer's optimizer)."""
  import torch

  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

  def step():
    opt.zero_grad(set_to_none=True)
    loss_fn(x).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  return step, sum(p.numel() for p in model.parameters())


def _rmt_pytorch():
  import torch
  from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer, RecurrentMemoryTransformerWrapper

  model = RecurrentMemoryTransformerWrapper(RecurrentMemoryTransformer(
      _D.value, num_tokens=_VOCAB.value, depth=_LAYERS.value, heads=_HEADS.value, dim_head=_D.value // _HEADS.value,
      num_memory_tokens=_SLOTS.value, seq_len=_SEG.value))
  x = torch.randint(0, _VOCAB.value, (_BATCH.value, _SEQ.value))
  return _torch_step(model, lambda x: model(x, return_loss=True)[0], x)


def _titans_pytorch():
  import torch
  from titans_pytorch import MemoryAsContextTransformer

  model = MemoryAsContextTransformer(
      num_tokens=_VOCAB.value, dim=_D.value, depth=_LAYERS.value, segment_len=_SEG.value, heads=_HEADS.value,
      dim_head=_D.value // _HEADS.value, num_longterm_mem_tokens=_SLOTS.value, num_persist_mem_tokens=4)
  x = torch.randint(0, _VOCAB.value, (_BATCH.value, _SEQ.value))
  return _torch_step(model, lambda x: model(x, return_loss=True), x)


def _lm2_official_layer():
  """The official MemoryModule (src/memory.py of --lm2_src), imported from its file, on [B, W, W] inputs."""
  import importlib.util

  import torch

  src = _LM2_SRC.value
  path = next((p for p in (os.path.join(src, "src", "memory.py"), os.path.join(src, "memory.py"))
               if os.path.exists(p)), None)
  if path is None:
    raise ModuleNotFoundError(f"--lm2_src={src!r}: neither src/memory.py nor memory.py is there; pass the "
                              "directory of the official LM2 source")
  if not torch.cuda.is_available():
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # its RepeatLinear calls .cuda(); keep it on the CPU
  spec = importlib.util.spec_from_file_location("lm2_official_memory", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  w = _D.value
  layer = module.MemoryModule(mem_slots=w, head_size=w // _HEADS.value, hidden_dim=w, num_heads=_HEADS.value)
  h = torch.randn(_BATCH.value, w, w)
  memory = torch.eye(w).expand(_BATCH.value, w, w).contiguous()

  def loss_fn(h):
    out, new_memory = layer(h, memory, None)
    return out.square().mean() + new_memory.square().mean()

  return _torch_step(layer, loss_fn, h)


def _pin_threads(threads: int) -> None:
  """This process on its first `threads` cores; the thread pools of torch (OpenMP) and XLA follow."""
  cores = sorted(os.sched_getaffinity(0))[:threads]
  os.sched_setaffinity(0, cores)


def _worker(name: str) -> None:
  """Builds entry `name`, warms it up, then answers each 'step' line on stdin with one step's seconds. Messages go
  to the original stdout as JSON lines; anything the libraries print goes to stderr."""
  proto = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)
  _pin_threads(_THREADS.value)
  compile_cache.enable()
  tokens = _BATCH.value * (_D.value if name in LAYER_PAIR else _SEQ.value)
  builders = {"ours/lm2-layer": _ours_lm2_layer, "rmt-pytorch": _rmt_pytorch, "titans-pytorch": _titans_pytorch,
              "lm2-official/layer": _lm2_official_layer}
  info = {}
  try:
    if name.startswith("ours/") and name not in LAYER_PAIR:
      kind, _, spec = name.removeprefix("ours/").partition(":")
      step, params, info["flops_per_token"] = _ours(kind, _overrides(spec))
      from lm2_jax.train.flops import measure_peak_flops
      info["peak_flops"] = _PEAK.value or measure_peak_flops()
    else:
      if name not in LAYER_PAIR or name == "lm2-official/layer":
        import torch
        torch.set_num_threads(_THREADS.value)
        torch.manual_seed(0)
      step, params = builders[name]()
  except ModuleNotFoundError as e:
    proto.write(json.dumps({"skip": f"{name}: skipped ({e}; {PEERS_HINT})"}) + "\n")
    return
  t0 = time.perf_counter()
  step()  # compilation (ours) or first-call overheads (torch)
  first_s = time.perf_counter() - t0
  step()
  proto.write(json.dumps({"ready": name, "params": params, "tokens": tokens, "first_s": first_s, **info}) + "\n")
  for line in sys.stdin:
    if line.strip() != "step":
      break
    t0 = time.perf_counter()
    step()
    proto.write(json.dumps({"seconds": time.perf_counter() - t0}) + "\n")


# ----------------------------------------------------------------------------------------------------- parent


class Worker:
  """A worker process for one entry; `ask()` runs one step there and returns its seconds."""

  def __init__(self, name: str, argv: list[str]):
    self.name = name
    self.log = tempfile.TemporaryFile(mode="w+")
    env = {**os.environ, "OMP_NUM_THREADS": str(_THREADS.value), "MKL_NUM_THREADS": str(_THREADS.value)}
    self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.peers", f"--worker={name}", *argv],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                 env=env, bufsize=1)
    self.info = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      self.log.seek(0)
      tail = self.log.read()[-3000:]
      raise RuntimeError(f"worker {self.name} exited ({self.proc.wait()}) without answering; its stderr ends:\n{tail}")
    return json.loads(line)

  def ask(self) -> float:
    self.proc.stdin.write("step\n")
    return self._read()["seconds"]

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()
    self.log.close()


def _forwarded_flags() -> list[str]:
  names = ("compile_cache", "steps", "threads", "lm2_src", "peak_flops", "batch", "seq_len", "d_model", "layers",
           "heads", "d_ff", "segment_len", "vocab", "slots", "titans_chunk")
  return [f"--{n}={flags.FLAGS[n].value}" for n in names if flags.FLAGS[n].value is not None]


def main(argv):
  del argv
  if _WORKER.value:
    return _worker(_WORKER.value)
  entries = list(_ENTRIES.value)
  for name in entries:
    if name.partition(":")[0] not in (*OURS, *PEERS) or (":" in name and not name.startswith("ours/")):
      raise app.UsageError(f"--entries: unknown entry {name!r}; the entries are {[*OURS, *PEERS]}, ours "
                           "optionally with model overrides after a colon (ours/none:remat_policy=full)")
    if ":" in name:
      _overrides(name.partition(":")[2])  # a malformed override fails here, before any worker starts
  if _LM2_SRC.value:
    entries += LAYER_PAIR
  print(f"machine: {machine()}")
  print(f"shape: batch {_BATCH.value} x {_SEQ.value} tokens, width {_D.value}, {_LAYERS.value} layers, "
        f"{_HEADS.value} heads, {_SEG.value}-token segments, vocab {_VOCAB.value}, {_SLOTS.value} memory slots, "
        f"float32; train step = forward + backward + AdamW; {_THREADS.value} threads per entry; median of "
        f"{_STEPS.value} interleaved steps", flush=True)
  workers = []
  for name in entries:  # one at a time, so that no compilation competes with another
    worker = Worker(name, _forwarded_flags())
    if "skip" in worker.info:
      print(worker.info["skip"], flush=True)
      worker.close()
    else:
      workers.append(worker)
  times = {w.name: [] for w in workers}
  for _ in range(_STEPS.value):
    for w in workers:
      times[w.name].append(w.ask())
  for w in workers:
    w.close()

  rate = {}
  peaks = [w.info["peak_flops"] for w in workers if w.info.get("peak_flops")]
  peak = max(peaks) if peaks else None
  if peak:
    print(f"\nfloat32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({'--peak_flops' if _PEAK.value else 'measured'})")
  print("\n| entry | params | first step s | median step ms | min-max ms | tokens/s | model GFLOP/s | MFU |\n"
        "|---|---|---|---|---|---|---|---|")
  for w in workers:
    t = times[w.name]
    rate[w.name] = w.info["tokens"] / statistics.median(t)
    fpt = w.info.get("flops_per_token")
    achieved = f"{fpt * rate[w.name] / 1e9:.1f} | {fpt * rate[w.name] / peak:.1%}" if fpt and peak else "- | -"
    print(f"| {w.name} | {w.info['params']:,} | {w.info['first_s']:.1f} | {1e3 * statistics.median(t):.0f} | "
          f"{1e3 * min(t):.0f}-{1e3 * max(t):.0f} | {rate[w.name]:,.0f} | {achieved} |")
  ours = [n for n in rate if n.startswith("ours/") and n not in LAYER_PAIR]
  peers = [n for n in rate if n in PEERS]
  if ours and peers:
    print("\nours / peer, tokens/s:\n\n| ours | " + " | ".join(peers) + " |\n|---|" + "---|" * len(peers))
    for o in ours:
      print(f"| {o} | " + " | ".join(f"{rate[o] / rate[p]:.2f}x" for p in peers) + " |")
  if all(n in rate for n in LAYER_PAIR):
    print(f"\nmemory layer alone: ours/lm2-layer / lm2-official/layer = "
          f"{rate[LAYER_PAIR[0]] / rate[LAYER_PAIR[1]]:.2f}x")


if __name__ == "__main__":
  app.run(main)
