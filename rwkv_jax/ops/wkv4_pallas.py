"""The WKV operator as Pallas kernels, forward and backward, for TPU (Mosaic) and GPU (Triton).

    y_BTC, state = wkv_pallas(time_decay, time_first, k_BTC, v_BTC, state)

Same contract and numerics as `wkv_sequential` in rwkv_jax/ops/wkv4.py: fp32 arithmetic and state
whatever the input dtype, the running-maximum exponent kept as an anchor plus a count of decay steps,
the empty exponent EMPTY_EXPONENT (finite), y in v's dtype, gradients into time_decay, time_first, k, v
and every part of the initial state.

Forward. One program per block of batch rows x channels (channels on the lane axis); the loop over T
runs inside the kernel with (a, b, anchor, n) carried in fp32. T is streamed in blocks (TPU: a sequential
grid axis with the state in VMEM scratch; GPU: a loop inside one program), so memory does not grow with
T beyond the inputs and outputs. Every CHUNK tokens the forward writes the state: [T/CHUNK] checkpoints,
12/CHUNK bytes per element of k.

Backward (own derivation; the official CUDA kernel also recomputes the forward and then runs a reverse
pass). Per channel, with N_t = A_t + e^{u+k_t} v_t, D_t = B_t + e^{u+k_t}, y_t = N_t / D_t, where
A_t = sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{p0 + t w} a0 and B_t likewise with 1 and b0 (unscaled sums),
and a loss L with dL/dy_t = g_t and, on the final state (a_T, b_T, p_T) = (A_T e^{-p_T}, B_T e^{-p_T}, p_T),
cotangents (g_a, g_b, g_p):

    alpha_t = dL/dA_t = g_t / D_t,   beta_t = dL/dB_t = -g_t y_t / D_t    (t < T)
    alpha_T = g_a e^{-p_T},           beta_T = g_b e^{-p_T}                (the final state as "step T")

Token i enters every A_t, B_t with t > i with weight e^{(t-1-i) w + k_i}, so with the reverse sums

    G_i = sum_{t>i} e^{(t-1-i) w} (alpha_t, beta_t),   H_i = sum_{t>i} (t-1-i) e^{(t-1-i) w} (alpha_t, beta_t)
    G_{i-1} = (alpha_i, beta_i) + e^w G_i,            H_{i-1} = e^w (H_i + G_i)

    dL/dv_i = e^{k_i} G^a_i + e^{u+k_i} alpha_i
    dL/dk_i = e^{k_i} (v_i G^a_i + G^b_i) + e^{u+k_i} alpha_i (v_i - y_i)
    dL/du   = sum_i e^{u+k_i} alpha_i (v_i - y_i)
    dL/dw   = sum_i e^{k_i} (v_i H^a_i + H^b_i) + e^{p0} (a0 H^a_{-1} + b0 H^b_{-1})
    dL/da0  = e^{p0} G^a_{-1},  dL/db0 = e^{p0} G^b_{-1},  dL/dp0 = e^{p0} (a0 G^a_{-1} + b0 G^b_{-1})

(the initial state is "token -1" with k = p0 and v = a0, b0). p_T itself is a running maximum,
p_T = anchor + n w: its cotangent, g_p - g_a a_T - g_b b_T (a_T and b_T carry e^{-p_T}), flows to the k
that set the anchor (or to p0) and n times to w.

Numerics of the backward: alpha_t = (g_t / d_t) e^{-q_t}, with q_t, d_t the exponent and mantissa of
D_t's scaled form. G_i and H_i are carried as mantissas of e^{-p_{i+1}}, p_{i+1} the forward's running-
maximum exponent after token i (then G is exactly the cotangent of the scaled state): moving from token i
to i - 1 multiplies by the forward's own factor e^{p_i + w - p_{i+1}} <= 1, token i's weight is the
forward's e^{k_i - p_{i+1}} <= 1 and alpha_i enters as e^{p_i - q_i} g_i / d_i. So nothing overflows,
nothing is -inf, and the reverse pass rounds where the forward rounded: a separate running maximum for the
reverse sums (tried first) re-anchors at most tokens and its exponent roundings cost 10-100x the
recurrence's gradient error on extreme inputs. The reverse sums come back as mantissas of e^{-p0}, so the
initial-state gradients need no exponential either.

The reverse pass needs, per token, the forward's factors: each CHUNK of tokens is recomputed from its
checkpoint (a, b, anchor, n), bit for bit the forward's arithmetic, into values held by the program
(registers / VMEM), then walked backwards.

Document resets (`reset_BT`, see rwkv_jax/ops/wkv4.py): to the empty state only. The mask travels as a
[B, T, 1] fp32 array (one lane per token). The forward empties the carry before a reset token; the
recomputation in the backward does the same, and the reverse pass, having computed the cotangent of the
state entering a reset token, drops it (G, H and the pending p_T cotangent become 0): nothing before a reset
reaches what comes after it. A non-empty reset state needs a pure-JAX form.

Variants: backend='tpu' (Mosaic: T blocks on a sequential grid axis, scratch carry, static row slices)
and backend='gpu' (Triton: one program per batch row x channel block, T loop inside, power-of-2 blocks,
each token's row loaded and stored at its own dynamic offset, per-token values kept in registers); the
per-token math is shared. On CPU the kernels run in interpret mode.
Under a device mesh use `wkv_pallas_sharded` (shard_map: batch over data x fsdp, channels over tensor):
Mosaic and Triton calls cannot be partitioned by XLA.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from rwkv_jax.ops.wkv4_state import EMPTY_EXPONENT, WKVState, empty_state

CHUNK = 16  # tokens per checkpoint and per recomputed block; a whole bf16 (16, 128) tile on TPU
LANES = 128  # channels are padded to a multiple of the TPU lane width
BACKENDS = ("tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static kernel configuration (hashable: a nondiff argument of the custom_vjp)."""
    backend: str
    interpret: bool
    block_b: int
    block_c: int
    block_t: int
    t_valid: int  # real sequence length; tokens at or after it are padding (state unchanged)
    num_warps: int
    resets: bool = False  # a reset mask is passed after the big inputs


