"""Capacity: associative recall with more key-value pairs than a flat LM2 memory has slots.

24 pairs among filler in 5 context segments of 32 tokens, 6 of them asked in the 6th. Flat `lm2` has 12 slots;
`hierarchical` reads as many per token (4 general slots + the 8 slots of its top-1 bank) out of 4 + 16 x 8 = 132.

  python -m launch.quickstart --config=configs/recall_capacity.py --kinds=lm2,hierarchical --workdir=DIR
"""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  m, d, t = config.model, config.data, config.train
  m.memory.num_slots = 12
  m.memory.update(dict(general_slots=4, num_banks=16, bank_slots=8, top_k=1, write_tokens=8))
  d.num_segments = 6
  d.num_pairs = 24
  d.num_queries = 6
  d.num_keys = 48
  m.vocab_size = 2 + d.num_keys + d.num_values + d.num_filler
  t.batch_size = 16
  t.seq_len = d.num_segments * m.segment_len
  return config
