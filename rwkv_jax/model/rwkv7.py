"""The RWKV-7 "Goose" (x070) language model in Flax NNX, behind the same interface as RWKV-4
(rwkv_jax/model/__init__.py):

    logits_BTV, state = model(tokens_BT, state=None)   # parallel mode over a sequence
    logits_BTV, state = model(tokens_BT, reset_BT=...)  # documents packed in a row, each from the empty state
    logits_BV, state = model.step(tokens_B, state)      # RNN mode, one token
    hidden_BTD, state = model.hidden(tokens_BT, state)  # the residual stream after the last block (no head)
    state = model.init_state(batch_size)

Module and parameter names mirror the official checkpoint (`blocks.0.att.w0`, `blocks.0.ffn.key.weight`,
...), so `weights_layout` is a table: nnx.Linear's `kernel` is the transposed `weight`, LayerNorm and the
per-head GroupNorm's `scale` is `weight`, and the per-channel vectors the official trainer saves as
[1, 1, D] are kept as [D].

Numerics follow the official `rwkv` package (rwkv/model.py, RWKV_x070 with RWKV_V7_ON=1), the reference of
tests/test_rwkv7_model.py. Per layer, with x the LayerNorm'd input and dx the token shift's difference:

    r, k, v = projections of x + dx * x_{r,k,v}
    w = exp(-e^-0.5 * sigmoid(w0 + tanh(x_w W1) W2))        the decay, in (0.545, 1)
    a = sigmoid(a0 + (x_a A1) A2)                             the in-context learning rate
    kk = normalize(k * k_k) per head;  k <- k * (1 + (a - 1) * k_a)
    v <- v + (v_first - v) * sigmoid(v0 + (x_v V1) V2)        (layers > 0: the value residual to layer 0)
    y = WKV-7(r, w, k, v, -kk, kk * a)  (rwkv_jax/ops/wkv7.py), GroupNorm per head (ln_x, eps 64e-5)
    y <- y + ((r * k * r_k).sum per head) * v;  out = (y * g) W_o with g = sigmoid(x_g G1) G2

The residual stream, the LayerNorms, the per-head GroupNorm and the WKV state are fp32; the projections
run in `config.dtype`, and so do the streams the Pallas kernel reads (but the decay). Per-head sums are
products with a [D, H] head matrix (`_head_sum`).
"""

import functools
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.model.family import Family, LearnedState
from rwkv_jax.model.layers import check_token_ids, linear, param, remat_policy, stack_layers, target_logprobs
from rwkv_jax.model.model_config import ModelConfig
from rwkv_jax.ops import wkv7 as wkv7_ops
from rwkv_jax.train import sharding

# exp(-0.5): the decay is w = exp(-DECAY_SCALE * sigmoid(w0 + lora)), in (exp(-exp(-0.5)), 1) = (0.545, 1).
# The paper writes it w = exp(-exp(w')) with the soft clamp w' = -softplus(-(w0 + lora)) - 0.5, the same
# number since exp(-softplus(-z)) = sigmoid(z). The official package rounds the constant to 0.606531
# (a 6e-8 relative difference); the official training kernels use -0.6065306597, as here.
DECAY_SCALE = math.exp(-0.5)
HEAD_NORM_EPS = 64e-5   # ln_x's eps in the official code (not the LayerNorms' 1e-5)
NORMALIZE_EPS = 1e-12   # torch.nn.functional.normalize's default, used for kk

# Per-channel vectors the official trainer stores as [1, 1, D] (kept here as [D]).
_ATT_VECTORS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a")
_LORAS = {"w": "d_decay_lora", "a": "d_aaa_lora", "v": "d_mv_lora", "g": "d_gate_lora"}
_LORA_FACTORS = {"w": 2.5, "a": 2.5, "v": 1.7, "g": 5.0}


def official_lora_dim(d_model: int, factor: float) -> int:
    """The official trainer's LoRA width: factor * sqrt(D), rounded to a multiple of 32, at least 32
    (decay and in-context learning rate: 2.5, value residual: 1.7, gate: 5)."""
    return max(32, int(round((factor * (d_model ** 0.5)) / 32) * 32))