# ------------------------------------------------------------------------------- shared per-token math

def _forward_token(w, u, k, v, carry):
    """One token, exactly the arithmetic of `wkv_sequential`. carry = (a, b, anchor, n) with p = anchor + n w.
    Returns y, the next carry, and the factors the backward reuses: (den, e^{p-q}, e^{u+k-q}, e^{p+w-p'},
    e^{k-p'}, k set the new anchor), q the exponent of y's sums and p' the next state's."""
    a, b, anchor, n = carry
    p, uk = anchor + n * w, u + k
    q = jnp.maximum(p, uk)
    e_state, e_bonus = jnp.exp(p - q), jnp.exp(uk - q)
    den = e_state * b + e_bonus
    y = (e_state * a + e_bonus * v) / den
    decayed = anchor + (n + 1.0) * w
    top = jnp.maximum(decayed, k)
    e_old, e_new = jnp.exp(decayed - top), jnp.exp(k - top)
    k_is_max = k >= decayed
    carry = (e_old * a + e_new * v, e_old * b + e_new, jnp.where(k_is_max, k, anchor),
             jnp.where(k_is_max, 0.0, n + 1.0))
    return y, carry, (den, e_state, e_bonus, e_old, e_new, k_is_max)


def _backward_token(v, add_a, add_b, e_old, e_new, k_is_max, carry):
    """Token i of the reverse pass. carry = (G^a, G^b, H^a, H^b, pending p_T cotangent, dL/dw accumulator)
    holding the sums over t > i as mantissas of e^{-p_{i+1}} (p_{i+1}: the forward's exponent after token
    i; G is then exactly the cotangent of the scaled state). Returns (the reverse-sum parts of dL/dk_i,
    dL/dv_i) and the carry for t > i - 1, whose exponent is -p_i: the forward's own factors
    e_old = e^{p_i + w - p_{i+1}} and e_new = e^{k_i - p_{i+1}} (both <= 1) move between the two, so
    the reverse pass rounds where the forward rounded and adds no exponent of its own.
    add_a, add_b: alpha_i, beta_i as mantissas of e^{-p_i}."""
    ga, gb, ha, hb, pending, gw = carry
    dv = e_new * ga
    dk = e_new * (v * ga + gb) + jnp.where(k_is_max, pending, 0.0)
    gw = gw + e_new * (v * ha + hb) + jnp.where(k_is_max, 0.0, pending)
    pending = jnp.where(k_is_max, 0.0, pending)
    ha, hb = e_old * (ha + ga), e_old * (hb + gb)
    ga, gb = e_old * ga + add_a, e_old * gb + add_b
    return (dk, dv), (ga, gb, ha, hb, pending, gw)


