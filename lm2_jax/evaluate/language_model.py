"""Next-token loss, perplexity and accuracy of trained parameters on held-out document streams."""

from __future__ import annotations

import math

import numpy as np

from lm2_jax.train import trainer


def stream_metrics(setup: trainer.Setup, params, data, *, num_batches: int) -> dict[str, float]:
  """Follows the held-out streams of `data` for `num_batches` batches, carrying the memory from batch to batch
  (reset where a row starts a document), as in training with a continuing stream.

  Returns the mean over batches of the per-batch token-mean loss and accuracy, and exp(loss) as perplexity.
  """
  step = trainer.make_eval_step(setup)
  memory = setup.model.init_memory(setup.batch_size)
  losses, accs = [], []
  for _ in range(num_batches):
    metrics, memory = step(params, trainer.put_batch(setup, next(data)), memory)
    losses.append(float(metrics["loss"]))
    accs.append(float(metrics["accuracy"]))
  loss = float(np.mean(losses))
  return {"loss": loss, "perplexity": math.exp(loss), "accuracy": float(np.mean(accs)), "batches": num_batches}
