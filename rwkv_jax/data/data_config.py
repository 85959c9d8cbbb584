"""The data section (`config.data`) of every config file: its defaults, allowed values and checks."""

import os

import ml_collections

from rwkv_jax.data.pipeline import SAMPLINGS
from rwkv_jax.data.text_dataset import TEXT_SPLITS
from rwkv_jax.data.tokenizer import SP_MODEL_TYPES, TOKENIZERS

SOURCES = ("stdlib", "text", "tfds", "binidx")        # data.source
# The smallest sentencepiece vocabulary our trainer accepts: 256 byte-fallback pieces, </s>, <unk> and '\n'.
MIN_SP_VOCAB_SIZE = 260


def default_data_dir() -> str:
    """Where datasets, tokenizers and token caches live: $RWKV_JAX_DATA_DIR or ~/.cache."""
    return os.environ.get("RWKV_JAX_DATA_DIR") or os.path.expanduser("~/.cache/rwkv_jax/data")


def default_data_config() -> ml_collections.ConfigDict:
    """Data options. Batch size and sequence length live in `config.train`."""
    c = ml_collections.ConfigDict()
    # 'stdlib' (embedded corpus), 'text' (local files), 'tfds' (catalog by name), 'binidx'.
    c.source = "stdlib"
    c.stdlib_root = ""  # source='stdlib': '' = the running interpreter's standard library.
    c.text_files = ""  # source='text': comma-separated files, directories or globs.
    c.text_split = "hash"  # 'hash': train/validation by a hash of the relative path; 'all': train only.
    c.validation_fraction = 0.05
    c.tfds_name = "tiny_shakespeare"  # source='tfds', e.g. 'lm1b', 'pg19', 'c4/en'.
    c.tfds_text_key = ""  # Feature holding the text; '' picks 'text' or the only text feature.
    c.train_split = "train"
    c.eval_split = "validation"  # For TFDS catalog datasets often 'test'; '' disables evaluation.
    c.binidx_prefix = ""  # source='binidx': path without .bin/.idx.
    c.data_dir = default_data_dir()
    c.tokenizer = "sentencepiece"  # data.tokenizer.TOKENIZERS: 'sentencepiece' | 'hf_json' | 'rwkv_world'.
    c.tokenizer_path = ""  # hf_json: the .json file; sentencepiece: '' = inside data_dir, keyed.
    c.sp_vocab_size = 4096
    c.sp_model_type = "bpe"  # 'bpe' | 'unigram'.
    c.sp_input_sentence_size = 300_000  # Lines sampled for sentencepiece training.
    c.sp_wait_timeout_s = 1800.0  # Multi-host: how long other processes wait for process 0.
    c.seed = 0
    # Reset the model state at every end-of-text input inside a training/eval window, so that documents
    # packed into one window do not see each other (the eot then starts the next document, as eval.py's
    # documents start). Off by default as in the official RWKV-LM trainer, which does not reset: its
    # windows cross documents joined by eot and the state carries over.
    c.reset_at_eot = False
    # How training windows are cut: 'random' (RWKV-LM's: independent windows at random offsets, each
    # from the empty state) or 'streams' (each batch row reads the corpus in order, window after window
    # across steps, its recurrent state carried from step to step: long-context training).
    c.sampling = "random"
    return c


def check_section(checks) -> None:
    """Add the problems of `checks.config.data` alone to `checks` (rwkv_jax.train.config_checks.Checks);
    the checks against other sections are train_config.validate's."""
    d = checks.config.data
    checks.one_of("data", "source", SOURCES)
    checks.one_of("data", "tokenizer", TOKENIZERS)
    checks.one_of("data", "sp_model_type", SP_MODEL_TYPES)
    checks.one_of("data", "text_split", TEXT_SPLITS)
    checks.one_of("data", "sampling", SAMPLINGS)
    checks.need(0 <= d.validation_fraction < 1,
                f"data.validation_fraction must be in [0, 1), got {d.validation_fraction!r}")
    checks.at_least("data", "sp_input_sentence_size", 1)
    # The seed seeds numpy's generators (non-negative) and is saved in checkpoints and config.json.
    checks.need(isinstance(d.seed, int) and 0 <= d.seed < 2**63,
                f"data.seed must be in [0, 2**63), got {d.seed!r}")
    checks.positive("data", "sp_wait_timeout_s")
    checks.need(d.source != "text" or bool(d.text_files.strip()),
                "data.text_files is empty: give files, directories or globs (comma-separated) for source='text'")
    checks.need(d.source != "binidx" or bool(d.binidx_prefix),
                "data.binidx_prefix is empty: give the path of the .bin/.idx pair without its suffix")
    checks.need(d.source != "binidx" or bool(d.tokenizer_path),
                "data.tokenizer_path is required with source='binidx' (the tokenizer the ids were written with)")
    checks.need(d.tokenizer != "hf_json" or bool(d.tokenizer_path),
                "data.tokenizer_path is required for tokenizer='hf_json' (e.g. a GPT-NeoX tokenizer .json)")
    checks.need(d.tokenizer != "rwkv_world" or bool(d.tokenizer_path),
                "data.tokenizer_path is required for tokenizer='rwkv_world' (your copy of rwkv_vocab_v20230424.txt)")
    path = os.path.expanduser(d.tokenizer_path) if d.tokenizer_path else ""
    checks.need(not (path and os.path.isdir(path)),
                f"data.tokenizer_path={d.tokenizer_path!r} is a directory: give the tokenizer's file path")

