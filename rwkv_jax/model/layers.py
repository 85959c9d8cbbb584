"""Building blocks shared by the model generations: projections with fp32 accumulation, LayerNorm,
token shift and mixing, log-probabilities of targets, and stacking a model's layers for `lax.scan`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.model.model_config import ModelConfig


def param(value, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(jnp.asarray(value), logical_axes=axes)


@jax.custom_vjp
def dot_fp32_accumulate(x, w):
    """x [..., K] @ w [K, N] with low-precision inputs, accumulated in fp32 and rounded to x's dtype; its
    gradients are products of the same kind (the cotangent in x's dtype against x or w)."""
    return _dot_last(x, w).astype(x.dtype)


def _dot_last(x, w):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_fwd(x, w):
    return dot_fp32_accumulate(x, w), (x, w)


def _dot_bwd(residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    leading = tuple(range(x.ndim - 1))
    dw = jax.lax.dot_general(x, g, ((leading, leading), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


dot_fp32_accumulate.defvjp(_dot_fwd, _dot_bwd)


def low_precision_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None,
                               out_sharding=None):
    """nnx.Linear's dot_general in bf16 models. XLA:CPU multiplies bf16 matrices fast (AMX, AVX512-BF16)
    only when asked for an fp32 result, and autodiff of such a product gives mixed bf16 x fp32 products
    in the backward pass, which take the slow path: on CPU, `dot_fp32_accumulate` keeps all three
    products bf16 x bf16 -> fp32. Elsewhere the plain product: on TPU with weights sharded over fsdp the
    custom backward moved 2.2e9 more bytes per chip (430M, one layer, v5e:2x4)."""
    del preferred_element_type, out_sharding  # always x's last axis with w's first; the result in x's dtype

    def plain(x, w):
        return jax.lax.dot_general(x, w, dimension_numbers, precision=precision)
    return jax.lax.platform_dependent(x, w, cpu=dot_fp32_accumulate, default=plain)


def linear(fan_in, fan_out, axes, kernel_init, config: ModelConfig, rngs) -> nnx.Linear:
    low_precision = jnp.dtype(config.dtype) != jnp.float32
    return nnx.Linear(fan_in, fan_out, use_bias=False, kernel_init=kernel_init, dtype=config.dtype,
                      param_dtype=config.param_dtype, kernel_metadata={"logical_axes": axes}, rngs=rngs,
                      **({"dot_general": low_precision_dot_general} if low_precision else {}))


def remat_policy(config: ModelConfig):
    """What a rematerialised block keeps from its forward pass (model.remat_policy): 'nothing' but its input,
    or also the outputs of its matmuls (the block's projections; the WKV kernel and the elementwise work
    between them are recomputed)."""
    return {"nothing": jax.checkpoint_policies.nothing_saveable,
            "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[config.remat_policy]


def layer_norm(width, config: ModelConfig, rngs) -> nnx.LayerNorm:
    # Statistics in fp32 whatever the compute dtype; the output is cast by the caller.
    return nnx.LayerNorm(width, epsilon=config.layer_norm_eps, dtype=jnp.float32,
                         param_dtype=config.param_dtype, scale_metadata={"logical_axes": ("embed",)},
                         bias_metadata={"logical_axes": ("embed",)}, rngs=rngs)


def token_shift(x_BTC, prev_BC, reset_BT=None, reset_prev_BC=None):
    """x shifted one step right along T, with the previous call's last input in front; at reset positions
    the reset state's previous input (zeros by default) instead."""
    shifted = jnp.concatenate([prev_BC[:, None].astype(x_BTC.dtype), x_BTC[:, :-1]], axis=1)
    if reset_BT is None:
        return shifted
    reset_prev = 0.0 if reset_prev_BC is None else reset_prev_BC[:, None].astype(x_BTC.dtype)
    return jnp.where(reset_BT[:, :, None], reset_prev, shifted)


def mix(x, shifted, mix_C):
    mix_C = mix_C.astype(x.dtype)
    return x * mix_C + shifted * (1 - mix_C)


def state_rows(state) -> int:
    """The batch rows of a model state (a NamedTuple of [n_layer, B, ...] arrays, whatever the generation)."""
    return jax.tree.leaves(state)[0].shape[1]


def target_logprobs(logits, targets):
    """(log p(target) under a log-softmax of `logits` [..., V], whether the target is their first argmax)
    for targets [..., K] (K targets per row). The flag comes from the logits themselves: subtracting the
    logsumexp first could round a near-tie into a tie."""
    log_sum = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return (jnp.take_along_axis(logits, targets, axis=-1) - log_sum,
            jnp.argmax(logits, axis=-1)[..., None] == targets)


def check_token_ids(ids, vocab_size: int, source: str = "tokens", *, offset: int = 0,
                    fix: str = "the tokenizer does not fit this model") -> None:
    """ValueError naming `source`, the first token id of `ids` outside [0, vocab_size), its position
    (counted from `offset`) and `fix`; or that `ids` are not integers. An embedding lookup would clamp or
    wrap a bad id (-1 reads row V-1) and the logits would silently be wrong or NaN. The one check of token
    ids in the library: the model's concrete inputs, the data pipeline, evaluation, generation and the
    lm-eval adapter call it. `ids`: any int array-like (a memory-mapped token file, a jax array, a list);
    traced ids (under jit) and multi-host arrays cannot be inspected here: there the caller checks its
    ids, as the data pipeline does for every training batch. A min/max per chunk of 2**24 ids."""
    try:
        if not getattr(ids, "is_fully_addressable", True):
            return  # a multi-host array: each process sees only its part
        flat = np.asarray(ids).reshape(-1)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        flat = None  # traced: only its dtype can be checked
    dtype = jnp.result_type(ids) if flat is None else flat.dtype
    if flat is not None and not flat.size:
        return
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{source} must be integer token ids, got dtype {dtype}")
    for start in range(0, 0 if flat is None else len(flat), 2**24):
        chunk = flat[start:start + 2**24]
        if chunk.min() < 0 or chunk.max() >= vocab_size:
            bad = int(np.flatnonzero((chunk < 0) | (chunk >= vocab_size))[0])
            raise ValueError(f"{source}: token id {int(chunk[bad])} at token {offset + start + bad} is outside the "
                             f"model's vocabulary [0, {vocab_size}): {fix}")


# --- Layers stacked for lax.scan -------------------------------------------------------------------
# With `scan_layers`, `RWKV.blocks` is one Block whose every parameter carries a leading [n_layer] axis
# (logical axis 'layers', sharded over no mesh axis); RWKV-7 keeps layer 0 apart (`block0`) and stacks the
# n_layer - 1 others. Checkpoint, .pth and HF formats keep one entry per
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


def with_scan_layers(model: "nnx.Module", scan: bool) -> "nnx.Module":
    """The same model and parameters with the blocks stacked (scan=True) or as a list (scan=False). A model
    class whose `SCAN_FROM_LAYER` is 1 (RWKV-7: layer 0 makes the value residual's v_first, which the later
    layers take) keeps layer 0 apart as `block0` when stacked, and stacks layers 1..L-1 as `blocks`."""
    if model.config.scan_layers == scan:
        return model
    config = dataclasses.replace(model.config, scan_layers=scan)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: type(model)(config, rngs=nnx.Rngs(0))))
    params = nnx.state(model)
    blocks = params["blocks"]
    apart = getattr(type(model), "SCAN_FROM_LAYER", 0)
    if scan:
        layers = [blocks[i] for i in range(config.n_layer)]
        if apart:
            params["block0"] = layers.pop(0)
        params["blocks"] = stack_layers(layers)
    else:
        layers = unstack_layers(blocks, config.n_layer - apart)
        if apart:
            layers.insert(0, params["block0"])
            del params["block0"]
        params["blocks"] = nnx.State({i: layer for i, layer in enumerate(layers)})
    return nnx.merge(graphdef, params)


def with_kernels_in_compute_dtype(model: "nnx.Module") -> "nnx.Module":
    """For inference in a low-precision compute dtype: the model with its linears' kernels (the blocks'
    projections and the head) stored in that dtype. Each is cast to the compute dtype before its product
    anyway, so every result is the same; but cast once here instead of in every call, which in small calls
    (evaluation batches, decoding) read and wrote all the weights each time (benchmarks/lm_eval_speed.py in bf16
    shows the difference; docs/performance.md has the figures). The embedding, LayerNorms
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
