"""The WKV-7 operator as Pallas kernels for TPU (Mosaic) and GPU (Triton), forward and backward under one
`jax.custom_vjp` (the GPU kernel is described above `_gpu_token`; what follows is the TPU one).

    y_BTHN, state_BHNN = wkv7_pallas(r, w, k, v, a, b, state)

Same contract as `wkv7_chunked` in rwkv_jax/ops/wkv7.py: streams [B, T, H, N] (any float dtype, cast to
fp32 on load), the state [B, H, N, N] fp32 (row i = value channel, column j = key channel), y in v's dtype,
gradients into r, w, k, v, a, b (in their dtypes) and the initial state. Per token S_t = S_{t-1}
(diag(w_t) + a_t b_t^T) + v_t k_t^T and y_t = S_t r_t.

Forward: grid (B, H / G, T / L), the chunk axis sequential ('arbitrary'), the others 'parallel'. The
kernel reads the streams where the model leaves them, [B, T, H * N] (a free reshape of [B, T, H, N]: no
transpose in or out), in blocks of L tokens by G heads (`heads_per_block`: G * N a multiple of the 128
lanes, 2 heads at the released models' N = 64), and the decay as log w, taken in fp32 by the wrapper. For
each of its G heads a step runs the chunked (WY / UT) math of `wkv7._chunk` on an [L, N] block of each
stream on the MXU (`_chunk_math`): the pairwise-decay matrices [L, L] are matmuls, the unit
lower-triangular solve is a product of log2(L) factors (`_unit_lower_inverse_apply`), and the states
[G, N, N] fp32 live in a VMEM scratch across the chunk steps (read from the initial state at chunk 0,
written to the final state each step). The state entering each chunk is also written out: the checkpoints
[B, H, T / L, N, N] fp32, the backward's residual (L = 32: N / 8 bytes per token and channel; no
recomputation of states in the backward).

Backward: a second call over the same grid, chunks last first (the index maps reverse the chunk axis).
For each chunk and head it recomputes `_chunk_math` from the chunk's checkpoint and applies its
reverse-mode derivative (`jax.vjp` traced inside the kernel body: the transposed matmuls, again on the
MXU) to (dy, dS_end), writing the six stream gradients and carrying dS (the cotangent of the state
entering the chunk) in a VMEM scratch to the chunk before; the last step's dS is the initial state's
gradient.

The triangular solve: (I - A) U = rhs with A strictly lower [L, L] is U = (I + A)(I + A^2)(I + A^4)...
rhs (A^L = 0), log2(L) pairs of [L, L] matmuls, where substitution row by row is L dependent matrix-vector
steps with dynamic row access (sublane shuffles on TPU); the product also differentiates into matmuls.

Numerics as `wkv7._chunk` (pairwise decays factored through the block's middle token, L * max|log w|
below ~80), with the within-chunk cumulative log-decays as a matmul with the lower-triangular ones
(Mosaic has no cumsum); every matmul at Precision.HIGHEST (fp32 contraction on the MXU).

Document resets (reset_BT, reset_state as in rwkv_jax/ops/wkv7.py): the mask travels as [B, T, 1] fp32
(tokens on sublanes), the reset state as [B, H, N, N]; each chunk masks the pairs across a reset and starts
the tokens after it from the reset state, as `wkv7._chunk` does, with the last-reset positions found by
counting resets with matmuls (`_reset_masks`); the backward sums the reset state's gradient over the
chunks in a second VMEM scratch.
Under a device mesh use `wkv7_pallas_sharded` (shard_map: batch over data x fsdp, heads over tensor).
On CPU the kernels run in interpret mode.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from rwkv_jax.ops.wkv7_resets import prepare_resets as _prepare_resets

CHUNK_LENS = (16, 32, 64)  # tokens per grid step: whole bf16 (16, 128) sublane tiles
GPU_SPAN = 16  # GPU: tokens between the forward's state checkpoints, as the official CUDA kernel
BACKENDS = ("tpu", "gpu")
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static kernel configuration (hashable: a nondiff argument of the custom_vjp)."""
    interpret: bool
    chunk_len: int       # TPU: tokens per grid step; GPU: tokens between checkpoints (GPU_SPAN)
    backend: str = "tpu"
    num_warps: int = 4
    head_size: int = 0   # TPU: N (the streams travel as [B, T, H * N])
    group: int = 1       # TPU: heads per grid step (`heads_per_block`)


def heads_per_block(H: int, N: int) -> int:
    """TPU: the heads one grid step takes from a [B, T, H * N] stream, so that its block's lane width
    (group * N) is a whole number of 128-lane tiles (Mosaic's rule for a block narrower than the array):
    the fewest that do, else all H (a block as wide as the array is always allowed)."""
    for group in range(1, H + 1):
        if H % group == 0 and (group * N) % 128 == 0:
            return group
    return H


