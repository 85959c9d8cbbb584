"""Data: text sources (stdlib corpus, local text, TFDS catalog, binidx), tokenizers, batches.

Two entry points:
  * `make_datasets` (training): builds (or reuses from `config.data.data_dir`) the dataset, the
    tokenizer and the token caches, and returns the tokenizer with the training and eval batch sources.
  * `eval_documents` (eval.py): the documents an `EvalSpec` names (text files, a TFDS split, a binidx
    pair, or a training run's own validation split, split exactly as training split it).
"""

import dataclasses
import os
import re
import time

import ml_collections
import numpy as np
from absl import logging

from rwkv_jax.data import binidx, catalog, pipeline, text_dataset, text_files
from rwkv_jax.data import tokenizer as tokenizer_lib
from rwkv_jax.data.data_config import default_data_config, default_data_dir
from rwkv_jax.data.documents import Document, documents_from_texts, documents_from_tokens
from rwkv_jax.data.pipeline import Batches, EvalBatches
from rwkv_jax.data.tokenizer import Tokenizer, check_fits
from rwkv_jax.model import check_token_ids

__all__ = ["Batches", "Document", "EvalBatches", "EvalData", "EvalSpec", "Tokenizer", "check_fits",
           "default_data_config", "eval_documents", "make_datasets"]


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
            check_token_ids(tokens_N, model_vocab_size, name, fix=pipeline.DAMAGED_FILE_FIX)
    reset_id = tok.eot_id if c.get("reset_at_eot", False) else None  # documents are joined by eot
    train = Batches(train_N, seq_len=seq_len, batch_size=batch_size, seed=c.seed,
                    process_index=process_index, process_count=process_count, vocab_size=model_vocab_size,
                    source=train_name, reset_id=reset_id, sampling=c.sampling)
    evals = None if eval_N is None else EvalBatches(
        eval_N, seq_len=seq_len, batch_size=batch_size, process_index=process_index,
        process_count=process_count, vocab_size=model_vocab_size, source=eval_name, reset_id=reset_id)
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
    first = _binidx_validation_start(c, len(ds))
    if first is None:
        return ds.tokens, ds.tokens, None
    cut = ds.offset_of(first)
    return ds.tokens, ds.tokens[:cut], ds.tokens[cut:]


def _binidx_validation_start(c, num_sequences: int) -> int | None:
    """The first sequence of a binidx run's validation split (its last `validation_fraction` of the
    sequences), or None when the run has none."""
    if not c.validation_fraction or not c.eval_split:
        return None
    return num_sequences - max(1, round(c.validation_fraction * num_sequences))


# --- Evaluation documents -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Which documents to evaluate: at most one of `text_files`, `tfds` (with `split`), `binidx`; none of
    them means the validation split of the training run whose `data` config is `run_data`."""
    text_files: str = ""
    tfds: str = ""
    split: str = "validation"
    binidx: str = ""
    run_data: ml_collections.ConfigDict | None = None
    data_dir: str = ""   # where TFDS data is kept; default: the run's data_dir, else default_data_dir()
    eval_len: int = 0    # tokens per document (0: whole documents)
    max_docs: int = 0    # documents (0: all)


@dataclasses.dataclass
class EvalData:
    name: str            # short, for file names: 'text', 'validation', 'binidx', 'tfds-pg19-test'
    label: str           # for the report: what was read
    documents: object    # iterator of Document


def eval_documents(spec: EvalSpec, tokenizer: Tokenizer, vocab_size: int = 0) -> EvalData:
    """The documents `spec` names, tokenized with `tokenizer`. `vocab_size` > 0 checks token ids read
    from binidx files against the model's vocabulary (an error names the file and sequence)."""
    chosen = [name for name in ("text_files", "tfds", "binidx") if getattr(spec, name)]
    if len(chosen) > 1:
        raise ValueError(f"give at most one of text_files, tfds, binidx (got {chosen})")
    if spec.eval_len < 0 or spec.max_docs < 0:
        raise ValueError(f"eval_len and max_docs must be >= 0 (0: no limit), got {spec.eval_len} and "
                         f"{spec.max_docs}")
    limits = dict(eval_len=spec.eval_len, max_docs=spec.max_docs)
    data_dir = os.path.expanduser(spec.data_dir or (spec.run_data.data_dir if spec.run_data is not None
                                                   else default_data_dir()))
    if spec.text_files:
        files = text_files.find_text_files(spec.text_files, what="--text_files")
        return EvalData("text", f"{len(files)} text file(s): {spec.text_files}",
                        documents_from_texts(_texts_of(files), tokenizer, **limits))
    if spec.tfds:
        builder = catalog.build_catalog(spec.tfds, data_dir=os.path.join(data_dir, "tfds"), asked_by=catalog.EVAL)
        catalog.num_examples(builder, spec.split)  # a clear error for an unknown split, before any work
        key = catalog.text_key(builder)
        return EvalData(f"tfds-{spec.tfds.replace('/', '_')}-{spec.split}", f"TFDS {spec.tfds} split {spec.split}",
                        documents_from_texts(pipeline.split_texts(builder, spec.split, key), tokenizer, **limits))
    if spec.binidx:
        ds = binidx.MMapIndexedDataset(os.path.expanduser(spec.binidx), what="--binidx")
        return EvalData("binidx", f"binidx {spec.binidx} ({len(ds)} sequences)", documents_from_tokens(
            (ds[i] for i in range(len(ds))), tokenizer, vocab_size=vocab_size, source=f"binidx {spec.binidx}",
            **limits))
    c = spec.run_data
    if c is None:
        raise ValueError("no data: a checkpoint that is not a training workdir needs --text_files, --tfds, "
                         "--binidx or --lambada")
    if c.source == "binidx":
        ds = binidx.MMapIndexedDataset(os.path.expanduser(c.binidx_prefix))
        first = _binidx_validation_start(c, len(ds))
        if first is None:
            raise ValueError("the run has no validation split (validation_fraction or eval_split is empty)")
        return EvalData("validation", f"the run's binidx validation split ({c.binidx_prefix}, sequences {first}..)",
                        documents_from_tokens((ds[i] for i in range(first, len(ds))), tokenizer,
                                              vocab_size=vocab_size, source=f"binidx {c.binidx_prefix}", **limits))
    c = ml_collections.ConfigDict(c.to_dict())
    c.data_dir = data_dir
    builder, key, eval_split = text_source(c)  # the run's dataset, as training built it
    if not eval_split:
        raise ValueError("the run has no validation split (config.data.text_split='all' or eval_split=''): "
                         "pass --text_files, --tfds or --binidx")
    return EvalData("validation", f"the run's {c.source} dataset, split {eval_split}",
                    documents_from_texts(pipeline.split_texts(builder, eval_split, key), tokenizer, **limits))


def _texts_of(files):
    stats = text_files.ReadStats()
    for f in files:
        for _, text in text_files.read_documents(f, stats):
            yield text


def _dataset_id(builder) -> str:
    return _safe(builder.info.full_name.replace("/", "__"))


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)
