"""Write a Megatron/GPT-NeoX `.bin` + `.idx` pair from text files (rwkv_jax.data.corpus_binidx).

    python -m rwkv_jax.cli.make_binidx --input='corpus/*.jsonl,notes/' --output_prefix=out/corpus \\
        --tokenizer=gpt-neox-20b.json
    python -m rwkv_jax.cli.make_binidx --input=docs/ --output_prefix=out/docs --tokenizer=out/sp.model \\
        --sp_vocab_size=8192         # a sentencepiece .model that does not exist yet is trained first
"""

from absl import flags

from rwkv_jax.cli import common
from rwkv_jax.cli import runner as cli

_INPUT = flags.DEFINE_string("input", "", "Comma-separated files, directories or globs (required).")
_OUTPUT_PREFIX = flags.DEFINE_string("output_prefix", "", "Output path without .bin/.idx (required).")
_SP_VOCAB_SIZE = flags.DEFINE_integer("sp_vocab_size", 4096, "Vocabulary of a sentencepiece .model trained here.")
_SP_MODEL_TYPE = flags.DEFINE_enum("sp_model_type", "bpe", ["bpe", "unigram"],
                                   "Sentencepiece model type (data.tokenizer.SP_MODEL_TYPES).")
_EOT = flags.DEFINE_bool("eot", True, "Append the end-of-text id to every document (--noeot: do not).")


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    common.require(_INPUT)
    common.require(_OUTPUT_PREFIX)
    common.require(common.TOKENIZER, " (a .json HF tokenizers file, or a sentencepiece .model)")
    common.check_positive(_SP_VOCAB_SIZE)
    from rwkv_jax.data.corpus_binidx import make_binidx
    written = make_binidx(_INPUT.value, _OUTPUT_PREFIX.value, common.TOKENIZER.value,
                          sp_vocab_size=_SP_VOCAB_SIZE.value, sp_model_type=_SP_MODEL_TYPE.value, eot=_EOT.value,
                          overwrite=common.OVERWRITE.value,
                          log=lambda line: print(line, flush=True))
    print(f"Wrote {written.documents} documents, {written.tokens} tokens in {written.seconds:.1f}s; "
          f"{written.invalid_bytes} non-UTF-8 bytes replaced, {written.empty} empty documents skipped.")


def entry_point():
    cli.run(main, shared_flags=(common.TOKENIZER, common.OVERWRITE))


if __name__ == "__main__":
    entry_point()
