"""Resume checks: a run restarted in its workdir continues exactly, or is refused in one line that
names what differs and the fix, before anything in the workdir is rewritten.

What must match the newest checkpoint: the model's shape and layer layout, the data setup that places
every batch (`describe_data`), the sampling mode and what is trained (they change the train state's
layout)."""

import dataclasses
from pathlib import Path

from absl import logging

from rwkv_jax.io.checkpoint import IncompatibleCheckpointError
from rwkv_jax.io.workdir import Workdir
from rwkv_jax.model import ModelConfig, state_file


def describe_data(data_config, train_config, tokenizer, train_batches) -> dict:
    """What a resumed run must share with the checkpoint for its batches to continue the same stream:
    the source and its options, the data seed, the tokenizer (kind and file hash), the token count,
    whether windows reset the state at end-of-text (data.reset_at_eot), and the window length and count
    (train.seq_len, train.bptt_windows: they place every window, and a streamed row's carried state
    continues where its last window stopped only with the same ones)."""
    c = data_config
    options = {"stdlib": ("stdlib_root",), "text": ("text_files", "text_split"), "tfds": ("tfds_name",),
               "binidx": ("binidx_prefix",)}[c.source]
    return {"source": c.source, **{k: c[k] for k in options}, "validation_fraction": c.validation_fraction,
            "train_split": c.train_split, "seed": c.seed, "sampling": c.sampling, "tokenizer": c.tokenizer,
            "tokenizer_sha256": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
            "train_tokens": len(train_batches.tokens_N), "reset_at_eot": bool(c.get("reset_at_eot", False)),
            "seq_len": int(train_config.seq_len), "bptt_windows": int(train_config.bptt_windows)}


def check_data_unchanged(extra: dict, current: dict, step: int, directory, allow: bool) -> None:
    """Refuse (ValueError) a resume whose data setup differs from the one saved with checkpoint `step`,
    unless `allow` (config.train.allow_data_change). Checkpoints from before the setup was saved only
    carry the data seed."""
    saved = dict(extra.get("data") or {"seed": extra.get("data_seed", current["seed"])})
    changed = [f"{k} {saved[k]!r} -> {current.get(k)!r}" for k in saved if saved[k] != current.get(k)]
    if not changed:
        return
    if allow:
        logging.warning("resuming from step %d on a changed data setup (config.train.allow_data_change): %s",
                        step, "; ".join(changed))
        return
    raise ValueError(
        f"resume refused: the data setup differs from the one of checkpoint step {step} in {directory}: "
        f"{'; '.join(changed)}. Rerun with the original data settings, use a new --workdir, or pass "
        "--config.train.allow_data_change=True to continue training on the new data.")


def layers_as_stored(run_dir: Workdir, requested, model_config: ModelConfig) -> ModelConfig:
    """A resumed run keeps the layout its checkpoints hold, layers stacked or a list: with
    scan_layers='auto' whichever platform resumes it (a run begun on CPU resumes with a list on TPU).
    An explicit True/False that differs is refused (IncompatibleCheckpointError, the fix named)."""
    if not run_dir.model_config_path.is_file() and run_dir.run_config() is None:
        return model_config
    stored = run_dir.model_config().scan_layers
    if stored == model_config.scan_layers:
        return model_config
    if str(requested).strip().lower() == "auto":
        return dataclasses.replace(model_config, scan_layers=stored)
    raise IncompatibleCheckpointError(
        f"resume refused: the run's checkpoints hold its layers {'stacked' if stored else 'as a list'} "
        f"(model.scan_layers={stored}), this config asks for scan_layers={model_config.scan_layers}: rerun with "
        f"--config.model.scan_layers={stored}, or use a new --workdir")


def check_model_unchanged(run_dir: Workdir, model_config: ModelConfig, step: int, directory) -> None:
    """Refuse (IncompatibleCheckpointError, both shapes and the fix named) a resume with another model shape
    than the run's (its rwkv_config.json, written by every run once its resume was accepted)."""
    if not run_dir.model_config_path.is_file():
        return
    have, want = state_file.model_shape(run_dir.model_config()), state_file.model_shape(model_config)
    if have != want:
        raise IncompatibleCheckpointError(
            f"resume refused: checkpoint step {step} in {directory} holds a model of "
            f"{state_file.describe_shape(have)}, config.model is {state_file.describe_shape(want)}: rerun with the "
            f"run's config.model (its {run_dir.model_config_path.name}) or use a new --workdir")


def check_sampling_unchanged(extra: dict, current: dict, step: int, directory) -> None:
    """Refuse (ValueError) a resume that changes config.data.sampling, even with allow_data_change: a
    streamed run's train state holds the carried recurrent state and a random-window run's does not.
    Checkpoints from before the option existed were written with 'random'."""
    saved = (extra.get("data") or {}).get("sampling", "random")
    if saved != current["sampling"]:
        raise ValueError(
            f"resume refused: checkpoint step {step} in {directory} was trained with data.sampling={saved!r}, "
            f"this run asks for {current['sampling']!r}, and the train state differs between them (streams "
            f"carry each row's recurrent state). Rerun with --config.data.sampling={saved}, or use a new "
            "--workdir.")


def check_trainable_unchanged(saved_arrays: list[str], trainable: str, step: int, directory) -> None:
    """Refuse (ValueError) a resume that changes config.optim.trainable: a state-tuning run's train state
    holds the learned initial state and an optimizer state for it alone, a LoRA run's adapters and an
    optimizer state for them, a full run's an optimizer state for every weight. Read from the checkpoint's
    array names (no arrays), so older checkpoints are told apart too."""
    saved = ("state" if any(name.startswith("initial_state") for name in saved_arrays)
             else "lora" if any("/lora_a/" in name or name.endswith("/lora_a") for name in saved_arrays) else "all")
    if saved != trainable:
        raise ValueError(
            f"resume refused: checkpoint step {step} in {directory} was trained with optim.trainable={saved!r}, "
            f"this run asks for {trainable!r}, and their train states differ (what the optimizer updates). "
            f"Rerun with --config.optim.trainable={saved}, or use a new --workdir (with --config.train.init_from="
            f"{Path(directory).parent} to start from this run's model).")
