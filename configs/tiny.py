"""A tiny RWKV-4 (4 layers x 128, vocab 4096) for CPU runs and tests.

Load it with ml_collections' config_flags as `--config=configs/tiny.py`; override fields as
`--config.model.n_layer=2`.
"""

import ml_collections

from rwkv_jax.config import model_config


def get_config():
    config = ml_collections.ConfigDict()
    config.model = model_config(vocab_size=4096, n_layer=4, d_model=128)
    config.train = ml_collections.ConfigDict({"seq_len": 256})
    config.optim = ml_collections.ConfigDict({"lr_init": 1e-3, "lr_final": 1e-4})
    return config
