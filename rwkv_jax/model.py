"""The RWKV-4 language model in Flax NNX.

    logits_BTV, state = model(tokens_BT, state=None)   # parallel ("GPT") mode over a sequence
    logits_BTV, state = model(tokens_BT, reset_BT=...)  # documents packed in a row, each from the empty state
    logits_BV, state = model.step(tokens_B, state)      # RNN mode, one token
    hidden_BTD, state = model.hidden(tokens_BT, state)  # the residual stream after the last block (no head)
    state = model.init_state(batch_size)

Module and parameter names mirror the official RWKV-LM checkpoint (`blocks.0.att.time_decay`, ...), so the
weight mapping in `rwkv_jax/weights.py` is mechanical. Parameters carry `logical_axes` metadata that
`rwkv_jax/sharding.py` maps onto a device mesh.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax import initializers as init
from rwkv_jax import sharding
from rwkv_jax.ops import wkv as wkv_ops


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of an RWKV-4 model. `d_att`/`d_ffn` default to D and 4D as in the paper."""
    vocab_size: int = 50277
    d_model: int = 768
    n_layer: int = 12
    d_att: int | None = None
    d_ffn: int | None = None
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"        # compute dtype: 'float32', 'bfloat16', or 'auto' (bf16 on GPU/TPU, fp32 on CPU)
    param_dtype: str = "float32"  # master weights
    wkv_form: str = "auto"        # 'sequential' | 'parallel' | 'chunked' | 'auto' (per backend)
    wkv_chunk_len: int = 32
    emb_init_scale: float = 1e-4
    remat: bool = False           # recompute each block in the backward pass: activation memory O(1 block)
    scan_layers: bool | str = False  # blocks' parameters stacked on a leading layer axis and applied by
                                     # lax.scan: compile time independent of depth. 'auto' (the paper
                                     # configs): stacked on GPU/TPU, a list on CPU (see `resolve_scan_layers`)

    @property
    def att_width(self) -> int:
        return self.d_att or self.d_model

    @property
    def ffn_width(self) -> int:
        return self.d_ffn or 4 * self.d_model

    @classmethod
    def from_dict(cls, values) -> "ModelConfig":
        """Build from a dict/ConfigDict, naming any unknown key and resolving dtype='auto' and
        scan_layers='auto' for the default backend (which starts it: not before jax.distributed)."""
        values = dict(values)
        cls.check_keys(values)
        if values.get("dtype") == "auto":
            values["dtype"] = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        if "scan_layers" in values:
            values["scan_layers"] = resolve_scan_layers(values["scan_layers"])
        return cls(**values)

    @classmethod
    def check_keys(cls, values) -> None:
        """ValueError naming any key of `values` that is not a field (nothing resolved, no backend started)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; valid keys are {sorted(known)}")


def resolve_scan_layers(value, platform: str | None = None) -> bool:
    """`scan_layers` as a bool for a program compiled for `platform` ('cpu', 'gpu', 'tpu'; default: the
    default backend's, asked only for 'auto'); True/False also as the strings the command line gives.
    'auto' stacks the layers on GPU and TPU (compile time independent of depth) and keeps them a list on
    CPU: XLA:CPU unrolls the scan anyway (`RWKV._scan_blocks`) but still copies every layer's weights out
    of the stack and its gradients back in, a tenth of the 169M step at B=1 T=128."""
    if isinstance(value, str):
        value = {"true": True, "false": False, "auto": "auto"}.get(value.strip().lower(), value)
    if value == "auto":
        return (platform or jax.default_backend()) != "cpu"
    if not isinstance(value, bool):
        raise ValueError(f"model.scan_layers must be one of True, False, 'auto', got {value!r}")
    return value


class RWKVState(NamedTuple):
    """Recurrent state of all layers, each [n_layer, B, width], fp32. The previous inputs are the
    LayerNorm'd values the token shift needs; (wkv_a, wkv_b, wkv_p) are the WKV sums."""
    att_x: jax.Array
    wkv_a: jax.Array
    wkv_b: jax.Array
    wkv_p: jax.Array
    ffn_x: jax.Array


class LayerState(NamedTuple):
    att_x: jax.Array  # [B, D]
    wkv: wkv_ops.WKVState  # each [B, A]
    ffn_x: jax.Array  # [B, D]


def init_state(config: ModelConfig, batch_size: int) -> RWKVState:
    """The empty state: zero previous inputs and sums, exponent at the finite EMPTY_EXPONENT."""
    L, B, D, A = config.n_layer, batch_size, config.d_model, config.att_width
    zeros_D = jnp.zeros((L, B, D), jnp.float32)
    zeros_A = jnp.zeros((L, B, A), jnp.float32)
    return RWKVState(zeros_D, zeros_A, zeros_A, jnp.full((L, B, A), wkv_ops.EMPTY_EXPONENT, jnp.float32),
                     zeros_D)


def _param(value, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(jnp.asarray(value), logical_axes=axes)


@jax.custom_vjp
def _dot_fp32_accumulate(x, w):
    """x [..., K] @ w [K, N] with low-precision inputs, accumulated in fp32 and rounded to x's dtype; its
    gradients are products of the same kind (the cotangent in x's dtype against x or w)."""
    return _dot_last(x, w).astype(x.dtype)


def _dot_last(x, w):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_fwd(x, w):
    return _dot_fp32_accumulate(x, w), (x, w)


def _dot_bwd(residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    leading = tuple(range(x.ndim - 1))
    dw = jax.lax.dot_general(x, g, ((leading, leading), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_dot_fp32_accumulate.defvjp(_dot_fwd, _dot_bwd)


def _low_precision_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None,
                               out_sharding=None):
    """nnx.Linear's dot_general in bf16 models. XLA:CPU multiplies bf16 matrices fast (AMX, AVX512-BF16)
    only when asked for an fp32 result, and autodiff of such a product gives mixed bf16 x fp32 products
    in the backward pass, which take the slow path: on CPU, `_dot_fp32_accumulate` keeps all three
    products bf16 x bf16 -> fp32. Elsewhere the plain product: on TPU with weights sharded over fsdp the
    custom backward moved 2.2e9 more bytes per chip (430M, one layer, v5e:2x4)."""
    del preferred_element_type, out_sharding  # always x's last axis with w's first; the result in x's dtype

    def plain(x, w):
        return jax.lax.dot_general(x, w, dimension_numbers, precision=precision)
    return jax.lax.platform_dependent(x, w, cpu=_dot_fp32_accumulate, default=plain)


def _linear(fan_in, fan_out, axes, kernel_init, config: ModelConfig, rngs) -> nnx.Linear:
    low_precision = jnp.dtype(config.dtype) != jnp.float32
    return nnx.Linear(fan_in, fan_out, use_bias=False, kernel_init=kernel_init, dtype=config.dtype,
                      param_dtype=config.param_dtype, kernel_metadata={"logical_axes": axes}, rngs=rngs,
                      **({"dot_general": _low_precision_dot_general} if low_precision else {}))


def _layer_norm(width, config: ModelConfig, rngs) -> nnx.LayerNorm:
    # Statistics in fp32 whatever the compute dtype; the output is cast by the caller.
    return nnx.LayerNorm(width, epsilon=config.layer_norm_eps, dtype=jnp.float32,
                         param_dtype=config.param_dtype, scale_metadata={"logical_axes": ("embed",)},
                         bias_metadata={"logical_axes": ("embed",)}, rngs=rngs)


def _token_shift(x_BTC, prev_BC, reset_BT=None, reset_prev_BC=None):
    """x shifted one step right along T, with the previous call's last input in front; at reset positions
    the reset state's previous input (zeros by default) instead."""
    shifted = jnp.concatenate([prev_BC[:, None].astype(x_BTC.dtype), x_BTC[:, :-1]], axis=1)
    if reset_BT is None:
        return shifted
    reset_prev = 0.0 if reset_prev_BC is None else reset_prev_BC[:, None].astype(x_BTC.dtype)
    return jnp.where(reset_BT[:, :, None], reset_prev, shifted)


def _mix(x, shifted, mix_C):
    mix_C = mix_C.astype(x.dtype)
    return x * mix_C + shifted * (1 - mix_C)


class TimeMix(nnx.Module):
    """The attention-like sublayer: token shift, k/v/r projections, WKV, receptance gate."""

    def __init__(self, config: ModelConfig, layer_id: int, *, rngs: nnx.Rngs):
        D, A, L = config.d_model, config.att_width, config.n_layer
        self.config = config
        self.time_decay = _param(init.time_decay(layer_id, L, A), ("attn",))
        self.time_first = _param(init.time_first(A), ("attn",))
        mixes = init.time_mix_att(layer_id, L, D)
        self.time_mix_k = _param(mixes["k"], ("embed",))
        self.time_mix_v = _param(mixes["v"], ("embed",))
        self.time_mix_r = _param(mixes["r"], ("embed",))
        zeros = nnx.initializers.zeros_init()
        self.key = _linear(D, A, ("embed", "attn"), zeros, config, rngs)
        self.value = _linear(D, A, ("embed", "attn"), init.orthogonal(), config, rngs)
        self.receptance = _linear(D, A, ("embed", "attn"), zeros, config, rngs)
        self.output = _linear(A, D, ("attn", "embed"), zeros, config, rngs)

    def __call__(self, x_BTD, prev_x_BD, wkv_state: wkv_ops.WKVState, reset_BT=None,
                 reset_to: "LayerState | None" = None):
        shifted = _token_shift(x_BTD, prev_x_BD, reset_BT, None if reset_to is None else reset_to.att_x)
        k = self.key(_mix(x_BTD, shifted, self.time_mix_k[...]))
        v = self.value(_mix(x_BTD, shifted, self.time_mix_v[...]))
        r = jax.nn.sigmoid(self.receptance(_mix(x_BTD, shifted, self.time_mix_r[...])))
        reset_wkv = None if reset_to is None else reset_to.wkv
        if x_BTD.shape[1] == 1:  # RNN mode: the one-token recurrence
            if reset_BT is not None:
                empty = wkv_ops.empty_state(*wkv_state.a.shape, wkv_state.a.dtype)
                wkv_state = jax.tree.map(lambda r, s: jnp.where(reset_BT[:, :1], r, s), reset_wkv or empty,
                                         wkv_state)
            y, wkv_state = wkv_ops.wkv_step(self.time_decay[...], self.time_first[...], k[:, 0], v[:, 0],
                                            wkv_state)
            y = y[:, None]
        else:
            y, wkv_state = wkv_ops.wkv(self.time_decay[...], self.time_first[...], k, v, wkv_state,
                                       form=self.config.wkv_form, chunk_len=self.config.wkv_chunk_len,
                                       reset_BT=reset_BT, reset_state=reset_wkv)
        return self.output(r * y), x_BTD[:, -1].astype(jnp.float32), wkv_state


class ChannelMix(nnx.Module):
    """The feed-forward sublayer: token shift, squared-ReLU key, receptance gate."""

    def __init__(self, config: ModelConfig, layer_id: int, *, rngs: nnx.Rngs):
        D, F = config.d_model, config.ffn_width
        mixes = init.time_mix_ffn(layer_id, config.n_layer, D)
        self.time_mix_k = _param(mixes["k"], ("embed",))
        self.time_mix_r = _param(mixes["r"], ("embed",))
        zeros = nnx.initializers.zeros_init()
        self.key = _linear(D, F, ("embed", "mlp"), init.orthogonal(), config, rngs)
        self.receptance = _linear(D, D, ("embed", "embed_out"), zeros, config, rngs)
        self.value = _linear(F, D, ("mlp", "embed"), zeros, config, rngs)

    def __call__(self, x_BTD, prev_x_BD, reset_BT=None, reset_prev_BD=None):
        shifted = _token_shift(x_BTD, prev_x_BD, reset_BT, reset_prev_BD)
        k = jnp.square(jax.nn.relu(self.key(_mix(x_BTD, shifted, self.time_mix_k[...]))))
        r = jax.nn.sigmoid(self.receptance(_mix(x_BTD, shifted, self.time_mix_r[...])))
        return r * self.value(k), x_BTD[:, -1].astype(jnp.float32)


class Block(nnx.Module):
    """Pre-LayerNorm residual block: x + att(ln1(x)), then + ffn(ln2(x))."""

    def __init__(self, config: ModelConfig, layer_id: int, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(config.dtype)
        self.ln1 = _layer_norm(config.d_model, config, rngs)
        self.att = TimeMix(config, layer_id, rngs=rngs)
        self.ln2 = _layer_norm(config.d_model, config, rngs)
        self.ffn = ChannelMix(config, layer_id, rngs=rngs)

    def __call__(self, x_BTD, state: LayerState, reset_BT=None, reset_to: LayerState | None = None):
        att_out, att_x, wkv_state = self.att(self.ln1(x_BTD).astype(self.dtype), state.att_x, state.wkv,
                                             reset_BT, reset_to)
        x_BTD = x_BTD + att_out.astype(x_BTD.dtype)
        ffn_out, ffn_x = self.ffn(self.ln2(x_BTD).astype(self.dtype), state.ffn_x, reset_BT,
                                  None if reset_to is None else reset_to.ffn_x)
        x_BTD = x_BTD + ffn_out.astype(x_BTD.dtype)
        return x_BTD, LayerState(att_x, wkv_state, ffn_x)


def target_logprobs(logits, targets):
    """(log p(target) under a log-softmax of `logits` [..., V], whether the target is their first argmax)
    for targets [..., K] (K targets per row). The flag comes from the logits themselves: subtracting the
    logsumexp first could round a near-tie into a tie."""
    log_sum = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return (jnp.take_along_axis(logits, targets, axis=-1) - log_sum,
            jnp.argmax(logits, axis=-1)[..., None] == targets)


def check_token_ids(tokens, vocab_size: int, name: str = "tokens") -> None:
    """ValueError if concrete `tokens` hold an id outside [0, vocab_size) or are not integers: the
    embedding lookup would clamp or wrap it (-1 reads row V-1) and the logits would silently be wrong or
    NaN. Traced tokens (under jit) cannot be inspected here: there the caller checks its ids, as the
    data pipeline does for every training batch. Costs one min/max over the ids."""
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {jnp.result_type(tokens)}")
    try:
        if not getattr(tokens, "is_fully_addressable", True):
            return  # a multi-host array: each process sees only its part
        ids = np.asarray(tokens)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return  # traced
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise ValueError(f"{name} hold id(s) outside the vocabulary [0, {vocab_size}): "
                         f"{sorted(set(bad.ravel().tolist()))[:8]}")


def _apply_block(block: Block, x_BTD, state: LayerState, reset_BT=None, reset_to: LayerState | None = None):
    return block(x_BTD, state, reset_BT, reset_to)


def _layer_state(state: RWKVState, i) -> LayerState:
    """Layer i's part of a model state."""
    return LayerState(state.att_x[i], wkv_ops.WKVState(state.wkv_a[i], state.wkv_b[i], state.wkv_p[i]),
                      state.ffn_x[i])


# --- Layers stacked for lax.scan -------------------------------------------------------------------
# With `scan_layers`, `RWKV.blocks` is one Block whose every parameter carries a leading [n_layer] axis
# (logical axis 'layers', sharded over no mesh axis). Checkpoint, .pth and HF formats keep one entry per
# layer: `stack_layers` / `unstack_layers` convert at those boundaries.

def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _stack_variables(*variables):
    out = variables[0].replace(jnp.stack([v.get_value() for v in variables]))
    axes = variables[0].get_metadata().get("logical_axes")
    if axes is not None:
        out.set_metadata(logical_axes=("layers", *axes))
    return out


def _take_layer(variable, i: int):
    out = variable.replace(variable.get_value()[i])
    axes = variable.get_metadata().get("logical_axes")
    if axes is not None:
        out.set_metadata(logical_axes=tuple(axes[1:]))
    return out


def stack_layers(layer_states: list) -> nnx.State:
    """One state with a leading layer axis from the states of n_layer Blocks."""
    return jax.tree.map(_stack_variables, *layer_states, is_leaf=_is_variable)


def unstack_layers(stacked: nnx.State, n_layer: int) -> list:
    """The states of n_layer Blocks from one stacked state."""
    return [jax.tree.map(lambda v: _take_layer(v, i), stacked, is_leaf=_is_variable) for i in range(n_layer)]


def with_scan_layers(model: "RWKV", scan: bool) -> "RWKV":
    """The same model and parameters with the blocks stacked (scan=True) or as a list (scan=False)."""
    if model.config.scan_layers == scan:
        return model
    config = dataclasses.replace(model.config, scan_layers=scan)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: RWKV(config, rngs=nnx.Rngs(0))))
    params = nnx.state(model)
    blocks = params["blocks"]
    if scan:
        params["blocks"] = stack_layers([blocks[i] for i in range(config.n_layer)])
    else:
        layers = unstack_layers(blocks, config.n_layer)
        params["blocks"] = nnx.State({i: layer for i, layer in enumerate(layers)})
    return nnx.merge(graphdef, params)


def with_kernels_in_compute_dtype(model: "RWKV") -> "RWKV":
    """For inference in a low-precision compute dtype: the model with its linears' kernels (the blocks'
    projections and the head) stored in that dtype. Each is cast to the compute dtype before its product
    anyway, so every result is the same; but cast once here instead of in every call, which in small calls
    (evaluation batches, decoding) read and wrote all the weights each time: on CPU the lm-eval adapter in
    bf16 ran at 71 requests/s with fp32 kernels, 164 with bf16 ones (fp32: 92). The embedding, LayerNorms
    and the WKV's vectors keep their dtype (the residual stream and WKV stay fp32). Not for training: the
    optimizer updates fp32 master weights. A model computing in fp32 comes back as it is."""
    dtype = jnp.dtype(model.config.dtype)
    if dtype == jnp.float32:
        return model
    graphdef, state = nnx.split(model)
    values = nnx.to_pure_dict(state)
    cast = jax.tree_util.tree_map_with_path(
        lambda path, x: x.astype(dtype) if getattr(path[-1], "key", None) == "kernel" else x, values)
    nnx.replace_by_pure_dict(state, cast)
    return nnx.merge(graphdef, state)


class RWKV(nnx.Module):
    """RWKV-4 language model: embedding, ln0, blocks, ln_out, untied head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        D, V = config.d_model, config.vocab_size
        self.emb = nnx.Embed(V, D, embedding_init=init.symmetric_uniform(config.emb_init_scale),
                             param_dtype=config.param_dtype,
                             embedding_metadata={"logical_axes": ("vocab", "embed")}, rngs=rngs)
        self.ln0 = _layer_norm(D, config, rngs)
        blocks = [Block(config, i, rngs=rngs) for i in range(config.n_layer)]
        if config.scan_layers:
            graphdef = nnx.graphdef(blocks[0])
            self.blocks = nnx.merge(graphdef, stack_layers([nnx.state(b) for b in blocks]))
        else:
            self.blocks = nnx.List(blocks)
        self.ln_out = _layer_norm(D, config, rngs)
        self.head = _linear(D, V, ("embed", "vocab"), init.orthogonal(scale=0.5), config, rngs)

    def init_state(self, batch_size: int) -> RWKVState:
        return init_state(self.config, batch_size)

    def __call__(self, tokens_BT, state: RWKVState | None = None, reset_BT=None,
                 reset_to: RWKVState | None = None):
        """Logits [B, T, V] (fp32) for every position, and the state after the last token. Concrete
        token ids outside [0, V) raise ValueError; under jit they are the caller's to check.
        `reset_BT`, `reset_to`: document resets (see `hidden`)."""
        hidden_BTD, state = self.hidden(tokens_BT, state, reset_BT, reset_to)
        return self.logits(hidden_BTD), state

    def logits(self, hidden_D):
        """fp32 logits from `hidden` states of any leading shape [..., D]: ln_out, then the head."""
        return self.head(self.ln_out(hidden_D).astype(self.config.dtype)).astype(jnp.float32)

    def token_logprobs(self, hidden_ND, targets_N):
        """(log p(target) in fp32, whether the target is the logits' first argmax) at N positions of
        `hidden` [N, D]: `logits` and a fp32 log-softmax, for inference. In fp32 from 256 positions up the
        logits are made as [V, N] (the head's kernel transposed against ln_out(hidden)), because XLA:CPU
        reduces over their major axis much faster than over their minor one: head, logsumexp and argmax
        of 640 positions of 50277 logits took 254 ms against 350 ms. Below 256 positions the [N, V]
        logits were as fast or faster (128: 63 ms against 72 ms), and in bf16 the transposed product
        leaves XLA:CPU's fast path (640 positions: 244 ms against 82 ms)."""
        if hidden_ND.shape[0] < 256 or jnp.dtype(self.config.dtype) != jnp.float32:
            logp_N1, greedy_N1 = target_logprobs(self.logits(hidden_ND), targets_N[:, None])
            return logp_N1[:, 0], greedy_N1[:, 0]
        normed_ND, kernel_DV = self.head_operands(hidden_ND)
        logits_VN = jax.lax.dot_general(kernel_DV.astype(jnp.float32), normed_ND, (((0,), (1,)), ((), ())))
        max_N = logits_VN.max(axis=0)
        log_sum_N = jnp.log(jnp.exp(logits_VN - max_N).sum(axis=0))
        target_N = jnp.take_along_axis(logits_VN, targets_N[None, :], axis=0)[0]
        # The first argmax is the target when no logit is above it and none before it equals it (an argmax
        # over the major axis was slower than this masked max).
        before_N = jnp.where(jax.lax.broadcasted_iota(jnp.int32, logits_VN.shape, 0) < targets_N[None, :],
                             logits_VN, -jnp.inf).max(axis=0)
        return target_N - max_N - log_sum_N, (target_N >= max_N) & (before_N < target_N)

    def head_operands(self, hidden_D):
        """(ln_out(hidden) [..., D] in the compute dtype, the head's kernel [D, V] as stored): `logits` is
        their product in the compute dtype, cast to fp32. The training loss takes these
        (optim.chunked_token_losses) to make each chunk's logits, and each target's logit, itself."""
        return self.ln_out(hidden_D).astype(self.config.dtype), self.head.kernel[...]

    def hidden(self, tokens_BT, state: RWKVState | None = None, reset_BT=None,
               reset_to: RWKVState | None = None):
        """The final hidden states [B, T, D] (the fp32 residual stream, before ln_out and the head) and
        the state after the last token: `logits(hidden(...)[0])` is `__call__`. Generation takes the
        logits of the last position only; training applies `logits` to chunks of positions.

        Document resets: where `reset_BT` (bool [B, T]) is True, every layer's state entering position t
        (WKV sums and both token shifts' previous inputs) is replaced by `reset_to` (default: the empty
        state of `init_state`) before token t, so documents packed in one row do not see each other."""
        check_token_ids(tokens_BT, self.config.vocab_size)
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens_BT.shape}; "
                             "use model.step(tokens_B, state) for one token per sequence")
        if reset_BT is not None:
            if jnp.shape(reset_BT) != tokens_BT.shape:
                raise ValueError(f"reset_BT must have the tokens' shape {tokens_BT.shape}, got "
                                 f"{jnp.shape(reset_BT)}")
            reset_BT = jnp.asarray(reset_BT).astype(bool)
        elif reset_to is not None:
            raise ValueError("reset_to was given without reset_BT: pass the positions to reset at")
        if state is None:
            state = self.init_state(tokens_BT.shape[0])
        # The residual stream stays in fp32; sublayers compute in config.dtype.
        x = self.ln0(self.emb(tokens_BT).astype(jnp.float32))
        run = self._scan_blocks if self.config.scan_layers else self._loop_blocks
        return run(x, state, reset_BT, reset_to)

    def _loop_blocks(self, x, state: RWKVState, reset_BT=None, reset_to: RWKVState | None = None):
        layer_states = []
        apply_block = nnx.remat(_apply_block) if self.config.remat else _apply_block
        for i, block in enumerate(self.blocks):
            layer_reset = None if reset_to is None else _layer_state(reset_to, i)
            x, layer_out = apply_block(block, x, _layer_state(state, i), reset_BT, layer_reset)
            x = sharding.constrain(x, ("batch", "seq", "embed_out"))
            layer_states.append(layer_out)
        stack = lambda get: jnp.stack([get(s) for s in layer_states])
        return x, RWKVState(stack(lambda s: s.att_x), stack(lambda s: s.wkv.a), stack(lambda s: s.wkv.b),
                            stack(lambda s: s.wkv.p), stack(lambda s: s.ffn_x))

    def _scan_blocks(self, x, state: RWKVState, reset_BT=None, reset_to: RWKVState | None = None):
        graphdef, params = nnx.split(self.blocks)

        def body(x, layer):  # layer: this layer's parameters, state and reset state (or None)
            params_l, layer_state, layer_reset = layer
            as_layer = lambda s: _layer_state(RWKVState(*s), ...)  # the scan already took layer i's slice
            x, out = nnx.merge(graphdef, params_l)(x, as_layer(layer_state), reset_BT,
                                                   None if layer_reset is None else as_layer(layer_reset))
            x = sharding.constrain(x, ("batch", "seq", "embed_out"))
            return x, RWKVState(out.att_x, out.wkv.a, out.wkv.b, out.wkv.p, out.ffn_x)

        if self.config.remat:  # keep only each block's input (the scan carry); recompute the rest
            body = jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
        xs = (params, tuple(state), None if reset_to is None else tuple(reset_to))
        # On CPU the loop is unrolled when compiled (the parameters keep their stacked layout). As a loop,
        # XLA:CPU copies each layer's weights out of the stack in the forward and again in the backward
        # pass, and writes the stacked activations and gradients slice by slice into zero-filled buffers;
        # unrolled, the 169M training step at B=2 T=512 took 4.35 s against 5.19 s (B=1 T=128: 0.90
        # against 0.98 s; the weights are still copied once, and the copies kept for the backward pass
        # are why unstacked layers are faster still), and compiling 12 layers on CPU takes seconds. Where
        # compile time matters (TPU, GPU, and a TPU program compiled ahead of time on a CPU host: the
        # branch follows the platform compiled for), the loop stays a loop.
        return jax.lax.platform_dependent(x, xs, cpu=functools.partial(jax.lax.scan, body, unroll=True),
                                          default=functools.partial(jax.lax.scan, body))

    def step(self, tokens_B, state: RWKVState):
        """RNN mode: one token per sequence. Returns logits [B, V] and the next state."""
        logits, state = self(tokens_B[:, None], state)
        return logits[:, 0], state
