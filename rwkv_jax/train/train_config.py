"""The training config: the builders behind the files in `configs/`, the `config.train` and
`config.checkpoint` sections, and `validate`.

Each file in `configs/` states only what differs per model size. Every section's defaults, allowed values
and checks live in the module that owns it: `config.model` in rwkv_jax/model/model_config.py,
`config.data` in rwkv_jax/data/data_config.py, `config.optim` in rwkv_jax/train/optim.py, `config.mesh` in
rwkv_jax/train/sharding.py, `config.train` and `config.checkpoint` here.

`validate(config, mesh)` runs every section's checks, and those between sections, before any data is
prepared or anything compiled: every problem found is reported in one line that names the field and
the fix.
"""

import math
import os

import jax
import ml_collections

from rwkv_jax.data import data_config
from rwkv_jax.io.workdir import Workdir
from rwkv_jax.model import lora as lora_lib
from rwkv_jax.model import model_config as model_section
from rwkv_jax.train import optim, sharding
from rwkv_jax.train.config_checks import Checks, ConfigError  # noqa: F401 (ConfigError: part of this API)

# Integers of the train section are used as int32 step counters and array sizes on the device.
INT32_MAX = 2**31 - 1


def model_config(**overrides) -> ml_collections.ConfigDict:
    """The `config.model` section (model_config.default_section), for the files in `configs/`."""
    return model_section.default_section(**overrides)


def base_config(*, model: ml_collections.ConfigDict, batch_size: int, seq_len: int, num_steps: int,
                lr_init: float, lr_final: float) -> ml_collections.ConfigDict:
    """A complete training config; every section has defaults that `--config.x.y=z` can override."""
    config = ml_collections.ConfigDict()
    config.model = model
    config.data = data_config.default_data_config()
    config.train = ml_collections.ConfigDict({
        "num_steps": num_steps,
        "batch_size": batch_size,      # global batch, in sequences
        "seq_len": seq_len,
        "microbatches": 1,             # gradient accumulation: batch_size / microbatches rows at a time
        "bptt_windows": 1,             # K > 1: each row reads K consecutive windows of seq_len per step, run by
                                       # a scan with the gradient flowing across them and one window's
                                       # activations in memory (remat); eval windows are K x seq_len too
        "loss_chunk_tokens": optim.LOSS_CHUNK_TOKENS,  # positions the head and cross entropy take at a time
        "seed": 0,                     # parameter init
        "log_every": 10,
        "eval_every": 500,             # 0: only at the end
        "eval_batches": 50,            # 0: the whole validation split
        "peak_flops_per_device": 0.0,  # for MFU; 0: looked up from the device kind
        "allow_data_change": False,    # resume although the data setup differs from the checkpoint's
        "init_from": "",               # start from this trained model (workdir, .pth, HF or rwkv_jax directory):
                                       # its parameters, a fresh optimizer; '' = random init
    })
    config.optim = optim.default_optim_config()
    config.optim.lr_init = lr_init
    config.optim.lr_final = lr_final
    config.checkpoint = ml_collections.ConfigDict({"every_steps": 1000, "keep": 3, "async_save": True})
    config.mesh = sharding.default_mesh_config()
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


def rwkv7_paper_config(*, n_layer: int, d_model: int, vocab_size: int, lr_init: float, lr_final: float,
                       weight_decay: float, seq_len: int = 4096) -> ml_collections.ConfigDict:
    """An RWKV-7 (x070) size of the official runs: head size 64, the LoRA widths of the official sizing
    rule (rwkv_jax.model.rwkv7.lora_dims), FFN width 4D, context 4096, emb U(-1e-4, 1e-4), and the
    optimizer of RWKV-LM's RWKV-v7/train_temp (demo-training-run-v7-pile.sh, src/trainer.py, src/model.py):
    Adam beta2 0.99, eps 1e-18, 10 warmup steps, layerwise lr (w0 x2). `vocab_size`: 50304 for the Pile
    models (GPT-NeoX's 50277, padded), 65536 for the World models. The global batch is 16 sequences in one
    microbatch, so that issue 28's `--compile_only --topology=v5e:4x4 --config.mesh.fsdp=-1
    --config.mesh.data=1` puts one row on each chip; on one CPU add `--config.train.microbatches=16` (the
    official Pile run: 8 GPUs x 30 sequences). Layers are stacked and scanned on GPU/TPU and a list on CPU
    (`scan_layers='auto'`, as RWKV-4's paper configs), each rematerialised in the backward pass.

    Where x070's recipe differs from v4neo's (`paper_config`), this follows x070:
      * the schedule: warmup from 0.01 x lr_init (v4neo: 0.2), then a cosine towards lr_final that
        reaches it at the last step (v4neo: exponential), optim.learning_rate has both;
      * weight decay (0 in v4neo's runs) on the 2-D `*.weight` tensors only (src/model.py
        configure_optimizers): emb, head and the blocks' projections; not the LoRAs (w1/w2, a1/a2, v1/v2,
        g1/g2), r_k or any vector. optim.param_groups' 'matrix' group is exactly that set;
      * Adam eps 1e-18 (v4neo: 1e-8) and the 2x learning rate on w0 (v4neo: time_decay x2, time_first x3)."""
    model = model_config(version=7, vocab_size=vocab_size, n_layer=n_layer, d_model=d_model, head_size=64,
                         emb_init_scale=1e-4, dtype="auto", remat=True, scan_layers="auto")
    config = base_config(model=model, batch_size=16, seq_len=seq_len, num_steps=100_000, lr_init=lr_init,
                         lr_final=lr_final)
    config.optim.update(beta2=0.99, eps=1e-18, warmup_steps=10, weight_decay=weight_decay, layerwise_lr=True,
                        schedule="cosine", warmup_from=0.01)
    return config


