"""rwkv-jax: RWKV-4 and RWKV-7 in JAX/Flax NNX, exact to the official implementation."""

from rwkv_jax.io.weights import load_model, save_model, write_model
from rwkv_jax.model import RWKV, ModelConfig, RWKVState

__all__ = ["RWKV", "ModelConfig", "RWKVState", "load_model", "save_model", "write_model"]
