"""RWKV-4 169M: the paper's Table 2 size, 12 layers x 768, 169,342,464 parameters, context 1024.

Learning rate 6e-4 -> 1e-5 (paper, Appendix G). On the embedded corpus:

    python train.py --config=configs/169m.py --workdir=/tmp/rwkv-169m

The paper's run, on a Pile binidx with the GPT-NeoX tokenizer:

    python train.py --config=configs/169m.py --workdir=/tmp/rwkv-169m --config.data.source=binidx \\
        --config.data.binidx_prefix=/data/pile_text_document --config.data.tokenizer=hf_json \\
        --config.data.tokenizer_path=/data/gpt-neox-20b.json
"""

from rwkv_jax.train.train_config import paper_config


def get_config():
    return paper_config(n_layer=12, d_model=768, lr_init=6e-4, lr_final=1e-5)
