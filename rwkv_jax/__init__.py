"""rwkv-jax: RWKV-4 and RWKV-7 in JAX/Flax NNX, exact to the official implementation.

The names below are imported on first use: `import rwkv_jax.cli...` starts no JAX, so a command can set
up JAX's environment (its platform, XLA's log level: rwkv_jax/cli/runner.py) before JAX is loaded."""

import importlib

_EXPORTS = {"RWKV": "rwkv_jax.model", "ModelConfig": "rwkv_jax.model", "RWKVState": "rwkv_jax.model",
            "load_model": "rwkv_jax.io.weights", "save_model": "rwkv_jax.io.weights",
            "write_model": "rwkv_jax.io.weights"}

__all__ = ["RWKV", "ModelConfig", "RWKVState", "load_model", "save_model", "write_model"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rwkv_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
