"""Models, one folder for every RWKV generation behind one interface.

`ModelConfig.version` names the generation; `family_of(config)` gives its `Family` (family.py): the model
class, its state type and empty state, the official weight names, learning-rate multipliers, the
logical axes its parameters carry, its training FLOPs per token and the learned initial state of state
tuning. Code outside `rwkv_jax.model`, `rwkv_jax.ops` and the weights mapping
(rwkv_jax/io/weights.py) reaches a model only through this interface, so that adding a generation adds
files here and touches no trainer, data, eval, generation, lm-eval or AOT code.

Every model class offers, with B rows of T tokens, V the vocabulary and D the model width:

    model = family_of(config).model_class(config, rngs=nnx.Rngs(seed))
    logits_BTV, state = model(tokens_BT, state=None, reset_BT=None, reset_to=None)  # parallel mode
    logits_BV, state = model.step(tokens_B, state)                                   # RNN mode, one token
    hidden_BTD, state = model.hidden(tokens_BT, state, reset_BT, reset_to)           # before ln_out and head
    logits = model.logits(hidden_D)                       # fp32 logits of hidden states of any leading shape
    normed, kernel_DV = model.head_operands(hidden_D)     # what the chunked training loss multiplies
    logp_N, greedy_N = model.token_logprobs(hidden_ND, targets_N)
    state = model.init_state(batch_size)                  # the empty state
    model.config                                          # its ModelConfig

States are NamedTuples of fp32 arrays with the layers first ([n_layer, B, ...]); `reset_BT` (bool [B, T])
restarts every layer's state from `reset_to` (default: empty) before the marked tokens. Parameters carry
`logical_axes` metadata that rwkv_jax.train.sharding maps onto a mesh, and their names follow the official
checkpoints, so that `Family.weights_layout` is a table.

Modules: model_config.py (ModelConfig), family.py (the registry), layers.py (blocks shared by
generations, layer stacking for `lax.scan`), rwkv4.py and initializers.py (RWKV-4 and its official init),
state_file.py (states saved as .npz), lora.py (LoRA adapters on the block projections, built on nnx.LoRALinear,
and their merge).
"""

from rwkv_jax.model.family import VERSIONS, Family, all_lr_multipliers, family, family_of
from rwkv_jax.model.layers import (
                                   check_token_ids,
                                   state_rows,
                                   target_logprobs,
                                   with_kernels_in_compute_dtype,
                                   with_scan_layers,
)
from rwkv_jax.model.model_config import ModelConfig, resolve_scan_layers
from rwkv_jax.model.rwkv4 import RWKV, RWKVState, init_state

__all__ = ["VERSIONS", "Family", "ModelConfig", "RWKV", "RWKVState", "all_lr_multipliers", "check_token_ids",
           "family", "family_of", "init_state", "resolve_scan_layers", "state_rows", "target_logprobs",
           "with_kernels_in_compute_dtype", "with_scan_layers"]
