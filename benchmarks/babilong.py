r"""BABILong benchmark: trains each memory kind of configs/babilong.py with the same budget, then evaluates greedy
answers by task and length.

  python -m benchmarks.babilong [--kinds=lm2,rmt,none,...] [--workdir=workdir/babilong]
      [--lengths=0,1024,2048,4096,8192,16384] [--samples=20] [--steps=N] [--tasks=qa1] [--curriculum=...]

--kinds defaults to every kind of the family (configs/babilong.py: KINDS). Each kind trains in WORKDIR/<kind>
(resuming from its checkpoints) and is evaluated on the same test samples; its results go to
WORKDIR/<kind>/babilong_result.json and are reused by a later run with the same steps, lengths, samples, tasks
and curriculum (so kinds can be run in separate processes, then gathered by a run over all of them). A workdir
trained on other tasks or another curriculum is refused: use a new --workdir. Prints the table in the layout of
LM2's Table 1 and writes WORKDIR/babilong.{json,md,png}.
"""

import json
import os
import time

from absl import flags

from configs import babilong as family
from launch import cli
from lm2_jax.data.pipeline import babilong_tasks
from lm2_jax.evaluate.babilong import babilong_results, write_report
from lm2_jax.model import count_params
from lm2_jax.model.config import ConfigError
from lm2_jax.train import trainer

_KINDS = flags.DEFINE_list("kinds", list(family.KINDS), "Configs of the family to train and evaluate.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/babilong", "Output directory.")
_LENGTHS = flags.DEFINE_list("lengths", None, "Evaluated lengths in tokens; default: the config's eval.lengths.")
_SAMPLES = flags.DEFINE_integer("samples", None, "Test samples per task and length; default: eval.samples.")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps; default: the config's train.steps.")
_TASKS = flags.DEFINE_string("tasks", None, "bAbI tasks to train and evaluate (data.tasks), e.g. qa1.")
_CURRICULUM = flags.DEFINE_string("curriculum", None, "data.curriculum: 'from_sample:lengths ...'.")


def _train_seconds(workdir: str, tokens_per_step: int) -> float:
  """Training wall time from the trainer's log (tokens per logging interval over its tokens/s), resumes included."""
  seconds, last_step = 0.0, 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for row in map(json.loads, f):
      if row["step"] > last_step:
        seconds += (row["step"] - last_step) * tokens_per_step / row["tokens_per_s"]
        last_step = row["step"]
  return seconds


def _check_same_data(workdir: str, config) -> None:
  """Refuses to continue (or re-evaluate) a run that was trained on other tasks or another curriculum."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)["data"]
  for field in ("tasks", "curriculum"):
    if saved.get(field) != config.data[field]:
      raise ConfigError(f"--{field}={config.data[field]!r}: {workdir} was trained with data.{field}="
                        f"{saved.get(field)!r}; pass the same, or a new --workdir")


def main(argv):
  del argv
  models, budget = {}, {}
  for kind in _KINDS.value:
    config = family.get_config(kind)
    if _STEPS.value:
      config.train.steps = _STEPS.value
      config.train.warmup_steps = min(config.train.warmup_steps, _STEPS.value // 10)
    config.data.tasks = _TASKS.value or config.data.tasks
    config.data.curriculum = _CURRICULUM.value or config.data.curriculum
    lengths = [int(n) for n in (_LENGTHS.value or config.eval.lengths.split(","))]
    samples = _SAMPLES.value or config.eval.samples
    workdir = os.path.join(_WORKDIR.value, kind)
    cached = os.path.join(workdir, "babilong_result.json")
    if os.path.exists(cached):
      with open(cached) as f:
        saved = json.load(f)
      key = (config.train.steps, lengths, samples, config.data.tasks, config.data.curriculum)
      if (saved["budget"]["steps"], saved["lengths"], saved["samples"], saved["tasks"], saved["curriculum"]) == key:
        models[kind], budget[kind] = saved["result"], saved["budget"]
        print(f"== {kind}: results of {cached}", flush=True)
        continue
    _check_same_data(workdir, config)
    print(f"== {kind}: training {config.train.steps} steps of {config.train.batch_size} x {config.train.seq_len} "
          f"tokens in {workdir}", flush=True)
    state = trainer.train(config, workdir)
    setup = trainer.build(config)
    t0 = time.time()
    models[kind] = babilong_results(config, setup.model, state.params, lengths, samples)
    tokens_per_step = config.train.batch_size * config.train.seq_len
    budget[kind] = {"steps": config.train.steps, "tokens": config.train.steps * tokens_per_step,
                    "train_s": round(_train_seconds(workdir, tokens_per_step), 1),
                    "eval_s": round(time.time() - t0, 1), "parameters": count_params(setup.model)["total"]}
    with open(cached, "w") as f:
      json.dump({"result": models[kind], "budget": budget[kind], "lengths": lengths, "samples": samples,
                 "tasks": config.data.tasks, "curriculum": config.data.curriculum}, f)
    print(f"{kind}: {budget[kind]}", flush=True)
  tasks = babilong_tasks(config)
  table = write_report(models, tasks, lengths, os.path.join(_WORKDIR.value, "babilong"),
                       extra={"budget": budget, "samples": samples})
  print(f"\nBABILong accuracy (%), {samples} test samples per task and length\n{table}")
  print(f"wrote {_WORKDIR.value}/babilong.json, .md and .png")


if __name__ == "__main__":
  cli.run(main)
