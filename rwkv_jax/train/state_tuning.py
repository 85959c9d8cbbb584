"""State tuning (`optim.trainable='state'`): the model stays frozen and a learned initial state per layer
is trained instead; every training window, and later every document (`eval.py --initial_state`) or
prompt (`generate.py --load_state`), starts from it rather than from the empty state.

The learned state is a small pytree (fp32), parameterised so that any value the optimizer reaches is a
valid RWKV state:

    att_x     [L, D]  the previous (LayerNorm'd) input of each layer's time-mix token shift
    ffn_x     [L, D]  the same for the channel mix
    wkv_a     [L, A]  the WKV numerator, free
    wkv_log_b [L, A]  the log of the WKV denominator: b = exp(log_b) > 0 whatever the update

with the WKV exponent p = 0 (the state (a, b, p) means numerator a e^p and denominator b e^p, so p = 0
loses nothing; |log_b| < 88 keeps b a normal fp32 number). It starts next to the empty state: zero
previous inputs and numerator, and a denominator of e^INIT_LOG_B, negligible beside the e^(u + k) of
the first token. `to_rwkv_state` broadcasts it over a batch as the model's RWKVState.
"""

import jax.numpy as jnp

from rwkv_jax.model import ModelConfig, RWKVState, state_file

INIT_LOG_B = -10.0


def init(config: ModelConfig) -> dict:
    """The learned state of `config`'s model at the start of tuning: (nearly) the empty state."""
    L, D, A = config.n_layer, config.d_model, config.att_width
    return {"att_x": jnp.zeros((L, D), jnp.float32), "ffn_x": jnp.zeros((L, D), jnp.float32),
            "wkv_a": jnp.zeros((L, A), jnp.float32), "wkv_log_b": jnp.full((L, A), INIT_LOG_B, jnp.float32)}


def to_rwkv_state(learned: dict, batch_size: int) -> RWKVState:
    """The model's RWKVState [L, batch_size, *]: the learned state in every row (differentiable)."""
    def rows(x):  # [L, W] -> [L, batch_size, W]
        return jnp.broadcast_to(x[:, None].astype(jnp.float32), (x.shape[0], batch_size, x.shape[1]))

    return RWKVState(att_x=rows(learned["att_x"]), wkv_a=rows(learned["wkv_a"]),
                     wkv_b=rows(jnp.exp(learned["wkv_log_b"])), wkv_p=rows(jnp.zeros_like(learned["wkv_a"])),
                     ffn_x=rows(learned["ffn_x"]))


def save(path, learned: dict, config: ModelConfig) -> None:
    """The learned state as a state file (one row, no logits, the model's shape): what
    `generate.py --load_state` and `eval.py --initial_state` read. Copied to the host first: on a multi-host
    run only process 0 calls this, and no computation may involve the other processes' devices."""
    learned = {k: state_file.host_array(v) for k, v in learned.items()}
    state_file.save_state(path, to_rwkv_state(learned, 1), model_config=config)
