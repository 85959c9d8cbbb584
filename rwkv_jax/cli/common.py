"""Flags and steps that several commands share: the checkpoint to read, its tokenizer, numerics."""

import dataclasses
from pathlib import Path

from absl import flags

from rwkv_jax.cli import runner as cli

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, official .pth, HF or rwkv_jax directory "
                                 "(required).")
TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer file: .json (HF tokenizers, e.g. the GPT-NeoX-20B "
                                "tokenizer of the official Pile models), .model (sentencepiece) or .txt (the RWKV "
                                "World vocabulary, rwkv_vocab_v20230424.txt); default: the workdir's copy or the HF "
                                "directory's tokenizer.json.")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output (convert's DST, make_binidx's "
                              "OUTPUT_PREFIX.bin/.idx).")
DTYPE = flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16"], "Compute dtype override (default: the "
                          "checkpoint's).")


def require(flag, what: str = "") -> str:
    """The flag's value, or a usage error when it is empty."""
    if not flag.value:
        raise cli.UsageError(f"--{flag.name} is required{what}")
    return flag.value


def check_non_negative(*flag_holders) -> None:
    for flag in flag_holders:
        if flag.value < 0:
            raise cli.UsageError(f"--{flag.name} must be >= 0, got {flag.value}")


def check_positive(*flag_holders) -> None:
    for flag in flag_holders:
        if flag.value < 1:
            raise cli.UsageError(f"--{flag.name} must be >= 1, got {flag.value}")


def load_checkpoint(**overrides):
    """(weights.Loaded, tokenizer) of --checkpoint and --tokenizer, the tokenizer checked to fit the model.
    The checkpoint is only read (a workdir may be training at the same time)."""
    from rwkv_jax.data.tokenizer import check_fits
    from rwkv_jax.io import weights
    from rwkv_jax.model import with_kernels_in_compute_dtype
    checkpoint = Path(require(CHECKPOINT)).expanduser()
    if DTYPE.value:
        overrides["dtype"] = DTYPE.value
    weights.detect_format(checkpoint)  # a missing or unknown checkpoint fails before the tokenizer lookup
    tokenizer = weights.find_tokenizer(checkpoint, TOKENIZER.value)
    loaded = weights.load(checkpoint, **overrides)
    check_fits(tokenizer, loaded.model.config.vocab_size, fix="it is not this model's tokenizer (pass --tokenizer)")
    # Evaluation and generation only read the model: kernels in a bf16 compute dtype are cast once here.
    return dataclasses.replace(loaded, model=with_kernels_in_compute_dtype(loaded.model)), tokenizer
