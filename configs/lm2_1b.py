"""The LM2 paper's 1.7B model: a Llama-3.2-1B-shaped decoder (16 layers, d_model 2048, 32 heads, 8 kv heads,
FFN 8192) with 2048 memory slots of width 2048 in every layer.

On a GPU add --config.model.attention_kernel=cudnn: self-attention and the memory's read and write then run on
cuDNN flash attention (on one H100: llama3_2_1b's train step 2.3x faster than with 'xla'; lm2_1b's 1.29x faster
with the memory on flash attention than with self-attention alone; README, "On a GPU")."""

from configs import llama3_2_1b


def get_config():
  config = llama3_2_1b.get_config()
  m = config.model
  m.memory.kind = "lm2"
  m.memory.layers = "all"
  m.memory.num_slots = 2048
  m.memory.num_heads = 16
  m.memory.slot_dim = 2048
  m.bptt_segments = 4
  config.train.seq_len = 4 * m.segment_len
  return config