def n_head(config: ModelConfig) -> int:
    return config.d_model // config.head_size


def lora_dims(config: ModelConfig) -> dict[str, int]:
    """LoRA width by name: w (decay), a (in-context learning rate), v (value residual), g (gate)."""
    return {name: getattr(config, field) or official_lora_dim(config.d_model, _LORA_FACTORS[name])
            for name, field in _LORAS.items()}


class RWKV7State(NamedTuple):
    """Recurrent state of all layers, fp32: the LayerNorm'd previous inputs of both token shifts
    [n_layer, B, D] and the WKV matrices [n_layer, B, H, N, N] (value index, key index)."""
    att_x: jax.Array
    wkv: jax.Array
    ffn_x: jax.Array


def init_state(config: ModelConfig, batch_size: int) -> RWKV7State:
    L, B, D, N = config.n_layer, batch_size, config.d_model, config.head_size
    zeros_D = jnp.zeros((L, B, D), jnp.float32)
    return RWKV7State(zeros_D, jnp.zeros((L, B, n_head(config), N, N), jnp.float32), zeros_D)


def _att_vector_init(layer_id: int, config: ModelConfig) -> dict[str, np.ndarray]:
    """The official trainer's initial per-channel vectors (RWKV_Tmix_x070.__init__), fp32 [D] or [H, N]."""
    D, N, L = config.d_model, config.head_size, config.n_layer
    ratio_0_to_1 = layer_id / max(L - 1, 1)
    ratio_1_to_almost0 = 1.0 - layer_id / L
    n = np.arange(D, dtype=np.float64)
    ddd = n / D
    linear_D = n / (D - 1) - 0.5
    zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zigzag * np.abs(zigzag)
    www = -6 + 6 * (n / (D - 1)) ** (1 + ratio_0_to_1 ** 0.3)
    mix = lambda power: 1.0 - ddd ** (power * ratio_1_to_almost0)
    out = {"x_r": mix(0.2), "x_w": mix(0.9), "x_k": mix(0.7), "x_v": mix(0.7), "x_a": mix(0.9),
           "x_g": mix(0.2), "w0": www + 0.5 + zigzag * 2.5, "a0": -0.19 + zigzag * 0.3 + linear_D * 0.4,
           "v0": 0.73 - linear_D * 0.4, "k_k": 0.71 - linear_D * 0.1, "k_a": np.full(D, 1.02),
           "r_k": np.full((n_head(config), N), -0.04)}
    return {k: v.astype(np.float32) for k, v in out.items()}


def _uniform(s: float):
    """U(-s, s), the official trainer's `uniform_(-s, s)`."""
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -s, s)


def _layer_norm(width, config: ModelConfig, rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=config.layer_norm_eps, dtype=jnp.float32, param_dtype=config.param_dtype,
                         scale_metadata={"logical_axes": ("embed",)}, bias_metadata={"logical_axes": ("embed",)},
                         rngs=rngs)


def _head_matrix(config: ModelConfig) -> jax.Array:
    """[D, H] fp32: 1 where channel d belongs to head h (channels are head-major: d = h N + n)."""
    return jnp.asarray(np.repeat(np.eye(n_head(config), dtype=np.float32), config.head_size, axis=0))


def _head_sum(x_BTD, heads_DH):
    """Each head's sum of x over its N channels, [B, T, H] fp32. A product with the head matrix rather than
    a sum over a reshaped [B, T, H, N]: on TPU a reduction over an N = 64 minor dimension (half the 128
    lanes) makes XLA transpose its operands (T minor) before and after it, copies of every [B, T, D]
    operand on each pass; the product reads x where it is. Precision.HIGHEST: an fp32 sum (the matrix
    is 0/1)."""
    return jnp.dot(x_BTD.astype(jnp.float32), heads_DH, precision=jax.lax.Precision.HIGHEST)


def _per_channel(x_BTH, heads_DH):
    """A per-head value [B, T, H] spread over the head's channels, [B, T, D] (exact: one 1 per column)."""
    return jnp.dot(x_BTH, heads_DH.T, precision=jax.lax.Precision.HIGHEST)


