"""RWKV-4 14B: the paper's Table 2 size, 40 layers x 5120, 14,148,597,760 parameters, context 1024.

Learning rate 1e-4 -> 7e-6 (paper, Appendix G). On the embedded corpus:

    python train.py --config=configs/14b.py --workdir=/tmp/rwkv-14b

The paper's run, on a Pile binidx with the GPT-NeoX tokenizer:

    python train.py --config=configs/14b.py --workdir=/tmp/rwkv-14b --config.data.source=binidx \\
        --config.data.binidx_prefix=/data/pile_text_document --config.data.tokenizer=hf_json \\
        --config.data.tokenizer_path=/data/gpt-neox-20b.json
"""

from rwkv_jax.train.train_config import paper_config


def get_config():
    return paper_config(n_layer=40, d_model=5120, lr_init=1e-4, lr_final=7e-6)
