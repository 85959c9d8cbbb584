"""RWKV-4 3B: the paper's Table 2 size, 32 layers x 2560, 2,984,627,200 parameters.

Learning rate 1.5e-4 -> 1e-5 (paper, Appendix G). Load it with ml_collections' config_flags, e.g. as
`--config=configs/3b.py`, and override fields as `--config.model.dtype=bfloat16`.
"""

from rwkv_jax.config import paper_config


def get_config():
    return paper_config(n_layer=32, d_model=2560, lr_init=1.5e-4, lr_final=1e-5)
