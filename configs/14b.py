"""RWKV-4 14B: the paper's Table 2 size, 40 layers x 5120, 14,148,597,760 parameters.

Learning rate 1e-4 -> 7e-6 (paper, Appendix G). Load it with ml_collections' config_flags, e.g. as
`--config=configs/14b.py`, and override fields as `--config.model.dtype=bfloat16`.
"""

from rwkv_jax.config import paper_config


def get_config():
    return paper_config(n_layer=40, d_model=5120, lr_init=1e-4, lr_final=7e-6)
