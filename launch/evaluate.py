r"""Evaluates a training checkpoint: recall accuracy (recall task), BABILong accuracy by task and length
(babilong), or loss/perplexity (document sources).

  python -m launch.evaluate --workdir=DIR [--step=N] [--length_multipliers=1,4] [--num_batches=50]
  python -m launch.evaluate --workdir=DIR [--babilong_lengths=0,1024,4096] [--eval_samples=50]

Uses the config the checkpoint was written with (or --config, which must be compatible). For the recall task:
held-out samples at each multiple of the trained length. For text, ArrayRecord and TFDS sources: the held-out
documents of `config.data.eval_paths` / `config.data.tfds_eval_split`. For BABILong: greedy answers to test
samples of `config.data.tasks` at each length, generated through the segment recurrence (settings from
`config.eval`, see configs/babilong.py); also writes DIR/babilong_<step>.md (the table) and .png (a heatmap).
Prints the results and writes DIR/eval_<step>.json.
"""

import json
import os

from absl import flags
from etils import epath
from ml_collections import config_flags

from launch import cli
from lm2_jax.data import recall
from lm2_jax.data.pipeline import babilong_tasks, make_batches
from lm2_jax.evaluate.babilong import babilong_results, write_report
from lm2_jax.evaluate.language_model import stream_metrics
from lm2_jax.evaluate.recall import recall_accuracy
from lm2_jax.model.config import ConfigError
from lm2_jax.parallel import use_mesh
from lm2_jax.train import trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with checkpoints/.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Optional config; default: the checkpoint's own.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_MULTS = flags.DEFINE_list("length_multipliers", ["1", "4"], "Recall: evaluated lengths, in trained lengths.")
_SAMPLES = flags.DEFINE_integer("eval_samples", None, "Recall: held-out samples per length (default 512); "
                                "BABILong: test samples per task and length (default config.eval.samples).")
_BABILONG_LENGTHS = flags.DEFINE_list("babilong_lengths", None, "BABILong: lengths in tokens (default "
                                      "config.eval.lengths).")
_BATCHES = flags.DEFINE_integer("num_batches", 50, "Documents: held-out batches.")
flags.mark_flags_as_required(["workdir"])


def held_out_config(config):
  """The config with its data source switched to the held-out documents, in order."""
  config = config.copy_and_resolve_references()
  d = config.data
  if d.kind == "tfds":
    d.tfds_split = d.tfds_eval_split
  else:
    if not d.eval_paths:
      raise ConfigError(f"config.data.eval_paths={d.eval_paths!r}: set it to held-out files to evaluate a "
                        f"data.kind={d.kind!r} run (--config.data.eval_paths=...)")
    d.paths = d.eval_paths
  d.shuffle_seed = None
  return config


def babilong(config, setup, params, prefix: str) -> dict:
  """BABILong accuracy by task and length; writes PREFIX.{json,md,png}."""
  lengths = [int(n) for n in (_BABILONG_LENGTHS.value or config.eval.lengths.split(","))]
  result = babilong_results(config, setup.model, params, lengths, _SAMPLES.value or config.eval.samples)
  name = config.model.memory.kind + (" (full attention)" if config.eval.full_attention else "")
  print(write_report({name: result}, babilong_tasks(config), lengths, prefix))
  return {"babilong": result}


def evaluate(config, setup, params, workdir: str, step: int) -> dict:
  if config.data.kind == "babilong":
    return babilong(config, setup, params, os.path.join(workdir, f"babilong_{step}"))
  if config.data.kind == "recall":
    results = {}
    for mult in (int(m) for m in _MULTS.value):
      task = recall.from_config(config, num_segments=config.data.num_segments * mult, seed_offset=10_000)
      results[f"recall_accuracy_{task.seq_len}_tokens"] = recall_accuracy(
          setup, params, task, num_samples=_SAMPLES.value or 512, batch_size=config.train.batch_size)
    results["chance"] = recall.from_config(config).chance
    return results
  with use_mesh(setup.mesh):
    return stream_metrics(setup, params, make_batches(held_out_config(config)), num_batches=_BATCHES.value)


def main(argv):
  del argv
  config, setup, state = trainer.restore(_WORKDIR.value, _CONFIG.value and cli.checked(_CONFIG.value),
                                          _STEP.value)
  step = int(state.step)
  results = {"step": step, **evaluate(config, setup, state.params, _WORKDIR.value, step)}
  for name, value in results.items():
    if isinstance(value, dict):
      continue
    print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
  path = epath.Path(_WORKDIR.value) / f"eval_{step}.json"
  path.write_text(json.dumps(results, indent=2))
  print(f"wrote {path}")


if __name__ == "__main__":
  cli.run(main)
