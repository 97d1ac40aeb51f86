"""bAbI tasks qa1-qa10 generated from their definitions, and BABILong-style long-context samples built on them.

  generate(task, num_samples, seed, split)     bAbI samples: story, question, answer, supporting facts
  babilong.make_sample(sample, target_tokens, distractor, rng)   the facts hidden in distractor text
  babilong.babilong_correct(generated, answer, task)             BABILong's answer check
  prose.Prose / babilong.TextFolder / TextDocuments   distractor text: built-in prose, the user's text files,
                                                      or any collection of texts (e.g. a prepared TFDS dataset)
  training.BabilongSource / encode_sample     samples as token documents with loss on the answer
"""

from lm2_jax.data.babi.babilong import (TextDocuments, TextFolder, babilong_correct, count_words, make_sample,
                                        make_samples)
from lm2_jax.data.babi.prose import Prose, generate_prose
from lm2_jax.data.babi.tasks import SPLITS, TASK_ENTITIES, TASK_LABELS, TASKS, generate, sample

__all__ = ["Prose", "SPLITS", "TASKS", "TASK_ENTITIES", "TASK_LABELS", "TextDocuments", "TextFolder",
           "babilong_correct", "count_words", "generate", "generate_prose", "make_sample", "make_samples", "sample"]
