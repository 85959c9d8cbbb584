"""A tiny RWKV-4 (4 layers x 128, sentencepiece vocab 4096) trained on the embedded corpus (the Python
standard library's source); the CPU config of the README and the tests.

    python train.py --config=configs/tiny.py --workdir=/tmp/rwkv-tiny
"""

from rwkv_jax.train.train_config import base_config, model_config


def get_config():
    config = base_config(model=model_config(vocab_size=4096, n_layer=4, d_model=128), batch_size=16,
                         seq_len=128, num_steps=600, lr_init=2e-3, lr_final=2e-4)
    config.model.emb_init_scale = 2e-3  # U(-lr_init, lr_init), as v4neo
    config.data.sp_vocab_size = 4096
    config.train.eval_every = 200
    config.train.eval_batches = 20
    config.checkpoint.every_steps = 200
    return config
