r"""The main job: LM2 against the same decoder without memory on multi-query associative recall.

  python -m launch.quickstart [--workdir=workdir/quickstart] [--config.train.steps=...]
  python -m launch.quickstart --config=configs/recall_capacity.py --kinds=lm2,hierarchical --workdir=DIR

Trains configs/quickstart.py twice (memory 'lm2', then 'none' with a window of one segment), evaluates recall on
held-out samples at the trained length and at 4x, prints the table, and writes DIR/quickstart_results.json and
DIR/learning_curves.png. Each run resumes from DIR/<kind>/checkpoints if it was interrupted.
"""

import json
import os
import time

from absl import flags
from ml_collections import config_flags

from launch import cli
from lm2_jax.data import recall
from lm2_jax.evaluate.recall import plot_learning_curves, recall_accuracy
from lm2_jax.parallel import distributed
from lm2_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/quickstart", "Output directory.")
_EVAL_SAMPLES = flags.DEFINE_integer("eval_samples", 512, "Held-out samples per evaluated length.")
_KINDS = flags.DEFINE_list("kinds", ["lm2", "none"], "Memory kinds to train and compare, same decoder.")
LENGTH_MULTIPLIERS = (1, 4)


def main(argv):
  del argv
  base = cli.checked(_CONFIG.value)
  distributed.initialize(base)
  t0 = time.time()
  results = {"chance": recall.from_config(base).chance, "steps": base.train.steps, "accuracy": {}, "train_s": {}}
  kinds = _KINDS.value
  for kind in kinds:
    config = base.copy_and_resolve_references()
    config.model.memory.kind = kind
    workdir = os.path.join(_WORKDIR.value, kind)
    start = time.time()
    state = trainer.train(config, workdir)
    results["train_s"][kind] = round(time.time() - start, 1)
    setup = trainer.build(config)
    results["accuracy"][kind] = {}
    for mult in LENGTH_MULTIPLIERS:
      task = recall.from_config(config, num_segments=config.data.num_segments * mult, seed_offset=10_000)
      acc = recall_accuracy(setup, state.params, task, num_samples=_EVAL_SAMPLES.value,
                            batch_size=config.train.batch_size)
      results["accuracy"][kind][f"{task.seq_len}_tokens"] = acc
  results["wall_s"] = round(time.time() - t0, 1)

  lengths = list(results["accuracy"][kinds[0]])
  print(f"\nrecall accuracy on held-out samples (chance {results['chance']:.3f}, {base.train.steps} steps each)")
  print("| memory | " + " | ".join(f"{l.replace('_', ' ')}{' (trained)' if i == 0 else ''}"
                                     for i, l in enumerate(lengths)) + " |")
  print("|---" * (len(lengths) + 1) + "|")
  for kind in kinds:
    print(f"| {kind} | " + " | ".join(f"{results['accuracy'][kind][l]:.3f}" for l in lengths) + " |")
  print(f"wall time {results['wall_s']:.0f} s")

  with open(os.path.join(_WORKDIR.value, "quickstart_results.json"), "w") as f:
    json.dump(results, f, indent=2)
  plot_learning_curves({k: os.path.join(_WORKDIR.value, k) for k in kinds},
                       os.path.join(_WORKDIR.value, "learning_curves.png"))
  print(f"wrote {_WORKDIR.value}/quickstart_results.json and learning_curves.png")


if __name__ == "__main__":
  cli.run(main)
