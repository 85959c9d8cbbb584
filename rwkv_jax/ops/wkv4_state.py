"""The state of the RWKV-4 WKV operator, shared by its pure-JAX forms (wkv4.py) and its Pallas kernels
(wkv4_pallas.py), so that neither imports the other's module for it."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

# log(0) stand-in for an empty state, as in the official `rwkv` package; finite on purpose (see above).
EMPTY_EXPONENT = -1e30


class WKVState(NamedTuple):
    """Running WKV sums of one layer: numerator a*e^p and denominator b*e^p, each [B, C] fp32."""
    a: jax.Array
    b: jax.Array
    p: jax.Array


def empty_state(batch_size: int, channels: int, dtype=jnp.float32) -> WKVState:
    zeros = jnp.zeros((batch_size, channels), dtype)
    return WKVState(zeros, zeros, jnp.full((batch_size, channels), EMPTY_EXPONENT, dtype))