# ------------------------------------------------------------------------------------ the chunk's math

def _dot(x, y, contract=((1,), (0,))):
    """A 2-D matmul at full fp32 precision; `contract`: the contracted axes of x and y."""
    return jax.lax.dot_general(x, y, (contract, ((), ())), precision=_HIGHEST,
                               preferred_element_type=jnp.float32)


def _row(x_LN, index):
    """Row `index` (static) of x as [1, N], by a masked sum (differentiates into a broadcast, not a pad)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, x_LN.shape, 0)
    return jnp.sum(jnp.where(rows == index, x_LN, 0.0), axis=0, keepdims=True)


def _unit_lower_inverse_apply(A_LL, rhs_LN):
    """(I - A)^{-1} rhs for strictly lower-triangular A: A is nilpotent (A^L = 0), so
    (I - A)^{-1} = I + A + ... + A^{L-1} = (I + A)(I + A^2)(I + A^4)...(I + A^{2^{m-1}}), 2^m >= L."""
    U, P = rhs_LN, A_LL
    levels = max(1, math.ceil(math.log2(A_LL.shape[0])))
    for level in range(levels):
        U = U + _dot(P, U)
        if level + 1 < levels:
            P = _dot(P, P)
    return U


def _reset_masks(m_L1, L):
    """For a block with document resets (m_L1 [L, 1]: 1 where the state entering token t is replaced by
    the reset state), with p_t the last reset at or before t (none: -1):
    (since[t, s] = s >= p_t [L, L] bool, whether t has no reset at or before it [L, 1] bool, the one-hot
    onehot[t, q] = [q == p_t] [L, L] fp32, whether s >= p_{L-1} [L, 1] bool). All from counts of resets
    (exact small integers) as matmuls, since Mosaic has no cummax or gather: a reset q lies in (s, t] iff
    q <= t and q > s."""
    t = jax.lax.broadcasted_iota(jnp.int32, (L, L), 0)
    s = jax.lax.broadcasted_iota(jnp.int32, (L, L), 1)
    m_1L = jnp.sum(jnp.where(t == s, m_L1, 0.0), axis=0, keepdims=True)     # the mask as a row
    upto_t = jnp.where(s <= t, m_1L, 0.0)                                   # [t, q]: reset q <= t
    between = _dot(upto_t, jnp.where(t > s, 1.0, 0.0))                     # resets q in (s, t]
    since = between < 0.5
    count_L1 = jnp.sum(upto_t, axis=1, keepdims=True)                       # resets at or before t
    onehot = jnp.where(since, upto_t, 0.0)
    total = jnp.sum(m_1L, axis=1, keepdims=True)
    return since, count_L1 < 0.5, onehot, count_L1 > total - 0.5


def _chunk_math(S0_NN, r, log_w, k, v, a, b, resets=None):
    """One block of L tokens ([L, N] fp32 each; the decay as its logarithm) from the state S0 entering it:
    (y [L, N], state after).

    With c_t = sum_{s<=t} log w_s (inclusive) and the reference m = (L-1)//2 (`wkv7._chunk` derives it):
        A_xy[t, s] = sum_j x_t[j] y_s[j] e^{c_{t-1}[j] - c_s[j]}  (s < t),  M_xy the same with c_t (s <= t)
        U = (I - A_ab)^{-1} ((a e^{c_{t-1}}) S0^T + A_ak V)          (u_t = S_{t-1} a_t)
        y = (r e^{c_t}) S0^T + M_rb U + M_rk V
        S_L = S0 diag(e^{c_L}) + U^T (b e^{c_L - c}) + V^T (k e^{c_L - c})
    resets: (m [L, 1] fp32, the reset state R [N, N]) or None. As in `wkv7._chunk`, token t then starts
    from its last reset p_t in the block, if any: its pairs keep only s >= p_t, and its base term is R
    decayed from p_t (e^{c_{t-1} - c_{p_t - 1}}) instead of S0 decayed from the block's start.
    """
    L = r.shape[0]
    t = jax.lax.broadcasted_iota(jnp.int32, (L, L), 0)
    s = jax.lax.broadcasted_iota(jnp.int32, (L, L), 1)
    c = _dot(jnp.where(s <= t, 1.0, 0.0), log_w)                 # cumulative sum over the block's tokens
    c_before = c - log_w
    c_ref = _row(c, (L - 1) // 2)
    a_hat, r_hat = a * jnp.exp(c_before - c_ref), r * jnp.exp(c - c_ref)
    b_hat, k_hat = b * jnp.exp(c_ref - c), k * jnp.exp(c_ref - c)
    nt = ((1,), (1,))                                             # x y^T
    strictly, inclusive = s < t, s <= t
    c_start = jnp.zeros_like(c)
    base = lambda x: _dot(x, S0_NN, nt)                           # x_t^T S0^T: the terms from S0
    if resets is not None:
        m_L1, R_NN = resets
        since, from_S0, onehot, to_end_keep = _reset_masks(m_L1, L)
        strictly, inclusive = strictly & since, inclusive & since
        c_start = _dot(onehot, c_before)                          # c_{p_t - 1} (0 without a reset)
        base = lambda x: jnp.where(from_S0, _dot(x, S0_NN, nt), _dot(x, R_NN, nt))
    pairs = lambda x, y, keep: jnp.where(keep, _dot(x, y, nt), 0.0)
    A_ab, A_ak = pairs(a_hat, b_hat, strictly), pairs(a_hat, k_hat, strictly)
    M_rb, M_rk = pairs(r_hat, b_hat, inclusive), pairs(r_hat, k_hat, inclusive)
    U = _unit_lower_inverse_apply(A_ab, base(a * jnp.exp(c_before - c_start)) + _dot(A_ak, v))
    y = base(r * jnp.exp(c - c_start)) + _dot(M_rb, U) + _dot(M_rk, v)
    c_end = _row(c, L - 1)
    to_end = jnp.exp(c_end - c)                                   # e^{c_L - c_s} <= 1
    S_start = S0_NN
    if resets is not None:                                        # the last token's start: S0 or R
        to_end = jnp.where(to_end_keep, to_end, 0.0)
        S_start = jnp.where(_row(jnp.where(from_S0, 1.0, 0.0), L - 1) > 0.5, S0_NN, R_NN)
    tn = ((0,), (0,))                                             # x^T y
    S_end = (S_start * jnp.exp(c_end - _row(c_start, L - 1)) + _dot(U, b * to_end, tn)
             + _dot(v, k * to_end, tn))
    return y, S_end


# ------------------------------------------------------------------------------------------------ kernels
#
# Layouts seen by the TPU kernels: streams and their gradients [B, T, H * N] (the model's [B, T, H, N]
# without a transpose: a free reshape) in blocks (1, L, G * N), G = `heads_per_block` heads side by side on
# the lanes, head j at lanes [j N, (j + 1) N); states [B, H, N, N] in blocks (1, G, N, N); checkpoints
# [B, H, T / L, N, N] in blocks (1, G, 1, N, N); with resets, the mask [B, T, 1] fp32 in blocks (1, L, 1)
# (tokens on sublanes, as in the streams) and the reset state [B, H, N, N] like the state. `resets`
# below: () or (mask ref, reset state ref). The decay stream is log w.

_STREAMS = 6


def _load_chunk(stream_refs, reset_refs, head, N):
    """Head `head`'s [L, N] fp32 block of each stream, and its (mask, reset state) or None."""
    lanes = pl.ds(head * N, N)
    streams = [ref[0, :, lanes].astype(jnp.float32) for ref in stream_refs]
    resets = (reset_refs[0][0], reset_refs[1][0, head]) if reset_refs else None
    return streams, resets