def _reset_carry(reset, carry):
    """The forward carry (a, b, anchor, n) entering a token: the empty state where `reset` ([rows, 1, 1]
    fp32, 1 = reset) is set."""
    if reset is None:
        return carry
    r = reset > 0.5
    a, b, anchor, n = carry
    return jnp.where(r, 0.0, a), jnp.where(r, 0.0, b), jnp.where(r, EMPTY_EXPONENT, anchor), jnp.where(r, 0.0, n)


def _keep_valid(valid, new, old):
    if valid is None:
        return new
    return jax.tree.map(lambda x, y: jnp.where(valid, x, y), new, old)


# ------------------------------------------------------------------ the rows of a chunk: tokens [bb, 1, bc]
#
# TPU: a chunk moves as one [bb, CHUNK, bc] value (one bf16 tile per 128 lanes), a row is a static sublane
# slice, and per-token values the backward keeps are packed back into such values (few vregs, no spills).
# GPU: Triton cannot index a value (picking a row out of a block costs a masked sum over the block), so
# each row is loaded from and stored to the ref at its own dynamic offset (a pointer plus t * C), and a
# chunk is a Python list of CHUNK row values (registers): O(1) work per token. The list is unrolled, so
# the chunk's loads are issued together and their latency is paid once per chunk.

def _row_ids(shape):
    return jax.lax.broadcasted_iota(jnp.int32, shape, 1)


def _load_chunk(cfg, ref, t0):
    """The CHUNK tokens of `ref` (a [bb, T, bc] block) starting at t0, in fp32."""
    if cfg.backend == "tpu":
        return ref[:, pl.ds(t0, CHUNK), :].astype(jnp.float32)
    return [ref[:, pl.ds(t0 + j, 1), :].astype(jnp.float32) for j in range(CHUNK)]


def _store_chunk(cfg, ref, t0, x):
    if cfg.backend == "tpu":
        ref[:, pl.ds(t0, CHUNK), :] = x.astype(ref.dtype)
    else:
        for j, row in enumerate(x):
            ref[:, pl.ds(t0 + j, 1), :] = row.astype(ref.dtype)


def _empty_chunk(cfg, row_shape):
    bb, _, bc = row_shape
    return jnp.zeros((bb, CHUNK, bc), jnp.float32) if cfg.backend == "tpu" else [None] * CHUNK


def _get_row(x, j):
    """Row j (static) of a chunk as [bb, 1, bc]."""
    return x[j] if isinstance(x, list) else x[:, j:j + 1, :]


def _put_row(x, j, row):
    if isinstance(x, list):
        return [*x[:j], row, *x[j + 1:]]
    return jnp.where(_row_ids(x.shape) == j, row, x)


def _add_row(x, j, row):
    if isinstance(x, list):
        return _put_row(x, j, x[j] + row)
    return x + jnp.where(_row_ids(x.shape) == j, row, 0.0)


# --------------------------------------------------------------------------------- block bodies (shared)

def _forward_chunks(cfg, w, u, k_ref, v_ref, y_ref, ck_refs, n_chunks, t_start, carry, reset_ref=None):
    """Run `n_chunks` chunks of the refs' T axis (the block's tokens start at global index t_start),
    writing y and the state at each chunk start into ck_refs[chunk] (before that token's reset). On GPU
    the rows of chunk ci + 1 are loaded while chunk ci computes (carried in registers), so the loop waits
    on no load latency."""
    prefetch = cfg.backend == "gpu"
    refs = (k_ref, v_ref) if reset_ref is None else (k_ref, v_ref, reset_ref)
    load = lambda t0: tuple(_load_chunk(cfg, ref, t0) for ref in refs)

    def chunk(ci, carry_and_rows):
        carry, rows = carry_and_rows
        t0 = pl.multiple_of(ci * CHUNK, CHUNK)
        if prefetch:
            (k_c, v_c, *r_c), rows = rows, load(pl.multiple_of(jnp.minimum(ci + 1, n_chunks - 1) * CHUNK, CHUNK))
        else:
            k_c, v_c, *r_c = load(t0)
        for ref, value in zip(ck_refs, carry):  # (a, b, anchor, n): the backward resumes bit for bit
            ref[ci] = value
        y_c = _empty_chunk(cfg, carry[0].shape)
        for j in range(CHUNK):
            valid = (t_start + t0 + j < cfg.t_valid) if cfg.t_valid % CHUNK else None
            carry = _reset_carry(_get_row(r_c[0], j) if r_c else None, carry)
            y, new, _ = _forward_token(w, u, _get_row(k_c, j), _get_row(v_c, j), carry)
            carry = _keep_valid(valid, new, carry)
            y_c = _put_row(y_c, j, y)
        _store_chunk(cfg, y_ref, t0, y_c)
        return carry, rows
    return jax.lax.fori_loop(0, n_chunks, chunk, (carry, load(0) if prefetch else ()))[0]