class HeadNorm(nnx.Module):
    """GroupNorm with one group per head (the official `ln_x`): each head's N channels normalized on their
    own (biased variance, eps 64e-5), then a per-channel scale and bias; fp32."""

    def __init__(self, config: ModelConfig, scale: float = 1.0):
        D = config.d_model
        self.scale = param(jnp.full((D,), scale, config.param_dtype), ("attn",))
        self.bias = param(jnp.zeros((D,), config.param_dtype), ("attn",))

    def __call__(self, y_BTD, heads_DH):
        """y [..., D] (head-major channels) normalized per head, fp32 [..., D]."""
        y, N = y_BTD.astype(jnp.float32), heads_DH.shape[0] // heads_DH.shape[1]
        mean = _per_channel(_head_sum(y, heads_DH) / N, heads_DH)
        centred = y - mean
        var = _head_sum(jnp.square(centred), heads_DH) / N
        y = centred * _per_channel(jax.lax.rsqrt(var + HEAD_NORM_EPS), heads_DH)
        return y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


def _shift_delta(x_BTD, prev_BD, reset_BT=None, reset_prev_BD=None):
    """The token shift's difference: the previous token's input minus this one's (the previous call's last
    input before the first token; the reset state's, zeros by default, at reset positions)."""
    shifted = jnp.concatenate([prev_BD[:, None].astype(x_BTD.dtype), x_BTD[:, :-1]], axis=1)
    if reset_BT is not None:
        reset_prev = 0.0 if reset_prev_BD is None else reset_prev_BD[:, None].astype(x_BTD.dtype)
        shifted = jnp.where(reset_BT[:, :, None], reset_prev, shifted)
    return shifted - x_BTD


