"""Tiny CPU config: a 2-layer LM2 model for tests, demos and debugging.

python -m launch.demo --config=configs/tiny.py
"""

from configs import defaults


def get_config():
  config = defaults.get_config()
  m = config.model
  m.vocab_size = 256
  m.d_model = 64
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 2
  m.d_ff = 128
  m.segment_len = 16
  m.bptt_segments = 2
  m.memory.kind = "lm2"
  m.memory.num_slots = 8
  m.memory.num_heads = 2
  config.train.batch_size = 4
  config.train.seq_len = 64
  return config
