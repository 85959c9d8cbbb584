"""RWKV-7 Pile 421M (RWKV7-Goose-Pile-421M): 24 layers x 1024, heads of 64, vocab 50304, 422,785,024 parameters
(tests/test_rwkv7_train.py counts them from the official weights layout), context 4096.

Learning rate 4e-4: RWKV-LM's RWKV-v7/train_temp/train.py, whose --lr_init help says "6e-4 for L12-D768,
4e-4 for L24-D1024, 3e-4 for L24-D2048". lr_final 3e-5 and weight decay 0.1: the Pile demo's
(RWKV-v7/train_temp/demo-training-run-v7-pile.sh, for 168M; no official script trains this size).
The LoRA widths follow the official sizing rule (rwkv_jax.model.rwkv7.official_lora_dim); for a
checkpoint trained with other widths, `train.init_from` or convert.py read them from its tensors.
On the embedded corpus:

    python train.py --config=configs/rwkv7_421m.py --workdir=/tmp/rwkv7-421m --config.train.microbatches=16  # one CPU

On a Pile binidx with the GPT-NeoX tokenizer as RWKV-LM's demo-training-run-v7-pile.sh (vocab 50304:
GPT-NeoX's 50277 padded):

    python train.py --config=configs/rwkv7_421m.py --workdir=/tmp/rwkv7-421m --config.data.source=binidx \\
        --config.data.binidx_prefix=/data/pile_text_document --config.data.tokenizer=hf_json \\
        --config.data.tokenizer_path=/data/gpt-neox-20b.json
"""

from rwkv_jax.train.train_config import rwkv7_paper_config


def get_config():
    return rwkv7_paper_config(n_layer=24, d_model=1024, vocab_size=50304, lr_init=4e-4, lr_final=3e-5,
                              weight_decay=0.1)
