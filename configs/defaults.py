"""Defaults shared by every config: each experiment file starts from `get_config()` here and changes fields.

Field names are stable (DESIGN section 3): scripts, notebooks and command-line overrides depend on them.
"""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.vocab_size = 32000
  m.d_model = 512
  m.num_layers = 8
  m.num_heads = 8
  m.num_kv_heads = 8
  m.d_ff = 1376
  m.rope_theta = 500000.0
  m.rope_scaling = ml_collections.config_dict.placeholder(dict)  # None, or a llama3 scaling dict
  m.tie_embeddings = False
  m.norm_eps = 1e-5
  m.segment_len = 256          # tokens per segment; attention never reaches across segments
  m.bptt_segments = 4          # gradient window through the carried memory, in segments (0: unlimited)
  m.dtype = "float32"          # compute dtype; parameters stay float32
  m.scan_layers = True
  m.remat_policy = "none"      # none | full | dots | dots_with_no_batch_dims

  m.memory = ml_collections.ConfigDict()
  m.memory.kind = "none"       # none | lm2
  m.memory.layers = "all"      # 'all' or a list of layer indices
  m.memory.num_slots = 64
  m.memory.num_heads = 8
  m.memory.slot_dim = 0        # 0: d_model
  m.memory.read_decay = 0.99   # per-segment decay of the read statistics kept in the memory state
  return m


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_config()

  config.train = ml_collections.ConfigDict()
  config.train.seed = 0
  config.train.batch_size = 8
  config.train.seq_len = 1024

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  return config
