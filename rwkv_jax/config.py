"""Builders for the ml_collections config files in `configs/`.

Each file in `configs/` states only what differs per model size; the defaults live here, next to the
`ModelConfig` dataclass they are turned into (`ModelConfig.from_dict(config.model)`).
"""

import dataclasses

import ml_collections

from rwkv_jax.model import ModelConfig


def model_config(**overrides) -> ml_collections.ConfigDict:
    """The `config.model` section: every ModelConfig field, defaults overridden by `overrides`."""
    values = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    ModelConfig.from_dict({**values, **overrides})  # fail fast on an unknown key
    values.update(overrides)
    return ml_collections.ConfigDict(values, type_safe=True)


def paper_config(*, n_layer: int, d_model: int, lr_init: float, lr_final: float) -> ml_collections.ConfigDict:
    """A size of the paper's Table 2: vocab 50277 (GPT-NeoX), context 1024, FFN width 4D; learning
    rates from the paper's Appendix G."""
    config = ml_collections.ConfigDict()
    config.model = model_config(vocab_size=50277, n_layer=n_layer, d_model=d_model)
    config.train = ml_collections.ConfigDict({"seq_len": 1024})
    config.optim = ml_collections.ConfigDict({"lr_init": lr_init, "lr_final": lr_final})
    return config