class TimeMix(nnx.Module):
    """The attention-like sublayer: token shift, r/k/v projections, data-dependent decay (w), in-context
    learning rate (a), value residual (v0..v2, towards layer 0's v), gate (g), WKV-7, per-head GroupNorm
    and the r.k bonus (r_k)."""

    def __init__(self, config: ModelConfig, layer_id: int, *, rngs: nnx.Rngs):
        D = config.d_model
        self.config, self.layer_id = config, layer_id
        for name, value in _att_vector_init(layer_id, config).items():
            setattr(self, name, param(value.astype(config.param_dtype), ("heads", "head_dim") if value.ndim == 2
                                      else ("embed",)))
        zeros, small = nnx.initializers.zeros_init(), nnx.initializers.orthogonal(scale=0.1)
        for name, width in lora_dims(config).items():   # name1 [D, width] (zeros), name2 [width, D] (x 0.1)
            setattr(self, f"{name}1", param(zeros(rngs.params(), (D, width), config.param_dtype), ("embed", "lora")))
            setattr(self, f"{name}2", param(small(rngs.params(), (width, D), config.param_dtype), ("lora", "embed")))
        self.receptance = linear(D, D, ("embed", "attn"), _uniform(0.5 / D ** 0.5), config, rngs)
        self.key = linear(D, D, ("embed", "attn"), _uniform(0.05 / D ** 0.5), config, rngs)
        self.value = linear(D, D, ("embed", "attn"), _uniform(0.5 / D ** 0.5), config, rngs)
        self.output = linear(D, D, ("attn", "embed"), zeros, config, rngs)
        self.ln_x = HeadNorm(config, scale=((1 + layer_id) / config.n_layer) ** 0.7)

    def _lora(self, x, name, inner=None):
        """(inner(x @ name1)) @ name2 in the compute dtype."""
        dtype = x.dtype
        h = x @ getattr(self, f"{name}1")[...].astype(dtype)
        return (h if inner is None else inner(h)) @ getattr(self, f"{name}2")[...].astype(dtype)

    def _streams(self, x_BTD, dx_BTD, v_first_BTD, heads_DH):
        """(r, w, k, v, a, b) per head [B, T, H, N] fp32, the output gate g [B, T, D] and v_first."""
        B, T, D = x_BTD.shape
        heads = lambda t: t.reshape(B, T, n_head(self.config), self.config.head_size)
        f32 = lambda t: t.astype(jnp.float32)
        mixed = {n: x_BTD + dx_BTD * getattr(self, f"x_{n}")[...].astype(x_BTD.dtype) for n in "rwkvag"}
        r, k, v = self.receptance(mixed["r"]), self.key(mixed["k"]), self.value(mixed["v"])
        a = jax.nn.sigmoid(f32(self.a0[...]) + f32(self._lora(mixed["a"], "a")))
        g = self._lora(mixed["g"], "g", jax.nn.sigmoid)
        kk = f32(k) * f32(self.k_k[...])                  # normalized per head (torch's F.normalize)
        norm = jnp.sqrt(_head_sum(jnp.square(kk), heads_DH))
        kk = kk * _per_channel(1.0 / jnp.maximum(norm, NORMALIZE_EPS), heads_DH)
        k = f32(k) * (1 + (a - 1) * f32(self.k_a[...]))
        if self.layer_id == 0:   # layer 0 holds v0..v2 too (the trainer saves them) but, as there, unused
            v = v_first_BTD = f32(v)
        else:   # the value residual: a learned, data-dependent mix towards layer 0's v
            gate = jax.nn.sigmoid(f32(self.v0[...]) + f32(self._lora(mixed["v"], "v")))
            v = f32(v) + (v_first_BTD - f32(v)) * gate
        w = jnp.exp(-DECAY_SCALE * jax.nn.sigmoid(f32(self.w0[...]) + f32(self._lora(mixed["w"], "w", jnp.tanh))))
        return tuple(map(heads, (f32(r), w, k, v, -kk, kk * a))), g, v_first_BTD

    def __call__(self, x_BTD, prev_BD, wkv_BHNN, v_first_BTD, reset_BT=None, reset_to=None):
        """(output [B, T, D], last input [B, D] fp32, WKV state, v_first) for the LayerNorm'd input;
        `reset_to`: (att_x [B, D], wkv [B, H, N, N]) the state restarts from at reset positions."""
        B, T, D = x_BTD.shape
        reset_att_x, reset_wkv = (None, None) if reset_to is None else reset_to
        dx = _shift_delta(x_BTD, prev_BD, reset_BT, reset_att_x)
        heads_DH = _head_matrix(self.config)
        streams, g, v_first_BTD = self._streams(x_BTD, dx, v_first_BTD, heads_DH)
        if T == 1:   # RNN mode: the one-token recurrence
            if reset_BT is not None:
                start = jnp.zeros_like(wkv_BHNN) if reset_wkv is None else reset_wkv.astype(wkv_BHNN.dtype)
                wkv_BHNN = jnp.where(reset_BT[:, 0, None, None, None], start, wkv_BHNN)
            y, wkv_BHNN = wkv7_ops.wkv7_step(*(s[:, 0] for s in streams), wkv_BHNN)
            y = y[:, None]
        else:
            if self.config.wkv_form == "pallas":   # the kernel's streams in the compute dtype (the official
                # trainer's are bf16 too); the decay stays fp32: the kernel reads log w, made from it in fp32
                streams = tuple(s if i == 1 else s.astype(self.config.dtype) for i, s in enumerate(streams))
            y, wkv_BHNN = wkv7_ops.wkv7(*streams, wkv_BHNN, form=self.config.wkv_form,
                                        chunk_len=self.config.wkv_chunk_len, reset_BT=reset_BT,
                                        reset_state=reset_wkv)
        r, _, k, v = (s.astype(jnp.float32).reshape(B, T, D) for s in streams[:4])
        bonus = _per_channel(_head_sum(r * k * self.r_k[...].astype(jnp.float32).reshape(D), heads_DH), heads_DH) * v
        y = self.ln_x(y.reshape(B, T, D), heads_DH) + bonus
        out = self.output((y * g.astype(jnp.float32)).astype(self.config.dtype))
        return out, x_BTD[:, -1].astype(jnp.float32), wkv_BHNN, v_first_BTD


