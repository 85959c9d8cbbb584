"""RWKV-7 World 7.2B: 32 layers x 4096, heads of 64, vocab 65536, 7,174,766,592 parameters
(tests/test_rwkv7_train.py counts them from the official weights layout), context 4096.

Learning rate 2e-4 -> 1e-5, weight decay 0.1: an assumption. RWKV-LM's RWKV-v7/train_temp gives no
rate for this size (train.py's --lr_init help stops at "3e-4 for L24-D2048", lr_final 1e-5 is its
default; weight decay 0.1 is demo-training-run-v7-pile.sh's).
The LoRA widths follow the official sizing rule (rwkv_jax.model.rwkv7.official_lora_dim); for a
checkpoint trained with other widths, `train.init_from` or convert.py read them from its tensors.
On the embedded corpus:

    python train.py --config=configs/rwkv7_7b2.py --workdir=/tmp/rwkv7-7b2 --config.train.microbatches=16  # one CPU

On the World corpus (vocab 65536, the RWKV World tokenizer):

    python train.py --config=configs/rwkv7_7b2.py --workdir=/tmp/rwkv7-7b2 --config.data.source=binidx \\
        --config.data.binidx_prefix=/data/world_text_document --config.data.tokenizer=rwkv_world \\
        --config.data.tokenizer_path=/data/rwkv_vocab_v20230424.txt
"""

from rwkv_jax.train.train_config import rwkv7_paper_config


def get_config():
    return rwkv7_paper_config(n_layer=32, d_model=4096, vocab_size=65536, lr_init=2e-4, lr_final=1e-5,
                              weight_decay=0.1)
