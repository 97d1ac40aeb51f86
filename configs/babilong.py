"""BABILong benchmark configs: one decoder, one training budget, a memory kind per config.

    python -m benchmarks.babilong                          # trains and evaluates the family, writes the table
    python -m launch.train --config=configs/babilong_lm2.py --workdir=workdir/babilong/lm2

`get_config(kind)` builds the family (`configs/babilong_<kind>.py` call it): 4 layers, d_model 64, 128-token
segments, trained on qa1 BABILong samples (loss on the answers; `--config.data.tasks=qa1,qa2,qa3,qa4,qa5` for the
mixture) with a curriculum from the bare bAbI stories (0K) to 1,920 tokens of distractor text (1 to 16 segments),
for 1500 steps of 2 x 2048 tokens (6.1M tokens).

Every sample lies whole in one 2,048-token row and starts a segment (`data.align_documents`), and gradients flow
through the memory across all its segments (`model.bptt_segments=0`): the question's loss reaches back to the
facts however far before it they are (issue 11, hypothesis 1). Until 2026-11-23 the family trained on the
qa1-qa5 mixture in 8 x 512-token rows laid end to end, 1000 steps: a sample longer than what was left of a row
continued in the next batch, where the carried memory is a constant, so no gradient crossed from a question to a
fact in the previous row. lm2 and hierarchical write through a per-token write gate and start their forget gates
at +3 (`memory.write_gate`, `memory.forget_bias`; lm2.py). Remat (full) and 4 unrolled segments per scan
iteration make the CPU step faster (README, Performance). Every kind is brought to the parameter count of `lm2`
by widening the feed-forward layers (`match_parameters`), so rows compare like with like.
Kinds: lm2, hierarchical, rmt, armt, none (window: one segment), full (none with attention over the whole input at
evaluation; trained like none but with 512-token windows, a whole training row).
"""

from configs import defaults

KINDS = ("lm2", "hierarchical", "rmt", "armt", "none", "full")


def _base():
  config = defaults.get_config()
  m = config.model
  m.vocab_size = 768
  m.d_model = 64
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 4
  m.d_ff = 256
  m.segment_len = 128
  m.bptt_segments = 0
  m.remat_policy = "full"
  m.segment_unroll = 4
  m.memory.num_heads = 4
  m.memory.num_slots = 16
  m.memory.update(dict(general_slots=8, num_banks=16, bank_slots=8, top_k=1, write_tokens=8))
  m.memory.write_gate = True  # lm2, hierarchical
  m.memory.forget_bias = 3.0  # lm2, hierarchical: a slot keeps sigmoid(3) = 0.95 of itself per segment at first

  d = config.data
  d.kind = "babilong"
  d.tokenizer = "workdir/babilong/spm.model"  # trained here on built-in text on first use
  d.tasks = "qa1"
  d.curriculum = "0:0,256,512 7500:0,512,1024,1920"  # about steps 0-600, then 1 to 16 segments
  d.align_documents = 128  # a sample starts a segment, as at evaluation, and never crosses a row
  d.continuing_stream = True  # a sample longer than a row (none in training) continues in the next batch
  d.seed = 0

  t = config.train
  t.steps = 1500
  t.batch_size = 2
  t.seq_len = 2048
  t.learning_rate = 3e-3
  t.warmup_steps = 50
  t.weight_decay = 0.01
  t.log_every = 50
  config.checkpoint.every = 250
  config.checkpoint.keep = 1

  config.eval.lengths = "0,1024,2048,4096,8192,16384"
  config.eval.samples = 100
  return config


def count_parameters(model_config) -> int:
  from lm2_jax.model import LM2Model, count_params  # local: configs stay cheap to import
  return count_params(LM2Model(model_config))["total"]


def match_parameters(config, target: int) -> None:
  """Sets model.d_ff (a multiple of 4) so that the parameter count is as close as possible to `target` (a step of
  8 missed by up to 1% once lm2 had its write gate)."""
  m = config.model
  low = count_parameters(m)
  m.d_ff += 4
  per_step = count_parameters(m) - low
  m.d_ff = max(4, m.d_ff - 4 + round((target - low) / per_step) * 4)


def get_config(kind: str = "lm2"):
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}: use one of {KINDS}")
  config = _base()
  reference = _base()
  reference.model.memory.kind = "lm2"
  target = count_parameters(reference.model)
  config.model.memory.kind = "none" if kind == "full" else kind
  if kind == "full":
    config.model.segment_len = config.train.seq_len
    config.eval.full_attention = True
  if kind != "lm2":
    match_parameters(config, target)
  return config
