"""Writes a Megatron/GPT-NeoX `.bin` + `.idx` pair from text files with a chosen tokenizer.

  python -m rwkv_jax.cli.make_binidx --input='corpus/*.jsonl,notes/' --output_prefix=out/corpus \\
      --tokenizer=gpt-neox-20b.json

Each `.txt`/`.md`/`.py` file, or each `.jsonl` line (`text` field), is one document, written
as one sequence followed by the end-of-text id (as GPT-NeoX `--append-eod`). The tokenizer is a
.json file (HF tokenizers) or a sentencepiece .model; a .model that does not exist yet is trained
on the inputs first. The command is rwkv_jax/cli/make_binidx.py (also `rwkv-make-binidx`).
"""

import dataclasses
import itertools
import os
import time

from rwkv_jax.data import binidx, text_files
from rwkv_jax.data import tokenizer as tokenizer_lib


@dataclasses.dataclass
class Written:
    documents: int
    tokens: int
    invalid_bytes: int
    empty: int
    seconds: float


def _documents(files, stats):
    for f in files:
        for _, text in text_files.read_documents(f, stats):
            yield text


def make_binidx(inputs: str, output_prefix: str, tokenizer_path: str, *, sp_vocab_size: int = 4096,
                sp_model_type: str = "bpe", eot: bool = True, overwrite: bool = False, log=print) -> Written:
    """Tokenize the documents of `inputs` (comma-separated files, directories or globs) into
    OUTPUT_PREFIX.bin/.idx. Raises ValueError, writing nothing, when there is no non-empty document, and
    FileExistsError, before any work, when the pair exists and `overwrite` is False."""
    if not os.path.basename(output_prefix):
        raise ValueError(f"the output prefix {output_prefix!r} names a directory: give the path of the pair without "
                         f"its suffix, e.g. {os.path.join(output_prefix, 'corpus')}")
    for suffix in (".bin", ".idx"):
        if os.path.exists(output_prefix + suffix) and not overwrite:
            raise FileExistsError(f"{output_prefix}{suffix} already exists; remove it, choose another output prefix "
                                  "or pass overwrite=True (--overwrite)")
    files = text_files.find_text_files(inputs, what="--input")
    if tokenizer_lib.kind_of_file(tokenizer_path) == "sentencepiece" and not os.path.exists(tokenizer_path):
        tok = tokenizer_lib.train_sentencepiece(_documents(files, text_files.ReadStats()), tokenizer_path,
                                                vocab_size=sp_vocab_size, model_type=sp_model_type)
    else:
        tok = tokenizer_lib.load_tokenizer_file(tokenizer_path)
    end = [tok.eot_id] if eot else []
    stats = text_files.ReadStats()
    start, last, tokens = time.time(), 0.0, 0
    log(f"{len(files)} files -> {output_prefix}.bin/.idx (vocab {tok.vocab_size})")
    with binidx.BinIdxWriter(output_prefix, binidx.dtype_for_vocab(tok.vocab_size)) as writer:
        docs = _documents(files, stats)
        while batch := list(itertools.islice(docs, 256)):
            for ids in tok.encode_batch(batch):
                writer.add(ids + end)
                tokens += len(ids) + len(end)
            if time.time() - last > 2:
                last = time.time()
                log(f"  {stats.documents} documents, {tokens} tokens, {tokens / max(last - start, 1e-9):.0f} tokens/s")
        if not stats.documents:
            raise ValueError(f"No non-empty documents in {inputs!r}: nothing written.")
    return Written(stats.documents, tokens, stats.invalid_bytes, stats.empty, time.time() - start)
