"""Builders for the ml_collections config files in `configs/`.

Each file in `configs/` states only what differs per model size; the defaults live here and in the
modules that own each section (`config.data` in rwkv_jax/data, `config.optim` in rwkv_jax/optim,
`config.mesh` in rwkv_jax/sharding). `config.model` is turned into a `ModelConfig`.
"""

import dataclasses

import ml_collections

from rwkv_jax.data import default_data_config
from rwkv_jax.model import ModelConfig
from rwkv_jax.optim import default_optim_config
from rwkv_jax.sharding import default_mesh_config


def model_config(**overrides) -> ml_collections.ConfigDict:
    """The `config.model` section: every ModelConfig field, defaults overridden by `overrides`."""
    values = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    ModelConfig.from_dict({**values, **overrides})  # fail fast on an unknown key
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
        "loss_chunk_tokens": 2048,     # the head and cross entropy run over this many positions at a time
        "seed": 0,                     # parameter init
        "log_every": 10,
        "eval_every": 500,             # 0: only at the end
        "eval_batches": 50,            # 0: the whole validation split
        "peak_flops_per_device": 0.0,  # for MFU; 0: looked up from the device kind
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
    larger global batches)."""
    model = model_config(vocab_size=50277, n_layer=n_layer, d_model=d_model, emb_init_scale=lr_init,
                         dtype="auto", remat=True, scan_layers=True)
    config = base_config(model=model, batch_size=8, seq_len=1024, num_steps=100_000, lr_init=lr_init,
                         lr_final=lr_final)
    config.train.microbatches = 8
    return config
