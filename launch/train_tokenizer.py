r"""Trains a SentencePiece tokenizer on text files, optionally writing them tokenised as ArrayRecord.

  python -m launch.train_tokenizer --input='corpus/*.txt' --output=tok/spm --vocab_size=8000 \
      [--array_record_out=data/train.array_record --text_split=paragraph]

Writes tok/spm.model and tok/spm.vocab; set `config.data.tokenizer=tok/spm.model` (and
`config.model.vocab_size` to at least the vocabulary size). With --array_record_out, also writes the documents'
token ids (with bos/eos) for `config.data.kind='array_record'`.
"""

from absl import flags

from launch import cli
from lm2_jax.data import sources
from lm2_jax.data.tokenizer import train_tokenizer

_INPUT = flags.DEFINE_string("input", None, "Comma-separated text files or globs.")
_OUTPUT = flags.DEFINE_string("output", None, "Model prefix: writes PREFIX.model and PREFIX.vocab.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8000, "Number of pieces, including pad/unk/bos/eos.")
_TYPE = flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe", "char", "word"], "SentencePiece model type.")
_COVERAGE = flags.DEFINE_float("character_coverage", 0.9995, "Share of characters the vocabulary covers.")
_RECORDS = flags.DEFINE_string("array_record_out", None, "Optional: write the tokenised documents here.")
_SPLIT = flags.DEFINE_enum("text_split", "file", list(sources.TEXT_SPLITS), "What one document is.")
flags.mark_flags_as_required(["input", "output"])


def main(argv):
  del argv
  files = sources.expand_paths(_INPUT.value, field="--input")
  tok = train_tokenizer(files, _OUTPUT.value, vocab_size=_VOCAB.value, model_type=_TYPE.value,
                        character_coverage=_COVERAGE.value)
  print(f"wrote {tok.path} ({tok.vocab_size} pieces) from {len(files)} file(s)")
  if _RECORDS.value:
    docs = sources.TextFiles(_INPUT.value, _SPLIT.value)
    n = sources.write_token_records(_RECORDS.value, ([tok.bos_id, *tok.encode(d), tok.eos_id] for d in docs))
    print(f"wrote {n} tokenised documents to {_RECORDS.value}")


if __name__ == "__main__":
  cli.run(main)
