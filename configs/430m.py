"""RWKV-4 430M: the paper's Table 2 size, 24 layers x 1024, 430,397,440 parameters.

Learning rate 4e-4 -> 1e-5 (paper, Appendix G). Load it with ml_collections' config_flags, e.g. as
`--config=configs/430m.py`, and override fields as `--config.model.dtype=bfloat16`.
"""

from rwkv_jax.config import paper_config


def get_config():
    return paper_config(n_layer=24, d_model=1024, lr_init=4e-4, lr_final=1e-5)
