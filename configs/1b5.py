"""RWKV-4 1B5: the paper's Table 2 size, 24 layers x 2048, 1,515,106,304 parameters, context 1024.

Learning rate 3e-4 -> 1e-5 (paper, Appendix G). On the embedded corpus:

    python train.py --config=configs/1b5.py --workdir=/tmp/rwkv-1b5

The paper's run, on a Pile binidx with the GPT-NeoX tokenizer:

    python train.py --config=configs/1b5.py --workdir=/tmp/rwkv-1b5 --config.data.source=binidx \\
        --config.data.binidx_prefix=/data/pile_text_document --config.data.tokenizer=hf_json \\
        --config.data.tokenizer_path=/data/gpt-neox-20b.json
"""

from rwkv_jax.train.train_config import paper_config


def get_config():
    return paper_config(n_layer=24, d_model=2048, lr_init=3e-4, lr_final=1e-5)
