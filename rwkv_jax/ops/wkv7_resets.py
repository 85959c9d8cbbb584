"""The document-reset arguments of the WKV-7 forms (rwkv_jax/ops/wkv7.py) and kernels
(rwkv_jax/ops/wkv7_pallas.py), checked and brought to one shape: a module of its own so that the kernels
need not import the forms that dispatch to them."""

import jax.numpy as jnp


def prepare_resets(reset_BT, reset_state, shape_BHNN, T, dtype):
    """(reset mask bool [B, T], the reset state [B, H, N, N] in the compute dtype), or None."""
    if reset_BT is None:
        if reset_state is not None:
            raise ValueError("reset_state was given without reset_BT: pass the positions to reset at")
        return None
    if jnp.shape(reset_BT) != (shape_BHNN[0], T):
        raise ValueError(f"reset_BT must be [batch, time] = {(shape_BHNN[0], T)}, got {jnp.shape(reset_BT)}")
    if reset_state is None:
        reset_state = jnp.zeros(shape_BHNN, dtype)
    reset_state = jnp.broadcast_to(jnp.asarray(reset_state).astype(dtype), shape_BHNN)
    return jnp.asarray(reset_BT, bool), reset_state
