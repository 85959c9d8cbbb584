"""Writes a Megatron/GPT-NeoX `.bin` + `.idx` pair from text files with a chosen tokenizer.

  python -m rwkv_jax.data.make_binidx --input 'corpus/*.jsonl,notes/' \\
      --output_prefix out/corpus --tokenizer hf_json --tokenizer_path gpt-neox-20b.json

Each `.txt`/`.md`/`.py` file, or each `.jsonl` line (`text` field), is one document, written
as one sequence followed by the end-of-text id (as GPT-NeoX `--append-eod`). A sentencepiece
model that does not exist yet is trained on the inputs first.
"""

import argparse
import itertools
import sys
import time

from rwkv_jax.data import binidx
from rwkv_jax.data import text_files
from rwkv_jax.data import tokenizer as tokenizer_lib


def _documents(files, stats):
    for f in files:
        for _, text in text_files.read_documents(f, stats):
            yield text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="Comma-separated files, directories or globs.")
    p.add_argument("--output_prefix", required=True, help="Output path without .bin/.idx.")
    p.add_argument("--tokenizer", choices=["hf_json", "sentencepiece"], default="hf_json")
    p.add_argument("--tokenizer_path", required=True, help="Tokenizer .json, or sentencepiece .model.")
    p.add_argument("--sp_vocab_size", type=int, default=4096, help="If the .model must be trained.")
    p.add_argument("--sp_model_type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--no_eot", action="store_true", help="Do not append the end-of-text id.")
    args = p.parse_args(argv)

    files = text_files.find_text_files(args.input)
    if args.tokenizer == "sentencepiece":
        tok = tokenizer_lib.train_sentencepiece(_documents(files, text_files.ReadStats()), args.tokenizer_path,
                                                vocab_size=args.sp_vocab_size, model_type=args.sp_model_type)
    else:
        tok = tokenizer_lib.load_tokenizer(args.tokenizer, args.tokenizer_path)
    eot = [] if args.no_eot else [tok.eot_id]
    stats = text_files.ReadStats()
    start, last, tokens = time.time(), 0.0, 0
    print(f"{len(files)} files -> {args.output_prefix}.bin/.idx (vocab {tok.vocab_size})", flush=True)
    with binidx.BinIdxWriter(args.output_prefix, binidx.dtype_for_vocab(tok.vocab_size)) as writer:
        docs = _documents(files, stats)
        while batch := list(itertools.islice(docs, 256)):
            for ids in tok.encode_batch(batch):
                writer.add(ids + eot)
                tokens += len(ids) + len(eot)
            if time.time() - last > 2:
                last = time.time()
                print(f"  {stats.documents} documents, {tokens} tokens, "
                      f"{tokens / max(last - start, 1e-9):.0f} tokens/s", flush=True)
        if not stats.documents:
            raise SystemExit(f"No non-empty documents in {args.input!r}: nothing written.")
    print(f"Wrote {stats.documents} documents, {tokens} tokens in {time.time() - start:.1f}s; "
          f"{stats.invalid_bytes} non-UTF-8 bytes replaced, {stats.empty} empty documents skipped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
