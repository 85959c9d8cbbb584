"""RWKV-4 1B5: the paper's Table 2 size, 24 layers x 2048, 1,515,106,304 parameters.

Learning rate 3e-4 -> 1e-5 (paper, Appendix G). Load it with ml_collections' config_flags, e.g. as
`--config=configs/1b5.py`, and override fields as `--config.model.dtype=bfloat16`.
"""

from rwkv_jax.config import paper_config


def get_config():
    return paper_config(n_layer=24, d_model=2048, lr_init=3e-4, lr_final=1e-5)
