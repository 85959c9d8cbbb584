"""Builders for the ml_collections config files in `configs/`.

Each file in `configs/` states only what differs per model size; the defaults live here and in the
modules that own each section (`config.data` in rwkv_jax/data, `config.optim` in rwkv_jax/optim,
`config.mesh` in rwkv_jax/sharding). `config.model` is turned into a `ModelConfig`.

`validate(config, mesh)` is the one place where a training config is checked, before any data is prepared
or anything compiled: every problem found is reported in one line that names the field and the fix.
"""

import dataclasses
import math
import os

import jax
import ml_collections

from rwkv_jax.data import default_data_config, pipeline
from rwkv_jax.io.workdir import Workdir
from rwkv_jax.model import ModelConfig, resolve_scan_layers
from rwkv_jax.ops import wkv4 as wkv_ops
from rwkv_jax.train import sharding
from rwkv_jax.train.optim import default_optim_config
from rwkv_jax.train.sharding import default_mesh_config

# The smallest sentencepiece vocabulary our trainer accepts: 256 byte-fallback pieces, </s>, <unk> and '\n'.
MIN_SP_VOCAB_SIZE = 260


def model_config(**overrides) -> ml_collections.ConfigDict:
    """The `config.model` section: every ModelConfig field, defaults overridden by `overrides`."""
    values = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    ModelConfig.check_keys({**values, **overrides})  # fail fast on an unknown key (no backend started)
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def base_config(*, model: ml_collections.ConfigDict, batch_size: int, seq_len: int, num_steps: int,
                lr_init: float, lr_final: float) -> ml_collections.ConfigDict:
    """A complete training config; every section has defaults that `--config.x.y=z` can override."""
    config = ml_collections.ConfigDict()
    config.model = model
    config.data = default_data_config()
    config.train = ml_collections.ConfigDict({
        "num_steps": num_steps,
        "batch_size": batch_size,      # global batch, in sequences
        "seq_len": seq_len,
        "microbatches": 1,             # gradient accumulation: batch_size / microbatches rows at a time
        "bptt_windows": 1,             # K > 1: each row reads K consecutive windows of seq_len per step, run by
                                       # a scan with the gradient flowing across them and one window's
                                       # activations in memory (remat); eval windows are K x seq_len too
        "loss_chunk_tokens": 2048,     # the head and cross entropy run over this many positions at a time
        "seed": 0,                     # parameter init
        "log_every": 10,
        "eval_every": 500,             # 0: only at the end
        "eval_batches": 50,            # 0: the whole validation split
        "peak_flops_per_device": 0.0,  # for MFU; 0: looked up from the device kind
        "allow_data_change": False,    # resume although the data setup differs from the checkpoint's
        "init_from": "",               # start from this trained model (workdir, .pth, HF or rwkv_jax directory):
                                       # its parameters, a fresh optimizer; '' = random init
    })
    config.optim = default_optim_config()
    config.optim.lr_init = lr_init
    config.optim.lr_final = lr_final
    config.checkpoint = ml_collections.ConfigDict({"every_steps": 1000, "keep": 3, "async_save": True})
    config.mesh = default_mesh_config()
    return config


def paper_config(*, n_layer: int, d_model: int, lr_init: float, lr_final: float) -> ml_collections.ConfigDict:
    """A size of the paper's Table 2: vocab 50277 (GPT-NeoX), context 1024, FFN width 4D; learning
    rates from the paper's Appendix G. The embedding starts at U(-lr_init, lr_init) as in v4neo.
    The data default is the embedded corpus; for the paper's run point `config.data` at a Pile binidx
    with the GPT-NeoX tokenizer. The global batch of 8 sequences runs as 8 microbatches of one, so that
    it fits one CPU (XLA:CPU keeps ~1.5 GiB of activations per layer for 8 x 1024 tokens); on accelerators
    raise `train.batch_size` with the mesh and lower `train.microbatches` (the official runs used far
    larger global batches). Layers are stacked and scanned on GPU/TPU and a list on CPU
    (`scan_layers='auto'`, see `model.resolve_scan_layers`)."""
    model = model_config(vocab_size=50277, n_layer=n_layer, d_model=d_model, emb_init_scale=lr_init,
                         dtype="auto", remat=True, scan_layers="auto")
    config = base_config(model=model, batch_size=8, seq_len=1024, num_steps=100_000, lr_init=lr_init,
                         lr_final=lr_final)
    config.train.microbatches = 8
    return config


COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "auto")  # model.dtype
WKV_FORMS = (*wkv_ops.FORMS, *wkv_ops.KERNEL_FORMS, "auto")  # model.wkv_form


class ConfigError(ValueError):
    """A config value that cannot work; the message names every such field and the fix."""


def validate(config: ml_collections.ConfigDict, mesh=None, *, resuming: bool = False) -> None:
    """Raise ConfigError (one line) if any value of a training config cannot work. Called before the data
    is prepared and before anything is compiled or written. `mesh` (optional) adds the batch-split check.
    `resuming`: the workdir holds a checkpoint, so `train.init_from` is not read and need not exist."""
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    def at_least(section: str, field: str, low, hint: str = "") -> None:
        value = config[section][field]
        need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
             and value >= low, f"{section}.{field} must be >= {low}, got {value!r}{hint}")

    def positive(section: str, field: str, hint: str = "") -> None:
        value = config[section][field]
        need(isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
             f"{section}.{field} must be > 0, got {value!r}{hint}")

    def one_of(section: str, field: str, choices) -> None:
        need(config[section][field] in choices,
             f"{section}.{field} must be one of {list(choices)}, got {config[section][field]!r}")

    # --- model
    m = config.model
    for field in ("vocab_size", "d_model", "n_layer", "wkv_chunk_len"):
        at_least("model", field, 1)
    for field in ("d_att", "d_ffn"):
        need(m[field] is None or m[field] >= 1, f"model.{field} must be None or >= 1, got {m[field]!r}")
    positive("model", "layer_norm_eps")
    one_of("model", "dtype", COMPUTE_DTYPES)
    one_of("model", "param_dtype", ("float32", "bfloat16", "float16"))
    one_of("model", "wkv_form", WKV_FORMS)
    try:
        resolve_scan_layers(m.scan_layers, "cpu")
    except ValueError:
        need(False, f"model.scan_layers must be one of True, False, 'auto', got {m.scan_layers!r}")

    # --- train
    t = config.train
    for field in ("num_steps", "batch_size", "seq_len", "microbatches", "bptt_windows", "log_every",
                  "loss_chunk_tokens"):
        at_least("train", field, 1)
    at_least("train", "eval_every", 0, " (0: evaluate only at the end)")
    at_least("train", "eval_batches", 0, " (0: the whole validation split)")
    at_least("train", "peak_flops_per_device", 0, " (0: looked up from the device kind)")
    if not problems:  # the divisibility checks need positive sizes
        if t.batch_size % t.microbatches:
            problems.append(f"train.batch_size={t.batch_size} is not a multiple of "
                            f"train.microbatches={t.microbatches}")
        elif mesh is not None:
            batch_axes = math.prod(mesh.shape[a] for a in sharding.RULES["batch"])
            if (t.batch_size // t.microbatches) % batch_axes:
                problems.append(f"a microbatch of {t.batch_size // t.microbatches} rows does not split over the "
                                f"{batch_axes} devices of the mesh's data x fsdp axes: raise train.batch_size or "
                                "lower train.microbatches")
        if t.batch_size % jax.process_count():
            problems.append(f"train.batch_size={t.batch_size} does not split over {jax.process_count()} processes")

    # --- optim
    o = config.optim
    positive("optim", "lr_init")
    positive("optim", "lr_final", " (the decay is exponential, from lr_init to lr_final)")
    for field in ("warmup_steps", "decay_start", "weight_decay", "l2wrap_factor"):
        at_least("optim", field, 0)
    for field in ("beta1", "beta2"):
        need(0 <= o[field] < 1, f"optim.{field} must be in [0, 1), got {o[field]!r}")
    positive("optim", "eps")
    positive("optim", "grad_clip")
    at_least("optim", "max_consecutive_bad_steps", 1)
    one_of("optim", "trainable", ("all", "state"))
    init_from = os.path.expanduser(t.init_from) if t.init_from else ""
    need(o.trainable != "state" or bool(init_from),
         "optim.trainable='state' tunes the initial state of a trained model: set train.init_from to its workdir, "
         ".pth, HF or rwkv_jax directory")
    # A resumed run restores its parameters from its own checkpoint: the model it started from may be gone.
    need(not init_from or resuming or os.path.exists(init_from), f"train.init_from={t.init_from!r} does not exist")

    # --- checkpoint
    at_least("checkpoint", "every_steps", 1)
    at_least("checkpoint", "keep", 1, " (the newest checkpoints kept; 0 would delete the final one too)")

    # --- data
    d = config.data
    one_of("data", "source", ("stdlib", "text", "tfds", "binidx"))
    one_of("data", "tokenizer", ("sentencepiece", "hf_json"))
    one_of("data", "sp_model_type", ("bpe", "unigram"))
    one_of("data", "text_split", ("hash", "all"))
    one_of("data", "sampling", pipeline.SAMPLINGS)
    need(0 <= d.validation_fraction < 1,
         f"data.validation_fraction must be in [0, 1), got {d.validation_fraction!r}")
    at_least("data", "sp_input_sentence_size", 1)
    positive("data", "sp_wait_timeout_s")
    need(d.source != "text" or bool(d.text_files.strip()),
         "data.text_files is empty: give files, directories or globs (comma-separated) for source='text'")
    need(d.source != "binidx" or bool(d.binidx_prefix),
         "data.binidx_prefix is empty: give the path of the .bin/.idx pair without its suffix")
    need(d.source != "binidx" or bool(d.tokenizer_path),
         "data.tokenizer_path is required with source='binidx' (the tokenizer the ids were written with)")
    need(d.tokenizer != "hf_json" or bool(d.tokenizer_path),
         "data.tokenizer_path is required for tokenizer='hf_json' (e.g. a GPT-NeoX tokenizer .json)")
    path = os.path.expanduser(d.tokenizer_path) if d.tokenizer_path else ""
    need(not (path and os.path.isdir(path)),
         f"data.tokenizer_path={d.tokenizer_path!r} is a directory: give the tokenizer's file path")
    if d.tokenizer == "sentencepiece" and d.source != "binidx" and not (path and os.path.isfile(path)):
        need(d.sp_vocab_size >= MIN_SP_VOCAB_SIZE,
             f"data.sp_vocab_size must be >= {MIN_SP_VOCAB_SIZE} (256 byte pieces, </s>, <unk> and a newline "
             f"piece), got {d.sp_vocab_size!r}")
        need(d.sp_vocab_size <= m.vocab_size,
             f"data.sp_vocab_size={d.sp_vocab_size} is larger than model.vocab_size={m.vocab_size}: "
             "token ids would not fit the embedding")

    if init_from and not (path and os.path.isfile(path)):
        problems.append(f"train.init_from needs the tokenizer that model was trained with: set data.tokenizer_path "
                        f"to its file{_tokenizer_hint(init_from)} (a new tokenizer would not match its embedding)")

    if problems:
        raise ConfigError("config: " + "; ".join(problems))


def _tokenizer_hint(init_from: str) -> str:
    """', e.g. WORKDIR/tokenizer.model' when `init_from` is a training workdir with its tokenizer copy."""
    found = Workdir(init_from).tokenizer_path() if os.path.isdir(init_from) else None
    return f" (e.g. {found})" if found else ""