def _backward_chunks(cfg, w, u, k_ref, v_ref, gy_ref, ck_refs, dk_ref, dv_ref, n_chunks, t_start, carry,
                     reset_ref=None):
    """The reverse pass over `n_chunks` chunks of the refs' T axis, last chunk first. carry is that of
    `_backward_token` plus the dL/du accumulator."""
    def chunk(r, carry):
        ci = n_chunks - 1 - r
        t0 = pl.multiple_of(ci * CHUNK, CHUNK)
        k_c, v_c, g_c = (_load_chunk(cfg, ref, t0) for ref in (k_ref, v_ref, gy_ref))
        r_c = None if reset_ref is None else _load_chunk(cfg, reset_ref, t0)
        *reverse, gu = carry
        # Recompute the chunk's forward from its checkpoint (the same operations as the forward pass);
        # keep the factors the reverse walk needs, and the token's own (bonus) gradient terms.
        state = tuple(ref[ci] for ref in ck_refs)
        add_a_c = add_b_c = e_old_c = e_new_c = is_max_c = dk_c = dv_c = _empty_chunk(cfg, state[0].shape)
        valids = []
        for j in range(CHUNK):
            valid = (t_start + t0 + j < cfg.t_valid) if cfg.t_valid % CHUNK else None
            valids.append(valid)
            k, v, g = (_get_row(x, j) for x in (k_c, v_c, g_c))
            state = _reset_carry(None if r_c is None else _get_row(r_c, j), state)
            y, state, (den, e_state, e_bonus, e_old, e_new, k_is_max) = _forward_token(w, u, k, v, state)
            alpha = g / den  # dL/d(y's numerator), as a mantissa of e^{-q}
            bonus_k = e_bonus * alpha * (v - y)  # through e^{u+k} v / e^{u+k}: dL/dk_i and dL/du parts
            gu = _keep_valid(valid, gu + bonus_k, gu)
            add_a = e_state * alpha
            add_a_c, add_b_c = _put_row(add_a_c, j, add_a), _put_row(add_b_c, j, -add_a * y)
            e_old_c, e_new_c = _put_row(e_old_c, j, e_old), _put_row(e_new_c, j, e_new)
            is_max_c = _put_row(is_max_c, j, k_is_max.astype(jnp.float32))
            dk_c, dv_c = _put_row(dk_c, j, bonus_k), _put_row(dv_c, j, e_bonus * alpha)
        for j in reversed(range(CHUNK)):
            v, add_a, add_b, e_old, e_new, is_max = (_get_row(x, j) for x in
                                                     (v_c, add_a_c, add_b_c, e_old_c, e_new_c, is_max_c))
            (dk, dv), new = _backward_token(v, add_a, add_b, e_old, e_new, is_max > 0.5, tuple(reverse))
            if r_c is not None:  # the state entering a reset token is the empty state: its cotangent stops
                reset = _get_row(r_c, j) > 0.5
                *new_sums, new_gw = new
                new = (*(jnp.where(reset, 0.0, x) for x in new_sums), new_gw)
            reverse = _keep_valid(valids[j], new, tuple(reverse))
            dk_c, dv_c = _add_row(dk_c, j, dk), _add_row(dv_c, j, dv)
        _store_chunk(cfg, dk_ref, t0, dk_c)
        _store_chunk(cfg, dv_ref, t0, dv_c)
        return (*reverse, gu)
    return jax.lax.fori_loop(0, n_chunks, chunk, carry)


# ------------------------------------------------------------------------------------------------ kernels
#
# Array layouts seen by the kernels (after the wrapper's padding): k, v, y and their gradients [B, T, C];
# states and per-row accumulators [B, 1, C]; w, u [1, 1, C]; checkpoints [T / CHUNK, B, 1, C]. Keeping
# a size-1 axis in front of the channels makes every per-token value a [rows, 1, lanes] slab on both
# backends: no relayout between a state and a row of k.

