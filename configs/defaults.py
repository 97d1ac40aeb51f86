"""Defaults shared by every config: each experiment file starts from `get_config()` here and changes fields.

Field names are stable (DESIGN section 3): scripts, notebooks and command-line overrides depend on them.
"""

import ml_collections

from lm2_jax.model.config import default_model_config
from lm2_jax.train.config import DEFAULT_WINDOW_TOKENS


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = default_model_config()

  config.data = ml_collections.ConfigDict()
  config.data.kind = "recall"           # recall (built-in task) | text_files | array_record | tfds | babilong
  config.data.continuing_stream = False  # True: the memory of one batch is carried into the next
  config.data.align_documents = 0      # 0: documents end to end; U tokens (a divisor of train.seq_len, e.g.
                                        # model.segment_len): a document starts a U-token unit unless it fits in
                                        # the rest of one, and one no longer than a row is never split (padding)
  config.data.shuffle_seed = ml_collections.config_dict.placeholder(int)  # None: sources in order
  # Document sources (packed into continuing streams with document ids; lm2_jax.data.pipeline):
  config.data.paths = ""                # text_files / array_record: comma-separated files or globs
  config.data.eval_paths = ""           # the same, for launch.evaluate
  config.data.text_split = "file"       # text_files: one document per file | paragraph | line
  config.data.tokenizer = ""            # text_files / tfds: a SentencePiece .model (launch.train_tokenizer);
                                        # babilong: trained there on built-in text if missing
  config.data.tfds_name = ""            # tfds: a dataset prepared offline in ArrayRecord format
  config.data.tfds_split = "train"
  config.data.tfds_eval_split = "validation"
  config.data.tfds_data_dir = ""
  config.data.text_feature = "text"
  # BABILong (kind 'babilong'; lm2_jax.data.babi.training), seeded by data.seed:
  config.data.tasks = "qa1,qa2,qa3,qa4,qa5"  # bAbI tasks, drawn round-robin
  config.data.curriculum = "0:0"        # 'from_sample:lengths ...': lengths (tokens) drawn per sample, by stage
  config.data.questions = 1             # qa1 only: questions per training sample (more ask about other people)
  config.data.distractor = ""           # '': built-in prose; a folder of .txt files (e.g. PG19 books); or
                                        # 'tfds:NAME' (e.g. tfds:pg19, prepared offline; tfds_* fields below)
  # The recall task (kind 'recall'):
  config.data.seed = 0
  config.data.num_segments = 4
  config.data.num_pairs = 8
  config.data.num_queries = 4
  config.data.num_keys = 64
  config.data.num_values = 64
  config.data.num_filler = 64

  config.train = ml_collections.ConfigDict()
  config.train.seed = 0
  config.train.steps = 1000
  config.train.batch_size = 8
  config.train.seq_len = 1024
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 100       # clipped to steps - 1 when longer than the run
  config.train.final_lr_fraction = 0.1
  config.train.b1 = 0.9
  config.train.b2 = 0.95
  config.train.weight_decay = 0.1
  config.train.grad_clip_norm = 1.0
  config.train.grad_accum_steps = 1
  # A row longer than train.window_tokens runs in windows of whole bptt windows (model.bptt_segments x segment_len),
  # one forward/backward at a time: the same gradients, memory per step flat in the row's length (0: the whole row
  # at once).
  config.train.window_tokens = DEFAULT_WINDOW_TOKENS
  config.train.log_every = 50
  config.train.peak_flops = 0.0         # FLOP/s that `mfu` in metrics.jsonl is relative to (0: measured at start)
  config.train.nonfinite = "stop"       # a step with a non-finite loss, gradient or update: 'stop' with a
                                        # diagnosis (the last checkpoint is good), or 'skip' it (no update)

  config.eval = ml_collections.ConfigDict()  # BABILong evaluation (launch.evaluate, benchmarks.babilong)
  config.eval.lengths = "0,1024,2048,4096"  # tokens of distractor text and story
  config.eval.samples = 50              # test samples per task and length
  config.eval.batch_size = 10
  config.eval.max_new_tokens = 6        # generation stops earlier at '.' or eos
  config.eval.full_attention = False    # memory kind 'none' only: the whole input as one segment
  config.eval.full_attention_max = 4096  # longer inputs are not run with full attention

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 500
  config.checkpoint.keep = 3

  config.distributed = ml_collections.ConfigDict()  # multi-process runs (lm2_jax.parallel.distributed)
  config.distributed.coordinator_address = ""  # 'host:port' of process 0; '': detected (SLURM, TPU, ...) or one process
  config.distributed.num_processes = 1
  config.distributed.process_id = 0

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  config.mesh.dcn_data = 1  # > 1: the data axis spans this many TPU slices (or hosts) over the data-centre network
  return config
