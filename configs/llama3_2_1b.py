"""Llama-3.2-1B shape, no memory: the vanilla baseline, and the target of `launch/import_hf` weights.

16 layers, d_model 2048, 32 heads, 8 kv heads, FFN 8192, vocab 128256, tied embeddings, rope theta 500000 with
Llama-3 frequency scaling (factor 32).
"""

from configs import defaults


def get_config():
  config = defaults.get_config()
  m = config.model
  m.vocab_size = 128256
  m.d_model = 2048
  m.num_layers = 16
  m.num_heads = 32
  m.num_kv_heads = 8
  m.d_ff = 8192
  m.rope_theta = 500000.0
  m.rope_scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
  m.tie_embeddings = True
  m.norm_eps = 1e-5
  m.segment_len = 2048
  m.dtype = "bfloat16"
  m.remat_policy = "dots_with_no_batch_dims"
  m.memory.kind = "none"
  config.train.batch_size = 64
  config.train.seq_len = 2048
  return config
