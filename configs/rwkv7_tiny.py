"""A tiny RWKV-7 (x070; 4 layers x 128, 4 heads of 32, sentencepiece vocab 4096) trained on the embedded
corpus (the Python standard library's source): configs/tiny.py's data, schedule and size for the seventh
generation.

    python train.py --config=configs/rwkv7_tiny.py --workdir=/tmp/rwkv7-tiny

Parameters: 1,976,320, against 1,906,688 for configs/tiny.py's RWKV-4 (+3.7%; tests/test_rwkv7_train.py
counts both). The LoRA widths are the official rule's for D=128 (decay, in-context learning rate and
value residual 32) but for the gate's, 32 instead of 64: with it the model would be 5.4% larger.
"""

from rwkv_jax.train.train_config import base_config, model_config


def get_config():
    model = model_config(version=7, vocab_size=4096, n_layer=4, d_model=128, head_size=32, d_gate_lora=32,
                         scan_layers=False)
    config = base_config(model=model, batch_size=16, seq_len=128, num_steps=600, lr_init=2e-3, lr_final=2e-4)
    config.model.emb_init_scale = 1e-4  # the official x070 trainer's U(-1e-4, 1e-4)
    config.data.sp_vocab_size = 4096
    config.train.eval_every = 200
    config.train.eval_batches = 20
    config.checkpoint.every_steps = 200
    return config