class ChannelMix(nnx.Module):
    """The feed-forward sublayer: token shift, squared-ReLU key, value (no receptance gate in x070)."""

    def __init__(self, config: ModelConfig, layer_id: int, *, rngs: nnx.Rngs):
        D, F = config.d_model, config.ffn_width
        ddd = np.arange(D) / D
        self.x_k = param((1.0 - ddd ** ((1.0 - layer_id / config.n_layer) ** 4)).astype(config.param_dtype),
                         ("embed",))
        self.key = linear(D, F, ("embed", "mlp"), _uniform(0.5 / D ** 0.5), config, rngs)
        self.value = linear(F, D, ("mlp", "embed"), nnx.initializers.zeros_init(), config, rngs)

    def __call__(self, x_BTD, prev_BD, reset_BT=None, reset_prev_BD=None):
        dx = _shift_delta(x_BTD, prev_BD, reset_BT, reset_prev_BD)
        k = jnp.square(jax.nn.relu(self.key(x_BTD + dx * self.x_k[...].astype(x_BTD.dtype))))
        return self.value(k), x_BTD[:, -1].astype(jnp.float32)


class Block(nnx.Module):
    """Pre-LayerNorm residual block: x + att(ln1(x)), then + ffn(ln2(x)); block 0 also holds ln0, which
    the model applies to the embedding."""

    def __init__(self, config: ModelConfig, layer_id: int, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(config.dtype)
        if layer_id == 0:
            self.ln0 = _layer_norm(config.d_model, config, rngs)
        self.ln1 = _layer_norm(config.d_model, config, rngs)
        self.ln2 = _layer_norm(config.d_model, config, rngs)
        self.att = TimeMix(config, layer_id, rngs=rngs)
        self.ffn = ChannelMix(config, layer_id, rngs=rngs)

    def __call__(self, x_BTD, layer_state, v_first, reset_BT=None, reset_to=None):
        """(x after the block, (att_x, wkv, ffn_x) after the last token, v_first)."""
        att_x, wkv, ffn_x = layer_state
        att_reset = None if reset_to is None else (reset_to[0], reset_to[1])
        att_out, att_x, wkv, v_first = self.att(self.ln1(x_BTD).astype(self.dtype), att_x, wkv, v_first,
                                                reset_BT, att_reset)
        x_BTD = x_BTD + att_out.astype(jnp.float32)
        ffn_out, ffn_x = self.ffn(self.ln2(x_BTD).astype(self.dtype), ffn_x, reset_BT,
                                  None if reset_to is None else reset_to[2])
        return x_BTD + ffn_out.astype(jnp.float32), (att_x, wkv, ffn_x), v_first


def _apply_block(block: Block, x, layer_state, v_first, reset_BT=None, reset_to=None):
    return block(x, layer_state, v_first, reset_BT, reset_to)


class RWKV7(nnx.Module):
    """RWKV-7 language model: embedding, ln0 (in block 0), blocks, ln_out, untied head.

    With `scan_layers`, layer 0 stays apart (`block0`: it holds ln0 and makes v_first, the value residual's
    target) and layers 1..L-1 are stacked (`blocks`, each parameter with a leading [L - 1] axis) and applied
    by lax.scan with v_first passed to every one. The parameters are the same either way (layer 0's unused
    v0..v2 included, as in the official checkpoint); `with_scan_layers` converts between the two."""

    SCAN_FROM_LAYER = 1  # with scan_layers, layer 0 is `block0` and layers 1.. are stacked (layers.with_scan_layers)

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if config.d_model % config.head_size:
            raise ValueError(f"RWKV-7: d_model={config.d_model} is not a multiple of head_size={config.head_size}")
        if config.scan_layers and config.n_layer < 2:
            raise ValueError(f"RWKV-7 with model.scan_layers=True needs n_layer >= 2 (layer 0 runs outside the "
                             f"scan), got n_layer={config.n_layer}: set model.scan_layers=False")
        self.config = config
        D, V = config.d_model, config.vocab_size
        self.emb = nnx.Embed(V, D, embedding_init=_uniform(config.emb_init_scale), param_dtype=config.param_dtype,
                             embedding_metadata={"logical_axes": ("vocab", "embed")}, rngs=rngs)
        blocks = [Block(config, i, rngs=rngs) for i in range(config.n_layer)]
        if config.scan_layers:
            self.block0 = blocks[0]
            self.blocks = nnx.merge(nnx.graphdef(blocks[1]), stack_layers([nnx.state(b) for b in blocks[1:]]))
        else:
            self.blocks = nnx.List(blocks)
        self.ln_out = _layer_norm(D, config, rngs)
        head_scale = 0.5 * math.sqrt(V / D) if V > D else 0.5
        self.head = linear(D, V, ("embed", "vocab"), nnx.initializers.orthogonal(scale=head_scale), config, rngs)

    def init_state(self, batch_size: int) -> RWKV7State:
        return init_state(self.config, batch_size)

    def __call__(self, tokens_BT, state: RWKV7State | None = None, reset_BT=None, reset_to: RWKV7State | None = None):
        """fp32 logits [B, T, V] for every position and the state after the last token (see `hidden`)."""
        hidden_BTD, state = self.hidden(tokens_BT, state, reset_BT, reset_to)
        return self.logits(hidden_BTD), state

    def logits(self, hidden_D):
        """fp32 logits from `hidden` states of any leading shape [..., D]: ln_out, then the head."""
        return self.head(self.ln_out(hidden_D).astype(self.config.dtype)).astype(jnp.float32)

    def head_operands(self, hidden_D):
        """(ln_out(hidden) in the compute dtype, the head's kernel [D, V]): `logits` is their product."""
        return self.ln_out(hidden_D).astype(self.config.dtype), self.head.kernel[...]

    def token_logprobs(self, hidden_ND, targets_N):
        """(log p(target) in fp32, whether the target is the logits' first argmax) at N positions."""
        logp_N1, greedy_N1 = target_logprobs(self.logits(hidden_ND), targets_N[:, None])
        return logp_N1[:, 0], greedy_N1[:, 0]

    def hidden(self, tokens_BT, state: RWKV7State | None = None, reset_BT=None, reset_to: RWKV7State | None = None):
        """The final hidden states [B, T, D] (the fp32 residual stream before ln_out) and the state after
        the last token. Where `reset_BT` (bool [B, T]) is True, every layer's state entering position t
        (WKV matrix and both token shifts' previous inputs) is replaced by `reset_to` (default: the empty
        state) before token t. (The value residual needs no reset: v_first is layer 0's v at the same
        position.)"""
        check_token_ids(tokens_BT, self.config.vocab_size)
        if tokens_BT.ndim != 2 or not tokens_BT.shape[1]:
            raise ValueError(f"tokens must be [batch, time] with time >= 1, got shape {tokens_BT.shape}; "
                             "use model.step(tokens_B, state) for one token per sequence")
        if reset_BT is not None:
            if jnp.shape(reset_BT) != tokens_BT.shape:
                raise ValueError(f"reset_BT must have the tokens' shape {tokens_BT.shape}, got {jnp.shape(reset_BT)}")
            reset_BT = jnp.asarray(reset_BT).astype(bool)
        elif reset_to is not None:
            raise ValueError("reset_to was given without reset_BT: pass the positions to reset at")
        if state is None:
            state = self.init_state(tokens_BT.shape[0])
        first = self.block0 if self.config.scan_layers else self.blocks[0]
        x = first.ln0(self.emb(tokens_BT).astype(jnp.float32))
        run = self._scan_blocks if self.config.scan_layers else self._loop_blocks
        return run(x, state, reset_BT, reset_to)

    def _block_fn(self):
        """_apply_block, rematerialised (model.remat, remat_policy) or not."""
        return nnx.remat(_apply_block, policy=remat_policy(self.config)) if self.config.remat else _apply_block

    def _loop_blocks(self, x, state: RWKV7State, reset_BT=None, reset_to: RWKV7State | None = None):
        apply_block, v_first, layers = self._block_fn(), None, []
        for i, block in enumerate(self.blocks):
            layer_reset = None if reset_to is None else tuple(s[i] for s in reset_to)
            x, layer_state, v_first = apply_block(block, x, tuple(s[i] for s in state), v_first, reset_BT,
                                                  layer_reset)
            x = sharding.constrain(x, ("batch", "seq", "embed_out"))
            layers.append(layer_state)
        return x, RWKV7State(*(jnp.stack(parts) for parts in zip(*layers)))

    def _scan_blocks(self, x, state: RWKV7State, reset_BT=None, reset_to: RWKV7State | None = None):
        """Layer 0 (which makes v_first), then lax.scan over the stacked layers 1..L-1 with v_first, reset_BT
        closed over (one copy, not carried: a rematerialised scan keeps only each layer's input x)."""
        layer0_reset = None if reset_to is None else tuple(s[0] for s in reset_to)
        x, state0, v_first = self._block_fn()(self.block0, x, tuple(s[0] for s in state), None, reset_BT,
                                                 layer0_reset)
        x = sharding.constrain(x, ("batch", "seq", "embed_out"))
        graphdef, params = nnx.split(self.blocks)

        def body(x, layer):  # layer: this layer's parameters, state and reset state (or None)
            params_l, layer_state, layer_reset = layer
            x, out, _ = nnx.merge(graphdef, params_l)(x, layer_state, v_first, reset_BT, layer_reset)
            return sharding.constrain(x, ("batch", "seq", "embed_out")), out

        if self.config.remat:
            body = jax.checkpoint(body, prevent_cse=False, policy=remat_policy(self.config))
        xs = (params, tuple(s[1:] for s in state), None if reset_to is None else tuple(s[1:] for s in reset_to))
        # Unrolled when compiled for CPU, a loop elsewhere: as RWKV-4 (rwkv4.RWKV._scan_blocks says why).
        x, rest = jax.lax.platform_dependent(x, xs, cpu=functools.partial(jax.lax.scan, body, unroll=True),
                                             default=functools.partial(jax.lax.scan, body))
        return x, RWKV7State(*(jnp.concatenate([s0[None], s]) for s0, s in zip(state0, rest)))

    def step(self, tokens_B, state: RWKV7State):
        """RNN mode: one token per sequence. Returns logits [B, V] and the next state."""
        logits, state = self(tokens_B[:, None], state)
        return logits[:, 0], state


# --- Official weights: the name table and the dimensions of a checkpoint -------------------------

def weights_layout(config: ModelConfig) -> dict[str, tuple[tuple, str, tuple[int, ...]]]:
    """Official x070 name -> (path in our pure param dict, kind, official shape); kinds as RWKV-4's."""
    V, D, F, H, N = config.vocab_size, config.d_model, config.ffn_width, n_head(config), config.head_size
    table = {"emb.weight": (("emb", "embedding"), "plain", (V, D)),
             "blocks.0.ln0.weight": (("blocks", 0, "ln0", "scale"), "plain", (D,)),
             "blocks.0.ln0.bias": (("blocks", 0, "ln0", "bias"), "plain", (D,)),
             "ln_out.weight": (("ln_out", "scale"), "plain", (D,)),
             "ln_out.bias": (("ln_out", "bias"), "plain", (D,)),
             "head.weight": (("head", "kernel"), "linear", (V, D))}
    for i in range(config.n_layer):
        b, at = f"blocks.{i}.", ("blocks", i, "att")
        for ln in ("ln1", "ln2"):
            table[b + ln + ".weight"] = (("blocks", i, ln, "scale"), "plain", (D,))
            table[b + ln + ".bias"] = (("blocks", i, ln, "bias"), "plain", (D,))
        for name in _ATT_VECTORS:
            table[b + "att." + name] = ((*at, name), "mix", (1, 1, D))
        table[b + "att.r_k"] = ((*at, "r_k"), "plain", (H, N))
        for name, width in lora_dims(config).items():
            table[b + f"att.{name}1"] = ((*at, f"{name}1"), "plain", (D, width))
            table[b + f"att.{name}2"] = ((*at, f"{name}2"), "plain", (width, D))
        for proj in ("receptance", "key", "value", "output"):
            table[b + f"att.{proj}.weight"] = ((*at, proj, "kernel"), "linear", (D, D))
        table[b + "att.ln_x.weight"] = ((*at, "ln_x", "scale"), "plain", (D,))
        table[b + "att.ln_x.bias"] = ((*at, "ln_x", "bias"), "plain", (D,))
        table[b + "ffn.x_k"] = (("blocks", i, "ffn", "x_k"), "mix", (1, 1, D))
        table[b + "ffn.key.weight"] = (("blocks", i, "ffn", "key", "kernel"), "linear", (F, D))
        table[b + "ffn.value.weight"] = (("blocks", i, "ffn", "value", "kernel"), "linear", (D, F))
    return table


def dims_from_tensors(tensors: dict[str, np.ndarray]) -> dict:
    """ModelConfig fields from an official x070 state dict; ValueError for tensors of another generation."""
    needed = ["emb.weight", "blocks.0.att.w0", "blocks.0.att.r_k", "blocks.0.ffn.key.weight",
              *(f"blocks.0.att.{name}1" for name in _LORAS)]
    missing = [n for n in needed if n not in tensors]
    if missing:
        raise ValueError(f"not an RWKV-7 (x070) checkpoint: missing {missing[:4]}")
    vocab_size, d_model = np.shape(tensors["emb.weight"])
    blocks = {int(m.group(1)) for n in tensors if (m := re.fullmatch(r"blocks\.(\d+)\.att\.w0", n))}
    heads, head_size = np.shape(tensors["blocks.0.att.r_k"])
    return dict(vocab_size=int(vocab_size), d_model=int(d_model), n_layer=max(blocks) + 1, head_size=int(head_size),
                d_ffn=int(np.shape(tensors["blocks.0.ffn.key.weight"])[0]),
                **{field: int(np.shape(tensors[f"blocks.0.att.{name}1"])[1]) for name, field in _LORAS.items()})


def flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs of one token: 6 per weight a token is multiplied by (the head, and per layer the four
    D x D projections, the channel mix's 2 D F and the LoRAs' 2 D width each; layer 0 does not use its value
    residual's), plus the WKV recurrence's ~10 N^2 per head forward (S a, S w + v k^T + (S a) b^T, S r),
    three times that with the backward pass."""
    D, L, N = config.d_model, config.n_layer, config.head_size
    loras = lora_dims(config)
    matmul = 4 * D * D + 2 * D * config.ffn_width + 2 * D * sum(loras.values())
    weights = config.vocab_size * D + L * matmul - 2 * D * loras["v"]
    return 6.0 * weights + 3.0 * 10 * L * D * N


# --- State tuning's learned initial state (rwkv_jax/train/state_tuning.py) -------------------------
# att_x, ffn_x [L, D] (the token shifts' previous inputs) and wkv [L, H, N, N] (the WKV matrices): every
# value is a valid RWKV-7 state, so all are free; they start at the empty state (zeros).

def init_learned_state(config: ModelConfig) -> dict:
    """The learned state of `config`'s model at the start of tuning: the empty state."""
    L, D, N = config.n_layer, config.d_model, config.head_size
    return {"att_x": jnp.zeros((L, D), jnp.float32), "ffn_x": jnp.zeros((L, D), jnp.float32),
            "wkv": jnp.zeros((L, n_head(config), N, N), jnp.float32)}


def learned_to_state(learned: dict, batch_size: int) -> RWKV7State:
    """The model's RWKV7State [L, batch_size, *]: the learned state in every row (differentiable)."""
    def rows(x):  # [L, *S] -> [L, batch_size, *S]
        return jnp.broadcast_to(x[:, None].astype(jnp.float32), (x.shape[0], batch_size, *x.shape[1:]))

    return RWKV7State(att_x=rows(learned["att_x"]), wkv=rows(learned["wkv"]), ffn_x=rows(learned["ffn_x"]))


FAMILY = Family(version=7, model_class=RWKV7, state_type=RWKV7State, init_state=init_state,
                weights_layout=weights_layout, dims_from_tensors=dims_from_tensors,
                wkv_forms=(*wkv7_ops.FORMS, *wkv7_ops.KERNEL_FORMS), default_wkv_form=wkv7_ops.default_form,
                # The official x070 trainer's layerwise_lr: the decay's base w0 at 2x
                lr_multipliers={"w0": 2.0},
                logical_axes=("embed", "embed_out", "attn", "mlp", "vocab", "heads", "head_dim", "lora", "layers"),
                flops_per_token=flops_per_token,
                learned_state=LearnedState(fields=("att_x", "ffn_x", "wkv"), init=init_learned_state,
                                           to_state=learned_to_state))