def _forward_kernel(cfg, n_chunks, w_ref, u_ref, k_ref, v_ref, a0_ref, b0_ref, p0_ref, *refs):
    reset_ref, refs = (refs[0], refs[1:]) if cfg.resets else (None, refs)
    (y_ref, a_ref, b_ref, p_ref), ck_refs, scratch = refs[:4], refs[4:8], refs[8:]
    w, u = w_ref[...], u_ref[...]
    if cfg.backend == "tpu":  # T blocks on the last (sequential) grid axis; the state waits in scratch
        t_block = pl.program_id(2)

        @pl.when(t_block == 0)
        def _():
            for ref, value in zip(scratch, (a0_ref[...], b0_ref[...], p0_ref[...])):
                ref[...] = value
            scratch[3][...] = jnp.zeros(scratch[3].shape, jnp.float32)

        carry = tuple(ref[...] for ref in scratch)
        t_start = t_block * (n_chunks * CHUNK)
    else:  # one program walks the whole sequence
        carry = (a0_ref[...], b0_ref[...], p0_ref[...], jnp.zeros(a0_ref.shape, jnp.float32))
        t_start = 0
    carry = _forward_chunks(cfg, w, u, k_ref, v_ref, y_ref, ck_refs, n_chunks, t_start, carry, reset_ref)
    for ref, value in zip(scratch, carry):
        ref[...] = value
    a, b, anchor, n = carry
    a_ref[...], b_ref[...], p_ref[...] = a, b, anchor + n * w


def _backward_kernel(cfg, n_chunks, n_blocks, w_ref, u_ref, k_ref, v_ref, gy_ref, *refs):
    reset_ref, refs = (refs[0], refs[1:]) if cfg.resets else (None, refs)
    ck_refs, (ga_ref, gb_ref, pending_ref, dk_ref, dv_ref), outs, scratch = refs[:4], refs[4:9], refs[9:16], refs[16:]
    w, u = w_ref[...], u_ref[...]
    zeros = jnp.zeros(ga_ref.shape, jnp.float32)
    initial = (ga_ref[...], gb_ref[...], zeros, zeros, pending_ref[...], zeros, zeros)
    if cfg.backend == "tpu":  # T blocks visited last first (see the index maps)
        t_block = pl.program_id(2)

        @pl.when(t_block == 0)
        def _():
            for ref, value in zip(scratch, initial):
                ref[...] = value

        carry = tuple(ref[...] for ref in scratch)
        t_start = (n_blocks - 1 - t_block) * (n_chunks * CHUNK)
    else:
        carry, t_start = initial, 0
    carry = _backward_chunks(cfg, w, u, k_ref, v_ref, gy_ref, ck_refs, dk_ref, dv_ref, n_chunks, t_start, carry,
                             reset_ref)
    for ref, value in zip(scratch, carry):
        ref[...] = value
    for ref, value in zip(outs, carry):
        ref[...] = value