def _check_train_section(checks: Checks, mesh) -> None:
    t = checks.config.train
    for field in ("num_steps", "batch_size", "seq_len", "microbatches", "bptt_windows", "log_every",
                  "loss_chunk_tokens"):
        checks.at_least("train", field, 1)
    checks.at_least("train", "eval_every", 0, " (0: evaluate only at the end)")
    checks.at_least("train", "eval_batches", 0, " (0: the whole validation split)")
    checks.at_least("train", "peak_flops_per_device", 0, " (0: looked up from the device kind)")
    for field in ("num_steps", "batch_size", "seq_len", "microbatches", "bptt_windows", "log_every",
                  "loss_chunk_tokens", "eval_every", "eval_batches", "seed"):
        value = t[field]
        checks.need(not isinstance(value, int) or abs(value) <= INT32_MAX,
                    f"train.{field}={value} is out of range: at most {INT32_MAX}")
    checks.need(not isinstance(t.seq_len, int) or not isinstance(t.batch_size, int)
                or t.seq_len * t.bptt_windows * t.batch_size <= INT32_MAX,
                "train.batch_size x train.seq_len x train.bptt_windows tokens per step must be at most "
                f"{INT32_MAX}")
    if checks.problems:  # the divisibility checks need positive sizes
        return
    if t.batch_size % t.microbatches:
        checks.need(False, f"train.batch_size={t.batch_size} is not a multiple of train.microbatches={t.microbatches}")
    elif mesh is not None:
        batch_axes = math.prod(mesh.shape[a] for a in sharding.RULES["batch"])
        checks.need((t.batch_size // t.microbatches) % batch_axes == 0,
                    f"a microbatch of {t.batch_size // t.microbatches} rows does not split over the "
                    f"{batch_axes} devices of the mesh's data x fsdp axes: raise train.batch_size or lower "
                    "train.microbatches")
    checks.need(t.batch_size % jax.process_count() == 0,
                f"train.batch_size={t.batch_size} does not split over {jax.process_count()} processes")


def _check_checkpoint_section(checks: Checks) -> None:
    checks.at_least("checkpoint", "every_steps", 1)
    checks.at_least("checkpoint", "keep", 1, " (the newest checkpoints kept; 0 would delete the final one too)")
    for field in ("every_steps", "keep"):  # steps are int32 on the device
        value = checks.config.checkpoint[field]
        checks.need(not isinstance(value, int) or value <= INT32_MAX,
                    f"checkpoint.{field}={value} is out of range: at most {INT32_MAX}")


def _check_across_sections(checks: Checks, resuming: bool) -> None:
    """What one section's value means for another's: the tokenizer against the model and init_from."""
    config = checks.config
    d, m, t = config.data, config.model, config.train
    init_from = os.path.expanduser(t.init_from) if t.init_from else ""
    checks.need(config.optim.trainable != "state" or bool(init_from),
                "optim.trainable='state' tunes the initial state of a trained model: set train.init_from to its "
                "workdir, .pth, HF or rwkv_jax directory")
    if config.optim.trainable == "lora":
        problem = lora_lib.target_problem(m.get("version", 4), lora_lib.parse_targets(config.optim.lora_targets))
        checks.need(problem is None, str(problem))
        checks.need(not config.optim.lora_init or bool(init_from),
                    "optim.lora_init adapts a trained model: set train.init_from to the model the adapters were "
                    "trained on")
    # A resumed run restores its parameters from its own checkpoint: the model it started from may be gone.
    checks.need(not init_from or resuming or os.path.exists(init_from),
                f"train.init_from={t.init_from!r} does not exist")
    path = os.path.expanduser(d.tokenizer_path) if d.tokenizer_path else ""
    if d.tokenizer == "sentencepiece" and d.source != "binidx" and not (path and os.path.isfile(path)):
        minimum = data_config.MIN_SP_VOCAB_SIZE
        checks.need(isinstance(d.sp_vocab_size, int) and d.sp_vocab_size >= minimum,
                    f"data.sp_vocab_size must be >= {minimum} (256 byte pieces, </s>, <unk> and a newline "
                    f"piece), got {d.sp_vocab_size!r}")
        checks.need(not isinstance(m.vocab_size, int) or d.sp_vocab_size <= m.vocab_size,
                    f"data.sp_vocab_size={d.sp_vocab_size} is larger than model.vocab_size={m.vocab_size}: "
                    "token ids would not fit the embedding")
    if init_from and not (path and os.path.isfile(path)):
        checks.need(False, "train.init_from needs the tokenizer that model was trained with: set "
                    f"data.tokenizer_path to its file{_tokenizer_hint(init_from)} (a new tokenizer would not match "
                    "its embedding)")


def validate(config: ml_collections.ConfigDict, mesh=None, *, resuming: bool = False) -> None:
    """Raise ConfigError (one line) if any value of a training config cannot work. Called before the data
    is prepared and before anything is compiled or written. `mesh` (optional) adds the batch-split check.
    `resuming`: the workdir holds a checkpoint, so `train.init_from` is not read and need not exist."""
    checks = Checks(config)
    model_section.check_section(checks)
    _check_train_section(checks, mesh)
    optim.check_section(checks)
    _check_checkpoint_section(checks)
    data_config.check_section(checks)
    _check_across_sections(checks, resuming)
    checks.raise_if_any()


def _tokenizer_hint(init_from: str) -> str:
    """', e.g. WORKDIR/tokenizer.model' when `init_from` is a training workdir with its tokenizer copy."""
    found = Workdir(init_from).tokenizer_path() if os.path.isdir(init_from) else None
    return f" (e.g. {found})" if found else ""
