"""BABILong benchmark configs: one decoder, one training budget, a memory kind per config.

    python -m benchmarks.babilong                          # trains and evaluates the family, writes the table
    python -m launch.train --config=configs/babilong_lm2.py --workdir=workdir/babilong/lm2

`get_config(kind)` builds the family (`configs/babilong_<kind>.py` call it): 4 layers, d_model 64, 128-token
segments, trained on qa1-qa5 BABILong samples packed as continuing streams (loss on the answers), with a
curriculum from the bare bAbI stories (0K) to 1K tokens of distractor text: 1000 steps of 8 x 512 tokens, sized
to train each kind in 10-20 minutes on a 2-core CPU. Every kind is brought to the parameter count of `lm2` by
widening the feed-forward layers (`match_parameters`), so rows compare like with like.
Kinds: lm2, hierarchical, rmt, armt, titans, hmt, memoryllm, mplus (each at its defaults in configs/defaults.py
apart from the memory fields set here), none (window: one segment), full (none with attention over the whole input
at evaluation; trained like none but with 512-token windows, a whole training row).
"""

from configs import defaults

KINDS = ("lm2", "hierarchical", "rmt", "armt", "titans", "hmt", "memoryllm", "mplus", "none", "full")


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
  m.memory.num_heads = 4
  m.memory.num_slots = 16
  m.memory.update(dict(general_slots=8, num_banks=16, bank_slots=8, top_k=1, write_tokens=8))

  d = config.data
  d.kind = "babilong"
  d.tokenizer = "workdir/babilong/spm.model"  # trained here on built-in text on first use
  d.tasks = "qa1,qa2,qa3,qa4,qa5"
  d.curriculum = "0:0 16000:0,256,512 20000:0,512,1024"  # about steps 0-400, 400-700, 700-1000
  d.continuing_stream = True  # a sample longer than a row continues in the next batch, with its memory
  d.seed = 0

  t = config.train
  t.steps = 1000
  t.batch_size = 8
  t.seq_len = 512
  t.learning_rate = 3e-3
  t.warmup_steps = 50
  t.weight_decay = 0.01
  t.log_every = 50
  config.checkpoint.every = 250
  config.checkpoint.keep = 1

  config.eval.lengths = "0,1024,2048,4096,8192,16384"
  config.eval.samples = 20
  return config


def count_parameters(model_config) -> int:
  from lm2_jax.model import LM2Model, count_params  # local: configs stay cheap to import
  return count_params(LM2Model(model_config))["total"]


def match_parameters(config, target: int) -> None:
  """Sets model.d_ff (a multiple of 8) so that the parameter count is as close as possible to `target`."""
  m = config.model
  low = count_parameters(m)
  m.d_ff += 8
  per_step = count_parameters(m) - low
  m.d_ff = max(8, m.d_ff - 8 + round((target - low) / per_step) * 8)


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
