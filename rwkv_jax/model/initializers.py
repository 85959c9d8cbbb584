"""Parameter initialisation of the official RWKV-LM v4neo code, as pure functions.

Where the paper (Appendix E) and the v4neo code disagree we follow the code, since the released models
were trained with it:
  * receptance mix: the paper writes mu_r = 0.5 * (i/D)^(1 - l/L); the code uses (i/D)^(0.5 * (1 - l/L)).
  * embedding: small uniform values. v4neo draws them from U(-lr_init, lr_init), later RWKV versions
    from U(-1e-4, 1e-4). `ModelConfig.emb_init_scale` defaults to 1e-4; the paper-size configs set it
    to their lr_init, as v4neo does.
  * matrices: orthogonal with gain sqrt(out/in) when out > in; att.key, att.receptance, att.output,
    ffn.receptance and ffn.value start at zero; the head has gain 0.5 * sqrt(V/D).
LayerNorms start at weight 1 and bias 0.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np


def _depth_ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
    """(0 -> 1 over the layers, 1 -> almost 0 over the layers), as in v4neo."""
    ratio_0_to_1 = layer_id / max(n_layer - 1, 1)  # v4neo divides by n_layer - 1; guard n_layer == 1
    ratio_1_to_almost0 = 1.0 - layer_id / n_layer
    return ratio_0_to_1, ratio_1_to_almost0


def _channel_fraction(width: int) -> np.ndarray:
    """i / width for i = 0..width-1: the `ddd` ramp of v4neo."""
    return np.arange(width, dtype=np.float64) / width


def time_decay(layer_id: int, n_layer: int, d_att: int) -> np.ndarray:
    """Per-channel log-log decay: -5 + 8 * (h / (A-1))^(0.7 + 1.3 * l/(L-1)). Shape [A]."""
    ratio_0_to_1, _ = _depth_ratios(layer_id, n_layer)
    h = np.arange(d_att, dtype=np.float64) / max(d_att - 1, 1)
    return (-5.0 + 8.0 * h ** (0.7 + 1.3 * ratio_0_to_1)).astype(np.float32)


def time_first(d_att: int) -> np.ndarray:
    """log(0.3) plus a zigzag of 0.5 * ((i + 1) mod 3 - 1). Shape [A]."""
    zigzag = 0.5 * ((np.arange(d_att) + 1) % 3 - 1)
    return (math.log(0.3) + zigzag).astype(np.float32)


def time_mix_att(layer_id: int, n_layer: int, d_model: int) -> dict[str, np.ndarray]:
    """TimeMix token-shift mixes k, v, r. Each shape [D]."""
    ratio_0_to_1, ratio_1_to_almost0 = _depth_ratios(layer_id, n_layer)
    ddd = _channel_fraction(d_model)
    return {
        "k": (ddd ** ratio_1_to_almost0).astype(np.float32),
        "v": (ddd ** ratio_1_to_almost0 + 0.3 * ratio_0_to_1).astype(np.float32),
        "r": (ddd ** (0.5 * ratio_1_to_almost0)).astype(np.float32),
    }


def time_mix_ffn(layer_id: int, n_layer: int, d_model: int) -> dict[str, np.ndarray]:
    """ChannelMix token-shift mixes k, r. Each shape [D]."""
    _, ratio_1_to_almost0 = _depth_ratios(layer_id, n_layer)
    ramp = (_channel_fraction(d_model) ** ratio_1_to_almost0).astype(np.float32)
    return {"k": ramp, "r": ramp.copy()}


def orthogonal_gain(fan_in: int, fan_out: int) -> float:
    """v4neo's gain for a weight of torch shape [out, in]: sqrt(out / in) when out > in, else 1."""
    return math.sqrt(fan_out / fan_in) if fan_out > fan_in else 1.0


def orthogonal(scale: float = 1.0) -> jax.nn.initializers.Initializer:
    """Orthogonal init for a kernel stored [in, out], with v4neo's gain times `scale`."""
    def init(key, shape, dtype=jnp.float32):
        fan_in, fan_out = shape
        gain = orthogonal_gain(fan_in, fan_out) * scale
        return jax.nn.initializers.orthogonal(scale=gain)(key, shape, dtype)
    return init


def symmetric_uniform(scale: float) -> jax.nn.initializers.Initializer:
    """U(-scale, scale)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval=-scale, maxval=scale)
    return init
