"""RWKV-7 World 1.5B (RWKV7-Goose-World-1.5B): 24 layers x 2048, heads of 64, vocab 65536, 1,530,814,464 parameters
(tests/test_rwkv7_train.py counts them from the official weights layout), context 4096.

Learning rate 3e-4: RWKV-LM's RWKV-v7/train_temp/train.py, whose --lr_init help says "3e-4 for
L24-D2048"; lr_final 1e-5: that file's default. Weight decay 0.1: the Pile demo's
(RWKV-v7/train_temp/demo-training-run-v7-pile.sh; no official script trains the World sizes).
The LoRA widths follow the official sizing rule (rwkv_jax.model.rwkv7.official_lora_dim); for a
checkpoint trained with other widths, `train.init_from` or convert.py read them from its tensors.
On the embedded corpus:

    python train.py --config=configs/rwkv7_1b5.py --workdir=/tmp/rwkv7-1b5 --config.train.microbatches=16  # one CPU

On the World corpus (vocab 65536, the RWKV World tokenizer):

    python train.py --config=configs/rwkv7_1b5.py --workdir=/tmp/rwkv7-1b5 --config.data.source=binidx \\
        --config.data.binidx_prefix=/data/world_text_document --config.data.tokenizer=rwkv_world \\
        --config.data.tokenizer_path=/data/rwkv_vocab_v20230424.txt
"""

from rwkv_jax.train.train_config import rwkv7_paper_config


def get_config():
    return rwkv7_paper_config(n_layer=24, d_model=2048, vocab_size=65536, lr_init=3e-4, lr_final=1e-5,
                              weight_decay=0.1)
