"""RWKV-4 3B: the paper's Table 2 size, 32 layers x 2560, 2,984,627,200 parameters, context 1024.

Learning rate 1.5e-4 -> 1e-5 (paper, Appendix G). On the embedded corpus:

    python train.py --config=configs/3b.py --workdir=/tmp/rwkv-3b

The paper's run, on a Pile binidx with the GPT-NeoX tokenizer:

    python train.py --config=configs/3b.py --workdir=/tmp/rwkv-3b --config.data.source=binidx \\
        --config.data.binidx_prefix=/data/pile_text_document --config.data.tokenizer=hf_json \\
        --config.data.tokenizer_path=/data/gpt-neox-20b.json
"""

from rwkv_jax.train.train_config import paper_config


def get_config():
    return paper_config(n_layer=32, d_model=2560, lr_init=1.5e-4, lr_final=1e-5)
