"""Data: text sources (stdlib corpus, local text, TFDS catalog, binidx), tokenizers, batches.

`make_datasets` is the one entry point: it builds (or reuses from `config.data.data_dir`) the
dataset, the tokenizer and the token caches, and returns the tokenizer with the training and
eval batch sources.
"""

import os
import re
import time

from absl import logging
import ml_collections
import numpy as np

from rwkv_jax.data import binidx
from rwkv_jax.data import catalog
from rwkv_jax.data import pipeline
from rwkv_jax.data import text_dataset
from rwkv_jax.data import tokenizer as tokenizer_lib
from rwkv_jax.data.config import default_data_config
from rwkv_jax.data.pipeline import Batches, EvalBatches
from rwkv_jax.data.tokenizer import Tokenizer, check_fits

__all__ = ["Batches", "EvalBatches", "Tokenizer", "check_fits", "default_data_config", "make_datasets"]


def make_datasets(data_config: ml_collections.ConfigDict, *, seq_len: int, batch_size: int,
                  model_vocab_size: int, process_index: int = 0, process_count: int = 1
                  ) -> tuple[Tokenizer, Batches, EvalBatches | None]:
    """(tokenizer, train batches, eval batches or None) for `config.data`.

    `batch_size` is the global batch; each process gets its `batch_size // process_count` rows.
    Everything built here is cached under `data_dir` and reused by later calls.
    """
    c = data_config
    start = time.time()
    if c.source == "binidx":
        tok = _load_existing_tokenizer(c)
        check_fits(tok, model_vocab_size)
        tokens_N, train_N, eval_N = _binidx_splits(c)
        train_name = f"binidx file {os.path.expanduser(c.binidx_prefix) + '.bin'!r}"
        eval_name = f"{train_name} (its validation part)"
        streams = [(tokens_N, train_name)]  # scanned whole: offsets in the message are the file's
    elif c.source in ("stdlib", "text", "tfds"):
        builder, key, eval_split = text_source(c)
        tok = _text_tokenizer(c, builder, key, process_index)
        check_fits(tok, model_vocab_size)
        train_N, train_name = _cache(c, builder, c.train_split, key, tok)
        eval_N, eval_name = _cache(c, builder, eval_split, key, tok) if eval_split else (None, "")
        streams = [(train_N, train_name), (eval_N, eval_name)]
    else:
        raise ValueError(f"config.data.source must be 'stdlib', 'text', 'tfds' or 'binidx', not {c.source!r}.")
    # Ids outside the embedding table would be wrapped or read as garbage: check them where they enter.
    for tokens_N, name in streams:
        if tokens_N is not None and len(tokens_N) <= pipeline.FULL_SCAN_LIMIT:
            pipeline.check_token_ids(tokens_N, model_vocab_size, name)
    train = Batches(train_N, seq_len=seq_len, batch_size=batch_size, seed=c.seed,
                    process_index=process_index, process_count=process_count, vocab_size=model_vocab_size,
                    source=train_name)
    evals = None if eval_N is None else EvalBatches(
        eval_N, seq_len=seq_len, batch_size=batch_size, process_index=process_index,
        process_count=process_count, vocab_size=model_vocab_size, source=eval_name)
    logging.info("Data ready in %.1fs: %d train tokens, %s eval tokens, vocab %d.", time.time() - start,
                 len(train_N), "no" if eval_N is None else len(eval_N), tok.vocab_size)
    return tok, train, evals


def text_source(c):
    """(prepared TFDS builder, text feature, eval split or '')."""
    tfds_dir = os.path.join(os.path.expanduser(c.data_dir), "tfds")
    if c.source == "stdlib":
        builder = text_dataset.build_stdlib(data_dir=tfds_dir, validation_fraction=c.validation_fraction,
                                            root=c.stdlib_root)
    elif c.source == "text":
        builder = text_dataset.build_local_text(spec=c.text_files, data_dir=tfds_dir, text_split=c.text_split,
                                                validation_fraction=c.validation_fraction)
    else:
        builder = catalog.build_catalog(c.tfds_name, data_dir=tfds_dir)
    eval_split = c.eval_split
    if c.source == "text" and c.text_split == "all":
        logging.info("text_split='all': every file is in 'train'; no eval split.")
        eval_split = ""
    for split in filter(None, (c.train_split, eval_split)):
        catalog.num_examples(builder, split)  # A clear error for an unknown split, before any work.
    key = catalog.text_key(builder, c.tfds_text_key) if c.source == "tfds" else "text"
    return builder, key, eval_split


def _text_tokenizer(c, builder, key: str, process_index: int) -> Tokenizer:
    if c.tokenizer != "sentencepiece":
        return _load_existing_tokenizer(c)
    name = f"{_dataset_id(builder)}.{_safe(c.train_split)}.{c.sp_model_type}{c.sp_vocab_size}.model"
    path = c.tokenizer_path or os.path.join(os.path.expanduser(c.data_dir), "tokenizers", name)
    return tokenizer_lib.train_sentencepiece(
        pipeline.split_texts(builder, c.train_split, key), path, vocab_size=c.sp_vocab_size,
        model_type=c.sp_model_type, input_sentence_size=c.sp_input_sentence_size,
        process_index=process_index, wait_timeout_s=c.sp_wait_timeout_s)


def _load_existing_tokenizer(c) -> Tokenizer:
    if not c.tokenizer_path:
        raise ValueError(f"config.data.tokenizer_path is required for tokenizer={c.tokenizer!r} with "
                         f"source={c.source!r} (e.g. a GPT-NeoX tokenizer .json for hf_json).")
    return tokenizer_lib.load_tokenizer(c.tokenizer, os.path.expanduser(c.tokenizer_path))


def _cache(c, builder, split: str, key: str, tok: Tokenizer) -> tuple[np.ndarray, str]:
    """(token stream of `split`, its name for error messages)."""
    name = f"{_safe(split)}.{tok.fingerprint}.tokens"
    path = os.path.join(os.path.expanduser(c.data_dir), "token_cache", _dataset_id(builder), name)
    tokens_N = pipeline.token_cache(pipeline.split_texts(builder, split, key), tok, path,
                                    num_docs=catalog.num_examples(builder, split))
    return tokens_N, f"token cache {path!r}"


def _binidx_splits(c) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(the flat `.bin` stream, its training part, its eval part: the last `validation_fraction` of
    sequences if > 0)."""
    ds = binidx.MMapIndexedDataset(os.path.expanduser(c.binidx_prefix))
    if not c.validation_fraction or not c.eval_split:
        return ds.tokens, ds.tokens, None
    cut = ds.offset_of(len(ds) - max(1, round(c.validation_fraction * len(ds))))
    return ds.tokens, ds.tokens[:cut], ds.tokens[cut:]


def _dataset_id(builder) -> str:
    return _safe(builder.info.full_name.replace("/", "__"))


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)
