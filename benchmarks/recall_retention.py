r"""How long does a trained memory keep a fact? Recall accuracy by the number of segments between fact and question.

  python -m benchmarks.recall_retention --workdirs=lm2=DIR/lm2,rmt=DIR2/rmt [--segments=16] [--samples=1024]
                                        [--out=DIR3]

Workdirs given under one name (e.g. two seeds: lm2=DIR_S0/lm2,lm2=DIR_S1/lm2) are pooled: one curve, the
questions of all of them.

Each workdir holds a model trained on the recall task (`launch.quickstart`, `configs/quickstart.py`: pairs in the
first 3 segments, questions in the 4th). Its newest checkpoint answers held-out samples `--segments` segments long
(the quickstart's 4x length by default), from a fresh memory, the whole row in one call. Every question
`[Q, k, v]` of the last segment is put in the bin of its distance d = (last segment) - (segment that holds the
pair k v): the pair was written d - 1 segments of filler before the question's segment began, and each of those
segments wrote into the memory too. A pair is always seen through the memory (a model's window is one segment),
so the accuracy at distance d is the model's own read of what its memory kept over d segment writes: a
retention curve. Trained, every distance was 1-3.

Prints, per model, the accuracy and the number of questions at each distance (and each name's pooled accuracy),
and writes DIR3/recall_retention.json and recall_retention.png (one curve per name, chance marked). For `lm2`
models it also reports what the write does with pairs and filler (`lm2_jax.evaluate.recall.write_gates_by_token`:
the mean write strength of pair keys, pair values and filler tokens, and the mean input and forget gates of
segments with a pair and of filler-only segments, over the context segments of the same samples), per name.
"""

import json
import os

from absl import flags

from launch import cli
from lm2_jax.data import recall
from lm2_jax.evaluate.recall import recall_by_distance, write_gates_by_token
from lm2_jax.model.config import ConfigError
from lm2_jax.train import trainer

_WORKDIRS = flags.DEFINE_list("workdirs", None, "name=DIR pairs: trained recall models (DIR holds checkpoints/).")
_SEGMENTS = flags.DEFINE_integer("segments", 16, "Segments per evaluated sample (trained: config.data.num_segments).")
_SAMPLES = flags.DEFINE_integer("samples", 1024, "Held-out samples per model.")
_BATCH = flags.DEFINE_integer("batch", 64, "Samples per forward call.")
_OUT = flags.DEFINE_string("out", "workdir/recall_retention", "Where the JSON and the plot go.")


def retention(workdir: str, segments: int, samples: int, batch: int):
  """-> (chance, {distance: [correct, count]}, the write's gate statistics or None) for the newest checkpoint in
  `workdir`."""
  config, setup, state = trainer.restore(workdir)
  if config.data.kind != "recall":
    raise ConfigError(f"--workdirs: {workdir!r} was trained on data.kind={config.data.kind!r}; this benchmark "
                      "needs a recall model (launch.quickstart)")
  task = recall.from_config(config, num_segments=segments, seed_offset=10_000)
  return (task.chance, recall_by_distance(setup, state.params, task, num_samples=samples, batch_size=batch),
          write_gates_by_token(setup, state.params, task, num_samples=samples, batch_size=batch))


def main(argv):
  del argv
  if not _WORKDIRS.value:
    raise ConfigError("--workdirs: name at least one name=DIR of a trained recall model")
  os.makedirs(_OUT.value, exist_ok=True)
  pooled, workdirs, chance, gates = {}, {}, None, {}
  for spec in _WORKDIRS.value:
    name, sep, workdir = spec.partition("=")
    if not sep:
      raise ConfigError(f"--workdirs: {spec!r} is not name=DIR")
    chance, bins, model_gates = retention(workdir, _SEGMENTS.value, _SAMPLES.value, _BATCH.value)
    print(f"{name} ({workdir}): accuracy by distance in segments (questions)")
    print("  " + ", ".join(f"{d}: {c / n:.3f} ({n})" for d, (c, n) in bins.items()), flush=True)
    if model_gates is not None:
      print("  write: " + ", ".join(f"{k} {v:.3f}" for k, v in model_gates.items()), flush=True)
      gates.setdefault(name, []).append(model_gates)
    workdirs.setdefault(name, []).append(workdir)
    for d, (c, n) in bins.items():
      pooled.setdefault(name, {}).setdefault(d, [0, 0])
      pooled[name][d][0] += c
      pooled[name][d][1] += n
  results = {name: {"workdirs": workdirs[name], "by_distance": {d: {"accuracy": c / n, "questions": n}
                                                                for d, (c, n) in sorted(bins.items())}}
             for name, bins in pooled.items()}
  for name, per_model in gates.items():  # the mean over the name's models (each an average over equal samples)
    results[name]["write_gates"] = {k: sum(g[k] for g in per_model) / len(per_model) for k in per_model[0]}
  for name, r in results.items():
    if len(workdirs[name]) > 1:
      print(f"{name}, {len(workdirs[name])} models pooled: "
            + ", ".join(f"{d}: {b['accuracy']:.3f}" for d, b in r["by_distance"].items()))
      if "write_gates" in r:
        print("  write: " + ", ".join(f"{k} {v:.3f}" for k, v in r["write_gates"].items()))
  with open(os.path.join(_OUT.value, "recall_retention.json"), "w") as f:
    json.dump({"segments": _SEGMENTS.value, "samples": _SAMPLES.value, "chance": chance, "models": results}, f,
              indent=2)
  from matplotlib.figure import Figure  # not pyplot: no global backend switch

  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for name, r in results.items():
    ds = sorted(r["by_distance"])
    ax.plot(ds, [r["by_distance"][d]["accuracy"] for d in ds], marker="o", label=name)
  ax.axhline(chance, color="gray", ls=":", label="chance")
  ax.set(xlabel="segments from the pair's segment to the question's", ylabel="recall accuracy", ylim=(0, 1),
         title=f"retention ({_SEGMENTS.value}-segment samples)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(_OUT.value, "recall_retention.png"), dpi=100)
  print(f"wrote {_OUT.value}/recall_retention.json and recall_retention.png")


if __name__ == "__main__":
  cli.run(main)
