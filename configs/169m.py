"""RWKV-4 169M: the paper's Table 2 size, 12 layers x 768, 169,342,464 parameters.

Learning rate 6e-4 -> 1e-5 (paper, Appendix G). Load it with ml_collections' config_flags, e.g. as
`--config=configs/169m.py`, and override fields as `--config.model.dtype=bfloat16`.
"""

from rwkv_jax.config import paper_config


def get_config():
    return paper_config(n_layer=12, d_model=768, lr_init=6e-4, lr_final=1e-5)
