"""State tuning (`optim.trainable='state'`): the model stays frozen and a learned initial state per layer
is trained instead; every training window, and later every document (`eval.py --initial_state`) or
prompt (`generate.py --load_state`), starts from it rather than from the empty state.

The learned state is a small pytree (fp32) whose parameterisation belongs to the model's generation
(`Family.learned_state`), chosen so that any value the optimizer reaches is a valid state:

    RWKV-4 (rwkv_jax/model/rwkv4.py): att_x, ffn_x [L, D]; the WKV numerator wkv_a [L, A], free, and the
        log of its denominator wkv_log_b [L, A] (exponent 0); it starts next to the empty state.
    RWKV-7 (rwkv_jax/model/rwkv7.py): att_x, ffn_x [L, D] and the WKV matrices wkv [L, H, N, N], all
        free; it starts at the empty state.

`to_rwkv_state` broadcasts it over a batch as the model's state; the generation is told by the learned
dict's keys.
"""

from rwkv_jax.model import ModelConfig, state_file
from rwkv_jax.model.family import VERSIONS, LearnedState, family, family_of


def init(config: ModelConfig) -> dict:
    """The learned state of `config`'s model at the start of tuning."""
    return family_of(config).learned_state.init(config)


def _parameterisation(learned: dict) -> LearnedState:
    """The LearnedState whose fields are the keys of `learned`; ValueError naming the known ones."""
    keys = set(learned)
    for version in VERSIONS:
        kind = family(version).learned_state
        if keys == set(kind.fields):
            return kind
    raise ValueError(f"not a learned state: keys {sorted(keys)}; known: "
                     f"{[sorted(family(v).learned_state.fields) for v in VERSIONS]}")


def to_rwkv_state(learned: dict, batch_size: int):
    """The model's state [L, batch_size, *]: the learned state in every row (differentiable)."""
    return _parameterisation(learned).to_state(learned, batch_size)


def save(path, learned: dict, config: ModelConfig) -> None:
    """The learned state as a state file (one row, no logits, the model's shape): what
    `generate.py --load_state` and `eval.py --initial_state` read. Copied to the host first: on a multi-host
    run only process 0 calls this, and no computation may involve the other processes' devices."""
    learned = {k: state_file.host_array(v) for k, v in learned.items()}
    state_file.save_state(path, to_rwkv_state(learned, 1), model_config=config)
