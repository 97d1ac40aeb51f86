r"""BABILong benchmark: trains each memory kind of configs/babilong.py with the same budget, then evaluates greedy
answers by task and length.

  python -m benchmarks.babilong [--kinds=lm2,hierarchical,rmt,none,full] [--workdir=workdir/babilong]
      [--lengths=0,1024,2048,4096,8192,16384] [--samples=20] [--steps=N]

Each kind trains in WORKDIR/<kind> (resuming from its checkpoints) and is evaluated on the same test samples.
Prints the table in the layout of LM2's Table 1 and writes WORKDIR/babilong.{json,md,png}.
"""

import os
import time

from absl import app, flags

from configs import babilong as family
from lm2_jax.data.pipeline import babilong_tokenizer
from lm2_jax.evaluate.babilong import babilong_accuracy, write_report
from lm2_jax.model import count_params
from lm2_jax.train import trainer

_KINDS = flags.DEFINE_list("kinds", list(family.KINDS), "Configs of the family to train and evaluate.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/babilong", "Output directory.")
_LENGTHS = flags.DEFINE_list("lengths", None, "Evaluated lengths in tokens; default: the config's eval.lengths.")
_SAMPLES = flags.DEFINE_integer("samples", None, "Test samples per task and length; default: eval.samples.")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps; default: the config's train.steps.")


def evaluate_kind(config, params, model, lengths, samples, log=print) -> dict:
  """The BABILong results of one trained model under its config's eval settings."""
  e, d = config.eval, config.data
  return babilong_accuracy(
      model, params, babilong_tokenizer(config), tasks=[t.strip() for t in d.tasks.split(",")], lengths=lengths,
      num_samples=samples, seed=d.seed, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
      distractor=d.distractor or None, full_attention=e.full_attention, full_attention_max=e.full_attention_max,
      log=log)


def main(argv):
  del argv
  models, budget = {}, {}
  for kind in _KINDS.value:
    config = family.get_config(kind)
    if _STEPS.value:
      config.train.steps = _STEPS.value
      config.train.warmup_steps = min(config.train.warmup_steps, _STEPS.value // 10)
    lengths = [int(n) for n in (_LENGTHS.value or config.eval.lengths.split(","))]
    samples = _SAMPLES.value or config.eval.samples
    workdir = os.path.join(_WORKDIR.value, kind)
    print(f"== {kind}: training {config.train.steps} steps of {config.train.batch_size} x {config.train.seq_len} "
          f"tokens in {workdir}", flush=True)
    t0 = time.time()
    state = trainer.train(config, workdir)
    train_s = time.time() - t0
    setup = trainer.build(config)
    t0 = time.time()
    models[kind] = evaluate_kind(config, state.params, setup.model, lengths, samples)
    budget[kind] = {"steps": config.train.steps, "tokens": config.train.steps * config.train.batch_size *
                    config.train.seq_len, "train_s": round(train_s, 1), "eval_s": round(time.time() - t0, 1),
                    "parameters": count_params(setup.model)["total"]}
    print(f"{kind}: {budget[kind]}", flush=True)
  tasks = [t.strip() for t in family.get_config(_KINDS.value[0]).data.tasks.split(",")]
  table = write_report(models, tasks, lengths, os.path.join(_WORKDIR.value, "babilong"),
                       extra={"budget": budget, "samples": samples})
  print(f"\nBABILong accuracy (%), {samples} test samples per task and length\n{table}")
  print(f"wrote {_WORKDIR.value}/babilong.json, .md and .png")


if __name__ == "__main__":
  app.run(main)