def _cost(cfg, shape, itemsize, flops, transcendentals, streams):
    """pl.CostEstimate: `streams` [B, T, C] arrays of `itemsize` bytes, plus checkpoints and states."""
    B, T, C = shape
    elements = B * T * C
    small = B * C * 4 * 12 + 4 * (T // CHUNK) * B * C * 4
    return pl.CostEstimate(flops=int(flops * elements), transcendentals=int(transcendentals * elements),
                           bytes_accessed=int(streams * elements * itemsize + small))


def _specs(cfg, shape, reverse):
    """(grid, BlockSpec makers) for the backend: big [B,T,C] blocks, states [B,1,C], w/u [1,1,C],
    checkpoints [n, B, 1, C]."""
    B, T, C = shape
    bb, bc, bt = cfg.block_b, cfg.block_c, cfg.block_t
    if cfg.backend == "tpu":
        nt = T // bt
        tb = (lambda it: nt - 1 - it) if reverse else (lambda it: it)
        grid = (B // bb, C // bc, nt)
        big = pl.BlockSpec((bb, bt, bc), lambda ib, ic, it: (ib, tb(it), ic))
        state = pl.BlockSpec((bb, 1, bc), lambda ib, ic, it: (ib, 0, ic))
        channel = pl.BlockSpec((1, 1, bc), lambda ib, ic, it: (0, 0, ic))
        ckpt = pl.BlockSpec((bt // CHUNK, bb, 1, bc), lambda ib, ic, it: (tb(it), ib, 0, ic))
        return grid, big, state, channel, ckpt, bt // CHUNK, nt
    grid = (B, C // bc)
    big = pl.BlockSpec((1, T, bc), lambda ib, ic: (ib, 0, ic))
    state = pl.BlockSpec((1, 1, bc), lambda ib, ic: (ib, 0, ic))
    channel = pl.BlockSpec((1, 1, bc), lambda ib, ic: (0, 0, ic))
    ckpt = pl.BlockSpec((T // CHUNK, 1, 1, bc), lambda ib, ic: (0, ib, 0, ic))
    return grid, big, state, channel, ckpt, T // CHUNK, 1


def _reset_spec(cfg, shape, reverse):
    """BlockSpec of the [B, T, 1] reset mask: the big blocks' rows and tokens, the one lane."""
    B, T, C = shape
    if cfg.backend == "tpu":
        nt = T // cfg.block_t
        tb = (lambda it: nt - 1 - it) if reverse else (lambda it: it)
        return pl.BlockSpec((cfg.block_b, cfg.block_t, 1), lambda ib, ic, it: (ib, tb(it), 0))
    return pl.BlockSpec((1, T, 1), lambda ib, ic: (ib, 0, 0))


def _compiler_params(cfg):
    if cfg.interpret:
        return None
    if cfg.backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1)


def _scratch(cfg, count):
    if cfg.backend != "tpu":
        return ()
    from jax.experimental.pallas import tpu as pltpu
    return [pltpu.VMEM((cfg.block_b, 1, cfg.block_c), jnp.float32)] * count


def _forward_call(cfg, w, u, k, v, a0, b0, p0, resets=()):
    shape = k.shape
    B, T, C = shape
    grid, big, state, channel, ckpt, n_chunks, _ = _specs(cfg, shape, reverse=False)
    f32 = lambda s: jax.ShapeDtypeStruct(s, jnp.float32)
    out_shape = (jax.ShapeDtypeStruct(shape, v.dtype), *[f32((B, 1, C))] * 3, *[f32((T // CHUNK, B, 1, C))] * 4)
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg, n_chunks), out_shape=out_shape, grid=grid,
        in_specs=[channel, channel, big, big, state, state, state, *[_reset_spec(cfg, shape, False)] * len(resets)],
        out_specs=(big, state, state, state, *[ckpt] * 4), scratch_shapes=_scratch(cfg, 4),
        compiler_params=_compiler_params(cfg), interpret=cfg.interpret, name="wkv_forward",
        cost_estimate=_cost(cfg, shape, k.dtype.itemsize, flops=26, transcendentals=4, streams=3),
    )(w, u, k, v, a0, b0, p0, *resets)


def _backward_call(cfg, w, u, k, v, gy, checkpoints, ga, gb, pending, resets=()):
    shape = k.shape
    B, T, C = shape
    grid, big, state, channel, ckpt, n_chunks, n_blocks = _specs(cfg, shape, reverse=True)
    out_shape = (jax.ShapeDtypeStruct(shape, k.dtype), jax.ShapeDtypeStruct(shape, v.dtype),
                 *[jax.ShapeDtypeStruct((B, 1, C), jnp.float32)] * 7)
    return pl.pallas_call(
        functools.partial(_backward_kernel, cfg, n_chunks, n_blocks), out_shape=out_shape, grid=grid,
        in_specs=[channel, channel, big, big, big, *[_reset_spec(cfg, shape, True)] * len(resets), *[ckpt] * 4,
                  state, state, state],
        out_specs=(big, big, *[state] * 7), scratch_shapes=_scratch(cfg, 7),
        compiler_params=_compiler_params(cfg), interpret=cfg.interpret, name="wkv_backward",
        cost_estimate=_cost(cfg, shape, k.dtype.itemsize, flops=70, transcendentals=4, streams=5),
    )(w, u, k, v, gy, *resets, *checkpoints, ga, gb, pending)


# ------------------------------------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _wkv_padded(cfg, w, u, k, v, a0, b0, p0, resets):
    """`resets`: () or (the [B, T, 1] fp32 reset mask,)."""
    y, a, b, p, *_ = _forward_call(cfg, w, u, k, v, a0, b0, p0, resets)
    return y, a, b, p


def _wkv_padded_fwd(cfg, w, u, k, v, a0, b0, p0, resets):
    y, a, b, p, *checkpoints = _forward_call(cfg, w, u, k, v, a0, b0, p0, resets)
    return (y, a, b, p), (w, u, k, v, a0, b0, checkpoints, a, b, resets)


def _wkv_padded_bwd(cfg, residuals, cotangents):
    w, u, k, v, a0, b0, checkpoints, a_T, b_T, resets = residuals
    gy, ga_T, gb_T, gp_T = cotangents
    # a_T = A_T e^{-p_T}, b_T = B_T e^{-p_T}: the cotangent of p_T as a free variable, for its anchor.
    pending = gp_T - ga_T * a_T - gb_T * b_T
    dk, dv, ga, gb, ha, hb, pending, gw, gu = _backward_call(cfg, w, u, k, v, gy, checkpoints, ga_T, gb_T, pending,
                                                             resets)
    # The initial state is token -1 with k = p0; the reverse sums come back as mantissas of e^{-p0}.
    dp0 = a0 * ga + b0 * gb + pending
    dw = (gw + a0 * ha + b0 * hb).sum(axis=0, keepdims=True)
    du = gu.sum(axis=0, keepdims=True)
    return dw, du, dk, dv, ga, gb, dp0, tuple(jnp.zeros_like(r) for r in resets)


_wkv_padded.defvjp(_wkv_padded_fwd, _wkv_padded_bwd)


# ---------------------------------------------------------------------------------------------- wrappers

def default_backend() -> str:
    """'gpu' on CUDA/ROCm, else 'tpu' (also the kernel that interpret mode runs on CPU)."""
    return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "tpu"


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, max(min(n, limit), 1) + 1) if n % d == 0)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def wkv_pallas(time_decay, time_first, k_BTC, v_BTC, state: WKVState | None = None, *,
               backend: str | None = None, interpret: bool | None = None, block_b: int = 8,
               block_c: int | None = None, block_t: int = 128, num_warps: int = 1, reset_BT=None,
               reset_state: WKVState | None = None):
    """WKV over a sequence as Pallas kernels. Returns y [B, T, C] (v's dtype) and the final state (fp32).
    `reset_BT` (bool [B, T]): document resets to the empty state (`reset_state` must be None here).

    backend: 'tpu' (Mosaic) or 'gpu' (Triton); default from jax.default_backend(). interpret: run the
    kernel in the Pallas interpreter (default: on CPU). Blocks: block_b batch rows (TPU; GPU programs take
    one row), block_c channels (TPU default 256, a multiple of 128; GPU default 64, a power of 2),
    block_t tokens per TPU grid step (a multiple of 16). C is padded to a multiple of 128 and T to a
    multiple of 16 when needed (a copy: keep C % 128 == 0 and T % 16 == 0 on hot paths).
    """
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown Pallas backend {backend!r}: choose one of {BACKENDS}")
    if interpret is None:
        interpret = jax.default_backend() not in ("tpu", "gpu", "cuda", "rocm")
    B, T, C = k_BTC.shape
    if any(x.dtype == jnp.float64 for x in (time_decay, time_first, k_BTC, v_BTC)):
        raise ValueError("wkv_pallas computes in fp32; for float64 inputs use form='sequential' or 'parallel'")
    if reset_state is not None:
        raise NotImplementedError("the Pallas WKV kernel resets to the empty state only: for another reset_state "
                                  "use wkv_form='sequential', 'parallel' or 'chunked'")
    if reset_BT is not None and jnp.shape(reset_BT) != (B, T):
        raise ValueError(f"reset_BT must be [batch, time] = {(B, T)} like k's first two axes, got shape "
                         f"{jnp.shape(reset_BT)}")
    if state is None:
        state = empty_state(B, C)
    state = WKVState(*(jnp.asarray(s, jnp.float32) for s in state))
    if T == 0:
        return v_BTC, state
    Tp, Cp = _round_up(T, CHUNK), _round_up(C, LANES)
    if backend == "tpu":
        block_c = 256 if block_c is None else block_c
        if block_c % LANES or block_t % CHUNK:
            raise ValueError(f"TPU blocks: block_c={block_c} must be a multiple of {LANES} and "
                             f"block_t={block_t} of {CHUNK}")
        bb = _largest_divisor(B, block_b)
        bc = LANES * _largest_divisor(Cp // LANES, block_c // LANES)
        bt = CHUNK * _largest_divisor(Tp // CHUNK, block_t // CHUNK)
    else:
        block_c = 32 if block_c is None else block_c
        if block_c & (block_c - 1) or block_c > LANES:
            raise ValueError(f"GPU blocks: block_c={block_c} must be a power of 2 up to {LANES}")
        bb, bc, bt = 1, block_c, Tp
    cfg = _Config(backend, bool(interpret), bb, bc, bt, T, num_warps, resets=reset_BT is not None)

    pad_btc = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T), (0, Cp - C)))
    pad_c = lambda x, value: jnp.pad(x, ((0, 0), (0, Cp - C)), constant_values=value)[:, None, :]
    w = pad_c(-jnp.exp(time_decay.astype(jnp.float32))[None], -1.0)
    u = pad_c(time_first.astype(jnp.float32)[None], 0.0)
    resets = ()  # the mask as fp32 [B, Tp, 1]: padding tokens do not reset
    if reset_BT is not None:
        resets = (jnp.pad(jnp.asarray(reset_BT, jnp.float32), ((0, 0), (0, Tp - T)))[:, :, None],)
    y, a, b, p = _wkv_padded(cfg, w, u, pad_btc(k_BTC), pad_btc(v_BTC), pad_c(state.a, 0.0), pad_c(state.b, 0.0),
                             pad_c(state.p, EMPTY_EXPONENT), resets)
    return y[:, :T, :C], WKVState(a[:, 0, :C], b[:, 0, :C], p[:, 0, :C])


def state_specs(mesh, shape_BTC):
    """PartitionSpecs (k/v/y, per-channel params, state) of the WKV inputs on `mesh`: batch over
    data x fsdp, channels over tensor, as the project's sharding rules place the activations."""
    from jax.sharding import PartitionSpec as P

    from rwkv_jax.train import sharding
    spec = sharding.spec_for(("batch", "seq", "attn"), shape_BTC, mesh)
    return spec, P(spec[2]), P(spec[0], spec[2])


def wkv_pallas_sharded(mesh, time_decay, time_first, k_BTC, v_BTC, state: WKVState | None = None, *,
                       reset_BT=None, **kwargs):
    """`wkv_pallas` on a device mesh: each device runs the kernel on its batch rows x channels inside
    `shard_map` (XLA cannot partition a Mosaic/Triton call). WKV is independent per (row, channel), so
    no communication happens in the forward; in the backward shard_map sums the per-device gradients of
    the replicated time_decay/time_first over the batch axes. A reset mask [B, T] is split by rows."""
    from jax.sharding import PartitionSpec as P
    if state is None:
        state = empty_state(k_BTC.shape[0], k_BTC.shape[2])
    big, channel, rows = state_specs(mesh, k_BTC.shape)
    resets = () if reset_BT is None else (reset_BT,)

    def local(time_decay, time_first, k_BTC, v_BTC, state, *resets):
        return wkv_pallas(time_decay, time_first, k_BTC, v_BTC, state, reset_BT=resets[0] if resets else None,
                          **kwargs)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(channel, channel, big, big, WKVState(rows, rows, rows),
                                                   *[P(big[0], big[1])] * len(resets)),
                       out_specs=(big, WKVState(rows, rows, rows)), check_vma=False)
    return fn(time_decay, time_first, k_BTC, v_BTC, WKVState(*state), *resets)


def wkv_pallas_auto(time_decay, time_first, k_BTC, v_BTC, state: WKVState | None = None, **kwargs):
    """The dispatcher's entry. Under rwkv_jax.train.sharding.activation_sharding(mesh) with more than one
    device: the sharded call, with the kernel variant of the mesh's devices (so an ahead-of-time compile
    for a TPU topology from a CPU host gets the Mosaic kernel); otherwise the plain call."""
    from rwkv_jax.train import sharding
    mesh = sharding.active_mesh()
    if mesh is None or mesh.size == 1:
        return wkv_pallas(time_decay, time_first, k_BTC, v_BTC, state, **kwargs)
    platform = mesh.devices.flat[0].platform
    kwargs.setdefault("backend", "gpu" if platform in ("gpu", "cuda", "rocm") else "tpu")
    kwargs.setdefault("interpret", platform not in ("tpu", "gpu", "cuda", "rocm"))
    return wkv_pallas_sharded(mesh, time_decay, time_first, k_BTC, v_BTC, state, **kwargs)