def _store_heads(ref, blocks):
    """Write the G heads' [L, N] blocks side by side into a (1, L, G * N) block."""
    N = blocks[0].shape[1]
    for head, block in enumerate(blocks):
        ref[0, :, pl.ds(head * N, N)] = block.astype(ref.dtype)


def _forward_kernel(n_resets, G, N, *refs):
    stream_refs, s0_ref = refs[:_STREAMS], refs[_STREAMS]
    reset_refs, (y_ref, s_ref, ck_ref, S_scratch) = refs[_STREAMS + 1:][:n_resets], refs[_STREAMS + 1 + n_resets:]

    @pl.when(pl.program_id(2) == 0)
    def _():
        S_scratch[...] = s0_ref[0]

    ys = []
    for head in range(G):
        S0 = S_scratch[head]
        ck_ref[0, head, 0] = S0
        streams, resets = _load_chunk(stream_refs, reset_refs, head, N)
        y, S = _chunk_math(S0, *streams, resets=resets)
        ys.append(y)
        S_scratch[head] = S
        s_ref[0, head] = S
    _store_heads(y_ref, ys)


def _backward_kernel(n_resets, G, N, *refs):
    stream_refs, (dy_ref, ck_ref, ds_end_ref) = refs[:_STREAMS], refs[_STREAMS:_STREAMS + 3]
    reset_refs, outs = refs[_STREAMS + 3:][:n_resets], refs[_STREAMS + 3 + n_resets:]
    grad_refs, ds0_ref = outs[:_STREAMS], outs[_STREAMS]
    dS_scratch, *dR_scratch = outs[_STREAMS + 1 + bool(n_resets):]

    @pl.when(pl.program_id(2) == 0)                              # the last chunk comes first
    def _():
        dS_scratch[...] = ds_end_ref[0]
        for ref in dR_scratch:
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    grads_by_head = []
    for head in range(G):
        streams, resets = _load_chunk(stream_refs, reset_refs, head, N)
        mask = None if resets is None else resets[0]
        chunk = lambda S0, *args: _chunk_math(S0, *args[:_STREAMS],
                                              resets=None if mask is None else (mask, args[-1]))
        _, pullback = jax.vjp(chunk, ck_ref[0, head, 0], *streams, *([] if resets is None else [resets[1]]))
        dy = dy_ref[0, :, pl.ds(head * N, N)].astype(jnp.float32)
        dS0, *grads = pullback((dy, dS_scratch[head]))
        grads_by_head.append(grads[:_STREAMS])
        dS_scratch[head] = dS0
        ds0_ref[0, head] = dS0
        if resets is not None:                                   # the reset state's gradient, summed
            dR_scratch[0][head] += grads[_STREAMS]
            outs[_STREAMS + 1][0, head] = dR_scratch[0][head]
    for i, ref in enumerate(grad_refs):
        _store_heads(ref, [grads[i] for grads in grads_by_head])


def _specs(cfg, shape, reverse):
    """(grid, stream, state, checkpoint and reset-mask BlockSpecs) for [B, T, H * N] streams."""
    B, T, D = shape
    L, N, G = cfg.chunk_len, cfg.head_size, cfg.group
    n = T // L
    chunk = (lambda i: n - 1 - i) if reverse else (lambda i: i)
    stream = pl.BlockSpec((1, L, G * N), lambda ib, ig, i: (ib, chunk(i), ig))
    state = pl.BlockSpec((1, G, N, N), lambda ib, ig, i: (ib, ig, 0, 0))
    ckpt = pl.BlockSpec((1, G, 1, N, N), lambda ib, ig, i: (ib, ig, chunk(i), 0, 0))
    mask = pl.BlockSpec((1, L, 1), lambda ib, ig, i: (ib, chunk(i), 0))
    return (B, D // (G * N), n), stream, state, ckpt, mask


def _compiler_params(cfg):
    if cfg.interpret:
        return None
    if cfg.backend == "gpu":
        from jax.experimental.pallas import triton as pltriton
        return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1)
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _scratch():
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.VMEM


def _cost(cfg, shape, stream_bytes, backward):
    """pl.CostEstimate per call: the chunk's matmuls (2 flops per multiply-add; the backward ~2x the
    forward's, plus its recomputation), exps per element, the streams' bytes (`stream_bytes` per token and
    channel, over all streams read and written) and the states'."""
    B, T, D = shape
    L, N = cfg.chunk_len, cfg.head_size
    H = D // N
    chunks = B * H * (T // L)
    levels = max(1, math.ceil(math.log2(L)))
    forward = 2 * (L * L * 1 + 4 * L * L * N + 2 * L * N * N + L * L * N * (2 + levels)
                   + L * L * L * (levels - 1) + 2 * L * N * N)
    flops = forward * (3 if backward else 1)
    state_bytes = chunks * N * N * 4 + 2 * B * H * N * N * 4
    return pl.CostEstimate(flops=int(chunks * flops), transcendentals=int(chunks * L * N * (6 if backward else 3)),
                           bytes_accessed=int(stream_bytes * B * T * D + state_bytes))


def _itemsizes(arrays):
    return sum(x.dtype.itemsize for x in arrays)


def _forward_call(cfg, streams, S0, resets):
    if cfg.backend == "gpu":
        return _gpu_forward_call(cfg, streams, S0, resets)
    shape = streams[0].shape
    B, T, D = shape
    L, N, G = cfg.chunk_len, cfg.head_size, cfg.group
    H = D // N
    grid, stream, state, ckpt, mask = _specs(cfg, shape, reverse=False)
    f32 = lambda s: jax.ShapeDtypeStruct(s, jnp.float32)
    out_shape = (jax.ShapeDtypeStruct(shape, streams[3].dtype), f32((B, H, N, N)), f32((B, H, T // L, N, N)))
    return pl.pallas_call(
        functools.partial(_forward_kernel, len(resets), G, N), out_shape=out_shape, grid=grid,
        in_specs=[stream] * _STREAMS + [state] + [mask, state][:len(resets)], out_specs=(stream, state, ckpt),
        scratch_shapes=[_scratch()((G, N, N), jnp.float32)],
        compiler_params=_compiler_params(cfg), interpret=cfg.interpret, name="wkv7_forward",
        cost_estimate=_cost(cfg, shape, _itemsizes(streams) + streams[3].dtype.itemsize, backward=False),
    )(*streams, S0, *resets)


def _backward_call(cfg, streams, dy, checkpoints, dS_end, resets):
    if cfg.backend == "gpu":
        return _gpu_backward_call(cfg, streams, dy, checkpoints, dS_end, resets)
    shape = streams[0].shape
    B, T, D = shape
    N, G = cfg.head_size, cfg.group
    H = D // N
    grid, stream, state, ckpt, mask = _specs(cfg, shape, reverse=True)
    n_states = 2 if resets else 1                                # dS0 (and the reset state's gradient)
    out_shape = (*[jax.ShapeDtypeStruct(shape, x.dtype) for x in streams],   # gradients in the streams' dtypes
                 *[jax.ShapeDtypeStruct((B, H, N, N), jnp.float32)] * n_states)
    return pl.pallas_call(
        functools.partial(_backward_kernel, len(resets), G, N), out_shape=out_shape, grid=grid,
        in_specs=[stream] * 7 + [ckpt, state] + [mask, state][:len(resets)],
        out_specs=(*[stream] * _STREAMS, *[state] * n_states),
        scratch_shapes=[_scratch()((G, N, N), jnp.float32)] * n_states,
        compiler_params=_compiler_params(cfg), interpret=cfg.interpret, name="wkv7_backward",
        cost_estimate=_cost(cfg, shape, 2 * _itemsizes(streams) + dy.dtype.itemsize, backward=True),
    )(*streams, dy, checkpoints, dS_end, *resets)

# ------------------------------------------------------------------------------------ GPU (Triton) kernels
#
# One program per (batch row, head), the T loop inside with the state [N, N] fp32 as a value (registers).
# Each token's rows [1, N] are loaded and stored at their own dynamic offset; a column [N, 1] is a
# reshape of a row. Per token (`_gpu_token`): S_in = R where the token resets, sa = S_in a,
# S = S_in diag(w) + sa b^T + v k^T, y = S r. The forward writes the state entering every GPU_SPAN tokens
# (as the official CUDA kernel checkpoints every 16). The backward walks the spans last first; inside a
# span it recomputes, for each token from the last to the first, the state entering it from the span's
# checkpoint (forwards, never dividing by w: the pure-JAX sequential form's choice, see
# rwkv_jax/ops/wkv7.py; ~8.5 recomputed tokens per token, where the official kernel walks the state
# backwards by dividing by w), then applies `wkv7._back_token`'s reverse step.

def _gpu_row(ref, t):
    return ref[0, 0, pl.ds(t, 1), :].astype(jnp.float32)          # [1, N]


def _gpu_token(S, x, m, R):
    """(state entering the token after a reset, state after it, sa [N, 1]) for rows x = (r, w, k, v, a, b)."""
    _, w, k, v, a, b = x
    if m is not None:
        S = jnp.where(m > 0.5, R, S)
    sa = jnp.sum(S * a, axis=1, keepdims=True)
    return S, S * w + sa * b + v.reshape(v.shape[1], 1) * k, sa


def _gpu_refs(n_resets, refs, n_inputs):
    """(inputs, (mask ref, reset state value) or None, outputs) of a GPU kernel's refs."""
    ins, rest = refs[:n_inputs], refs[n_inputs:]
    if not n_resets:
        return ins, None, rest
    return ins, (rest[0], rest[1][0, 0]), rest[2:]


def _gpu_mask(resets, t):
    return None if resets is None else resets[0][0, pl.ds(t, 1), :]  # [1, 1]


def _gpu_forward_kernel(n_spans, n_resets, *refs):
    ins, resets, (y_ref, s_ref, ck_ref) = _gpu_refs(n_resets, refs, _STREAMS + 1)
    stream_refs, s0_ref = ins[:_STREAMS], ins[_STREAMS]
    R = None if resets is None else resets[1]

    def span(i, S):
        ck_ref[0, 0, pl.ds(i, 1)] = S[None]
        for j in range(GPU_SPAN):
            t = i * GPU_SPAN + j
            x = [_gpu_row(ref, t) for ref in stream_refs]
            _, S, _ = _gpu_token(S, x, _gpu_mask(resets, t), R)
            y = jnp.sum(S * x[0], axis=1, keepdims=True)           # S r: [N, 1]
            y_ref[0, 0, pl.ds(t, 1), :] = y.reshape(1, y.shape[0]).astype(y_ref.dtype)
        return S
    s_ref[0, 0] = jax.lax.fori_loop(0, n_spans, span, s0_ref[0, 0].astype(jnp.float32))


def _gpu_back_token(x, dy_col, S_in, S_out, sa, dS):
    """`wkv7._back_token` on rows: (dr, dw, dk, dv, da, db) [1, N] each and the cotangent of S_in."""
    r, w, k, v, a, b = x
    dr = jnp.sum(S_out * dy_col, axis=0, keepdims=True)            # S'^T dy
    dS = dS + dy_col * r
    dv = jnp.sum(dS * k, axis=1, keepdims=True)
    dk = jnp.sum(v.reshape(v.shape[1], 1) * dS, axis=0, keepdims=True)
    dw = jnp.sum(S_in * dS, axis=0, keepdims=True)
    dSb = jnp.sum(dS * b, axis=1, keepdims=True)
    da = jnp.sum(dSb * S_in, axis=0, keepdims=True)
    db = jnp.sum(sa * dS, axis=0, keepdims=True)
    return (dr, dw, dk, dv.reshape(1, dv.shape[0]), da, db), dS * w + dSb * a


def _gpu_backward_kernel(n_spans, n_resets, *refs):
    ins, resets, outs = _gpu_refs(n_resets, refs, _STREAMS + 3)
    stream_refs, dy_ref, ck_ref, ds_end_ref = ins[:_STREAMS], ins[_STREAMS], ins[_STREAMS + 1], ins[_STREAMS + 2]
    grad_refs, ds0_ref = outs[:_STREAMS], outs[_STREAMS]
    R = None if resets is None else resets[1]
    load = lambda t: [_gpu_row(ref, t) for ref in stream_refs]

    def token(jj, carry, t0, S0):
        dS, *dR = carry
        t = t0 + GPU_SPAN - 1 - jj
        S = jax.lax.fori_loop(t0, t, lambda q, S: _gpu_token(S, load(q), _gpu_mask(resets, q), R)[1], S0)
        x, m = load(t), _gpu_mask(resets, t)
        S_in, S_out, sa = _gpu_token(S, x, m, R)
        dy = _gpu_row(dy_ref, t)
        grads, dS = _gpu_back_token(x, dy.reshape(dy.shape[1], 1), S_in, S_out, sa, dS)
        for ref, g in zip(grad_refs, grads):
            ref[0, 0, pl.ds(t, 1), :] = g
        if m is not None:                                          # S_in came from the reset state
            dR = [dR[0] + jnp.where(m > 0.5, dS, 0.0)]
            dS = jnp.where(m > 0.5, 0.0, dS)
        return (dS, *dR)

    def span(ii, carry):
        i = n_spans - 1 - ii
        S0 = ck_ref[0, 0, pl.ds(i, 1)][0]
        return jax.lax.fori_loop(0, GPU_SPAN, lambda jj, c: token(jj, c, i * GPU_SPAN, S0), carry)
    dS_end = ds_end_ref[0, 0]
    dS, *dR = jax.lax.fori_loop(0, n_spans, span, (dS_end, *([jnp.zeros_like(dS_end)] if resets else [])))
    ds0_ref[0, 0] = dS
    if resets is not None:
        outs[_STREAMS + 1][0, 0] = dR[0]


def _gpu_specs(shape):
    B, H, T, N = shape
    stream = pl.BlockSpec((1, 1, T, N), lambda ib, ih: (ib, ih, 0, 0))
    state = pl.BlockSpec((1, 1, N, N), lambda ib, ih: (ib, ih, 0, 0))
    ckpt = pl.BlockSpec((1, 1, T // GPU_SPAN, N, N), lambda ib, ih: (ib, ih, 0, 0, 0))
    mask = pl.BlockSpec((1, T, 1), lambda ib, ih: (ib, 0, 0))
    return (B, H), stream, state, ckpt, mask


def _gpu_cost(shape, itemsize, streams, backward):
    """pl.CostEstimate: ~8 N^2 flops per token forward (the update and S r); the backward recomputes
    (GPU_SPAN + 1) / 2 tokens per token on average and its reverse step is ~14 N^2."""
    B, H, T, N = shape
    per_token = 8 * N * N * ((GPU_SPAN + 1) / 2 + 2) if backward else 8 * N * N
    state_bytes = B * H * (T // GPU_SPAN + 2) * N * N * 4
    return pl.CostEstimate(flops=int(B * H * T * per_token), transcendentals=0,
                           bytes_accessed=int(streams * B * H * T * N * itemsize + state_bytes))


def _gpu_forward_call(cfg, streams, S0, resets):
    shape = streams[0].shape
    B, H, T, N = shape
    grid, stream, state, ckpt, mask = _gpu_specs(shape)
    f32 = lambda s: jax.ShapeDtypeStruct(s, jnp.float32)
    out_shape = (jax.ShapeDtypeStruct(shape, streams[3].dtype), f32((B, H, N, N)),
                 f32((B, H, T // GPU_SPAN, N, N)))
    return pl.pallas_call(
        functools.partial(_gpu_forward_kernel, T // GPU_SPAN, len(resets)), out_shape=out_shape, grid=grid,
        in_specs=[stream] * _STREAMS + [state] + [mask, state][:len(resets)], out_specs=(stream, state, ckpt),
        compiler_params=_compiler_params(cfg), interpret=cfg.interpret, name="wkv7_forward_gpu",
        cost_estimate=_gpu_cost(shape, streams[0].dtype.itemsize, streams=7, backward=False),
    )(*streams, S0, *resets)


def _gpu_backward_call(cfg, streams, dy, checkpoints, dS_end, resets):
    shape = streams[0].shape
    B, H, T, N = shape
    grid, stream, state, ckpt, mask = _gpu_specs(shape)
    n_states = 2 if resets else 1
    out_shape = (*[jax.ShapeDtypeStruct(shape, jnp.float32)] * _STREAMS,
                 *[jax.ShapeDtypeStruct((B, H, N, N), jnp.float32)] * n_states)
    return pl.pallas_call(
        functools.partial(_gpu_backward_kernel, T // GPU_SPAN, len(resets)), out_shape=out_shape, grid=grid,
        in_specs=[stream] * 7 + [ckpt, state] + [mask, state][:len(resets)],
        out_specs=(*[stream] * _STREAMS, *[state] * n_states),
        compiler_params=_compiler_params(cfg), interpret=cfg.interpret, name="wkv7_backward_gpu",
        cost_estimate=_gpu_cost(shape, streams[0].dtype.itemsize, streams=13, backward=True),
    )(*streams, dy, checkpoints, dS_end, *resets)


# ------------------------------------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _wkv7_padded(cfg, streams, S0, resets):
    """streams: (r, w, k, v, a, b) [B, H, T, N] with T a multiple of the chunk; S0 [B, H, N, N] fp32;
    resets: () or (the mask [B, T, 1] fp32, the reset state [B, H, N, N] fp32)."""
    y, S, _ = _forward_call(cfg, streams, S0, resets)
    return y, S


def _wkv7_padded_fwd(cfg, streams, S0, resets):
    y, S, checkpoints = _forward_call(cfg, streams, S0, resets)
    return (y, S), (streams, checkpoints, resets)


def _wkv7_padded_bwd(cfg, residuals, cotangents):
    streams, checkpoints, resets = residuals
    dy, dS = cotangents
    outs = _backward_call(cfg, streams, dy, checkpoints, dS.astype(jnp.float32), resets)
    grads, dS0 = outs[:_STREAMS], outs[_STREAMS]
    d_resets = (jnp.zeros_like(resets[0]), outs[_STREAMS + 1]) if resets else ()
    return tuple(g.astype(x.dtype) for g, x in zip(grads, streams)), dS0, d_resets


_wkv7_padded.defvjp(_wkv7_padded_fwd, _wkv7_padded_bwd)


# ---------------------------------------------------------------------------------------------- wrappers

def _check(streams, state, chunk_len):
    if chunk_len not in CHUNK_LENS:
        raise ValueError(f"chunk_len must be one of {CHUNK_LENS} for the WKV-7 Pallas kernel, got {chunk_len}")
    shape = streams[0].shape
    if len(shape) != 4 or any(x.shape != shape for x in streams):
        raise ValueError(f"r, w, k, v, a, b must all be [batch, time, heads, N], got {[x.shape for x in streams]}")
    if any(x.dtype == jnp.float64 for x in streams):
        raise ValueError("wkv7_pallas computes in fp32; for float64 inputs use form='sequential' or 'chunked'")
    expected = (shape[0], shape[2], shape[3], shape[3])
    if state is not None and jnp.shape(state) != expected:
        raise ValueError(f"state must be [batch, heads, N, N] = {expected}, got {jnp.shape(state)}")


def default_backend() -> str:
    """'gpu' on CUDA/ROCm, else 'tpu' (also the kernel that interpret mode runs on CPU)."""
    return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "tpu"


def wkv7_pallas(r_BTHN, w_BTHN, k_BTHN, v_BTHN, a_BTHN, b_BTHN, state_BHNN=None, *, chunk_len: int = 16,
                backend: str | None = None, interpret: bool | None = None, num_warps: int = 4, reset_BT=None,
                reset_state=None):
    """WKV-7 over a sequence as the Mosaic kernel: (y [B, T, H, N] in v's dtype, final state [B, H, N, N]
    fp32). chunk_len: tokens per grid step (16, 32 or 64; see `wkv7._chunk` for the decay range each
    allows; the GPU kernel checkpoints every GPU_SPAN tokens whatever chunk_len). backend: 'tpu' (Mosaic,
    chunked) or 'gpu' (Triton, token by token; N a power of 2, num_warps per program); default from
    jax.default_backend(). interpret: run in the Pallas interpreter (default: on CPU). T is padded to a
    multiple of the chunk (GPU: of GPU_SPAN) with identity tokens (w = 1, r = k = v = a = b = 0), which
    leave the state unchanged.
    `reset_BT`, `reset_state`: document resets, as in rwkv_jax/ops/wkv7.py (gradients flow into the reset
    state from every reset position)."""
    streams = (r_BTHN, w_BTHN, k_BTHN, v_BTHN, a_BTHN, b_BTHN)
    _check(streams, state_BHNN, chunk_len)
    B, T, H, N = r_BTHN.shape
    S0 = jnp.zeros((B, H, N, N), jnp.float32) if state_BHNN is None else jnp.asarray(state_BHNN, jnp.float32)
    resets = _prepare_resets(reset_BT, reset_state, S0.shape, T, jnp.float32)
    if T == 0:
        return v_BTHN, S0
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown Pallas backend {backend!r}: choose one of {BACKENDS}")
    if backend == "gpu" and N & (N - 1):
        raise ValueError(f"the GPU (Triton) WKV-7 kernel needs a power-of-2 head size, got {N}: use "
                         "wkv_form='chunked'")
    if interpret is None:
        interpret = jax.default_backend() not in ("tpu", "gpu", "cuda", "rocm")
    L = GPU_SPAN if backend == "gpu" else chunk_len
    T_pad = -(-T // L) * L
    if resets is not None:                                        # padding tokens do not reset
        resets = (jnp.pad(resets[0].astype(jnp.float32), ((0, 0), (0, T_pad - T)))[:, :, None], resets[1])
    pad = lambda x, fill: x if T_pad == T else jnp.pad(x, ((0, 0), (0, T_pad - T), (0, 0), (0, 0)),
                                                      constant_values=fill)
    if backend == "gpu":   # [B, H, T_pad, N]; the decay itself (1 on padding)
        padded = tuple(pad(x, 1.0 if i == 1 else 0.0).transpose(0, 2, 1, 3) for i, x in enumerate(streams))
        cfg = _Config(bool(interpret), L, backend, num_warps)
    else:   # [B, T_pad, H * N], no transpose; the decay as log w in fp32 (0 on padding)
        log_w = jnp.log(w_BTHN.astype(jnp.float32))
        padded = tuple(pad(x, 0.0).reshape(B, T_pad, H * N) for x in (r_BTHN, log_w, *streams[2:]))
        cfg = _Config(bool(interpret), L, backend, num_warps, head_size=N, group=heads_per_block(H, N))
    y, S = _wkv7_padded(cfg, padded, S0, resets or ())
    if backend == "gpu":
        y = y.transpose(0, 2, 1, 3)
    return y.reshape(B, T_pad, H, N)[:, :T], S


def wkv7_pallas_sharded(mesh, r_BTHN, w_BTHN, k_BTHN, v_BTHN, a_BTHN, b_BTHN, state_BHNN=None, *,
                        reset_BT=None, reset_state=None, **kwargs):
    """`wkv7_pallas` on a device mesh: each device runs the kernel on its batch rows x heads inside
    `shard_map` (XLA cannot partition a Mosaic call). WKV-7 is independent per (row, head): no
    communication in the forward or the backward (a reset state given per head is broadcast over the
    batch first, so its gradient is summed over the batch shards by the broadcast's transpose)."""
    from jax.sharding import PartitionSpec as P

    from rwkv_jax.train import sharding
    B, T, H, N = r_BTHN.shape
    big = sharding.spec_for(("batch", "seq", "heads", "head_dim"), r_BTHN.shape, mesh)
    state_spec = P(big[0], big[2], None, None)
    if state_BHNN is None:
        state_BHNN = jnp.zeros((B, H, N, N), jnp.float32)
    resets = _prepare_resets(reset_BT, reset_state, (B, H, N, N), T, jnp.float32)
    extra = () if resets is None else resets

    def local(*args):
        local_resets = dict(reset_BT=args[7], reset_state=args[8]) if extra else {}
        return wkv7_pallas(*args[:7], **local_resets, **kwargs)
    reset_specs = [P(big[0], None), state_spec][:len(extra)]
    fn = jax.shard_map(local, mesh=mesh, in_specs=(*[big] * 6, state_spec, *reset_specs),
                       out_specs=(big, state_spec), check_vma=False)
    return fn(r_BTHN, w_BTHN, k_BTHN, v_BTHN, a_BTHN, b_BTHN, state_BHNN, *extra)


def wkv7_pallas_auto(r_BTHN, w_BTHN, k_BTHN, v_BTHN, a_BTHN, b_BTHN, state_BHNN=None, **kwargs):
    """The dispatcher's entry (wkv7.wkv7 with form='pallas'). Under rwkv_jax.train.sharding.
    activation_sharding(mesh) with more than one device: the sharded call, compiled for the mesh's
    devices (so an ahead-of-time compile for a TPU topology from a CPU host gets the Mosaic kernel);
    otherwise the plain call."""
    from rwkv_jax.train import sharding
    mesh = sharding.active_mesh()
    args = (r_BTHN, w_BTHN, k_BTHN, v_BTHN, a_BTHN, b_BTHN, state_BHNN)
    if mesh is None or mesh.size == 1:
        return wkv7_pallas(*args, **kwargs)
    platform = mesh.devices.flat[0].platform
    kwargs.setdefault("backend", "gpu" if platform in ("gpu", "cuda", "rocm") else "tpu")
    kwargs.setdefault("interpret", platform not in ("tpu", "gpu", "cuda", "rocm"))
    return wkv7_pallas_sharded(mesh, *args, **kwargs)
