"""The WKV operator of RWKV-4 as pure functions, in three forms that agree to fp32 precision.

For each channel c, with w = -exp(time_decay) < 0 and u = time_first, the output at step t is

    y_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
        / (sum_{i<t} e^{(t-1-i) w + k_i}     + e^{u + k_t}).

The running sums are kept as a state (a, b, p) of fp32 vectors [B, C]: the numerator is a * e^p and
the denominator b * e^p, where p is the running maximum exponent. Every exponential is taken of a
difference to the current maximum, so nothing overflows however large k or the sequence length get.
An empty state has a = b = 0 and p = EMPTY_EXPONENT, a large finite negative number: -inf would turn
`p - max(p, x)` into NaN in gradients.

Forms (all take an initial state and return the final state, so a sequence can be split anywhere and
gradients flow into the state):
  * `wkv_sequential`: the recurrence as a loop over T with a hand-written backward (`jax.custom_vjp`);
                      O(T) work, the fastest form on CPU and the default there.
  * `wkv_parallel`:   a `lax.associative_scan` over (a, b, p, length) elements; O(log T) depth.
  * `wkv_chunked`:    blocks of `chunk_len` tokens computed densely ([L, L] pairs per channel), with the
                      state carried across blocks by a scan; fused elementwise work for accelerators.
  * `wkv_step`:       one token, for RNN-mode decoding.

All inputs may be bf16; the arithmetic and the state are fp32 (float64 for float64 inputs under
jax_enable_x64) and `y` comes back in v's dtype.

Document resets (every sequence form and the dispatcher): `reset_BT` (bool [B, T]) marks positions where
the state *entering* token t is replaced by `reset_state` (default: the empty state; else [B, C] per row,
e.g. a learned initial state broadcast) before token t is processed, so that documents packed in one
window do not see each other. The result equals running each segment on its own from `reset_state`, in
values and in gradients (into `reset_state` from every reset position; none into the state before a
reset). `reset_BT=None` traces exactly the code without resets.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.ops.wkv4_state import EMPTY_EXPONENT, WKVState, empty_state  # noqa: F401 (part of this API)

FORMS: tuple[str, ...] = ("sequential", "parallel", "chunked")  # the pure-JAX forms of this module
KERNEL_FORMS: tuple[str, ...] = ("pallas",)  # rwkv_jax/ops/wkv4_pallas.py, imported when chosen


def default_form(backend: str | None = None, inference: bool = False) -> str:
    """The WKV form that 'auto' picks on a backend ('cpu', 'gpu', 'tpu'; None: the current one), for
    training or, with `inference`, for a model loaded to run without gradients: the same choice here.

    CPU: the recurrence with its hand-written backward, the fastest form in `benchmarks/wkv.py` (2-core
    CPU, B=8 T=1024 C=768 fp32: see README). TPU and GPU: the Pallas kernels (rwkv_jax/ops/wkv4_pallas.py),
    which read k and v once and write y once, where the associative scan makes about log2(T) passes.
    """
    backend = backend or jax.default_backend()
    return "sequential" if backend == "cpu" else "pallas"


def _prepare(time_decay, time_first, k_BTC, v_BTC, state):
    """Copies of the inputs in the compute dtype (fp32, or float64 for float64 inputs), w = -exp(time_decay),
    and an empty state where none was given."""
    dtype = jnp.promote_types(jnp.float32, v_BTC.dtype)
    w_C = -jnp.exp(time_decay.astype(dtype))
    u_C = time_first.astype(dtype)
    if state is None:
        state = empty_state(k_BTC.shape[0], k_BTC.shape[-1], dtype)
    state = WKVState(*(s.astype(dtype) for s in state))
    return w_C, u_C, k_BTC.astype(dtype), v_BTC.astype(dtype), state


def _prepare_resets(reset_BT, reset_state, k_BTC, dtype):
    """(reset_BT as bool [B, T, 1], the reset state in the compute dtype: empty where none was given), or
    None without resets. ValueError for a mask of the wrong shape."""
    if reset_BT is None:
        if reset_state is not None:
            raise ValueError("reset_state was given without reset_BT: pass the positions to reset at")
        return None
    B, T, C = k_BTC.shape
    if jnp.shape(reset_BT) != (B, T):
        raise ValueError(f"reset_BT must be [batch, time] = {(B, T)} like k's first two axes, got shape "
                         f"{jnp.shape(reset_BT)}")
    if reset_state is None:
        reset_state = empty_state(B, C, dtype)
    reset_state = WKVState(*(jnp.broadcast_to(jnp.asarray(s, dtype), (B, C)) for s in reset_state))
    return jnp.asarray(reset_BT, bool)[:, :, None], reset_state


def _mix(p1, a1, b1, p2, a2, b2):
    """Sum two log-scaled terms e^p1 (a1, b1) + e^p2 (a2, b2) as e^q (a, b) with q = max(p1, p2)."""
    q = jnp.maximum(p1, p2)
    e1, e2 = jnp.exp(p1 - q), jnp.exp(p2 - q)
    return q, e1 * a1 + e2 * a2, e1 * b1 + e2 * b2


def _output(state: WKVState, u_plus_k, v):
    """y for one token: the state before it plus the token's own term with the time_first bonus."""
    _, num, den = _mix(state.p, state.a, state.b, u_plus_k, v, jnp.ones_like(v))
    return num / den


def _step(w_C, u_C, k_BC, v_BC, a, b, anchor, n):
    """One token of the recurrence from the state (a, b, p = anchor + n w) before it.

    Returns y, p and the next (a, b, anchor, n). Each sum of two log-scaled terms takes one exp: the larger
    term has weight e^0 = 1 and the other e^-|difference| (ties count k as the larger, as in `_mix`).
    """
    p = anchor + n * w_C
    bonus = u_C + k_BC - p                      # the token's own exponent (with time_first) over the state's
    e = jnp.exp(-jnp.abs(bonus))
    bonus_is_max = bonus > 0
    e_state, e_token = jnp.where(bonus_is_max, e, 1), jnp.where(bonus_is_max, 1, e)
    y = (e_state * a + e_token * v_BC) / (e_state * b + e_token)
    decayed = anchor + (n + 1) * w_C            # the state's exponent one decay step on, read from the anchor
    k_is_max = k_BC >= decayed
    f = jnp.exp(-jnp.abs(k_BC - decayed))
    a = jnp.where(k_is_max, f * a + v_BC, a + f * v_BC)
    b = jnp.where(k_is_max, f * b + 1, b + f)
    return y, p, (a, b, jnp.where(k_is_max, k_BC, anchor), jnp.where(k_is_max, 0, n + 1))


def wkv_step(time_decay, time_first, k_BC, v_BC, state: WKVState):
    """One token in RNN mode: returns y [B, C] (v's dtype) and the next state."""
    w_C, u_C, k_BC, v_f32, state = _prepare(time_decay, time_first, k_BC, v_BC, state)
    y_BC, _, (a, b, anchor, n) = _step(w_C, u_C, k_BC, v_f32, state.a, state.b, state.p, jnp.zeros_like(state.p))
    return y_BC.astype(v_BC.dtype), WKVState(a, b, anchor + n * w_C)


def _at(x_BTC, t):
    return jax.lax.dynamic_index_in_dim(x_BTC, t, axis=1, keepdims=False)


def _put(x_BTC, t, value_BC):
    return jax.lax.dynamic_update_index_in_dim(x_BTC, value_BC, t, axis=1)


def _loop(start, length, body, carry, unroll):
    """`body(t, carry)` for t = start .. start + length - 1 (start may be traced, length is static)."""
    return jax.lax.fori_loop(0, length, lambda j, carry: body(start + j, carry), carry,
                             unroll=max(1, min(unroll, length)))


def _reset_at(resets, t, state):
    """The carry (a, b, anchor, n) entering token t, the reset state where `resets` (the reset mask
    [B, T, 1], a, b, p of the reset state, ...) marks t; unchanged without resets."""
    if not resets:
        return state
    reset_BT1, ra, rb, rp = resets[:4]
    r = _at(reset_BT1, t)
    a, b, anchor, n = state
    return jnp.where(r, ra, a), jnp.where(r, rb, b), jnp.where(r, rp, anchor), jnp.where(r, 0, n)


def _recurrence(w_C, u_C, k_BTC, v_BTC, state, unroll, checkpoint_every=None, resets=()):
    """The forward loop from state (a, b, anchor, n). Returns y [B, T, C], the final (a, b, anchor, n) and,
    given `checkpoint_every` = L, the state before tokens 0, L, 2L, ... stacked ([ceil(T/L), B, C] each;
    taken before the reset of the span's first token, which the backward's recomputation applies again).

    The loop reads token t out of [B, T, C] in place (B rows of C contiguous values): on CPU this measured
    faster than a `lax.scan` over time-major copies, whose transposes in and out cost as much as the loop.
    """
    T = k_BTC.shape[1]
    span = checkpoint_every or T
    n_full, tail = divmod(T, span)  # full spans, then a shorter one

    def token(t, carry):
        state, y = carry
        y_t, _, state = _step(w_C, u_C, _at(k_BTC, t), _at(v_BTC, t), *_reset_at(resets, t, state))
        return state, _put(y, t, y_t)

    def run_span(index, length, carry):
        state, y, kept = carry
        if checkpoint_every:
            kept = tuple(jax.lax.dynamic_update_index_in_dim(x, s, index, 0) for x, s in zip(kept, state))
        state, y = _loop(index * span, length, token, (state, y), unroll)
        return state, y, kept

    kept = tuple(jnp.zeros((n_full + (tail > 0),) + s.shape, s.dtype) for s in state) if checkpoint_every else ()
    carry = (state, jnp.zeros_like(k_BTC), kept)
    carry = jax.lax.fori_loop(0, n_full, lambda i, carry: run_span(i, span, carry), carry)
    if tail:
        carry = run_span(n_full, tail, carry)
    state, y, kept = carry
    return y, state, kept


# Tokens between the states the forward keeps for the backward, which recomputes the states in between,
# a span at a time, into buffers that stay in cache. Keeping every state instead costs three arrays the
# size of k written and read back: measured slower on CPU (memory traffic, page faults of fresh buffers).
CHECKPOINT_EVERY = 32


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _sequential(w_C, u_C, k_BTC, v_BTC, a0, b0, p0, resets, unroll):
    """`resets`: () without resets, else (mask [B, T, 1], reset a, b, p [B, C], last reset position [B, 1]
    int32, -1 for none)."""
    y, (a, b, anchor, n), _ = _recurrence(w_C, u_C, k_BTC, v_BTC, (a0, b0, p0, jnp.zeros_like(p0)), unroll,
                                          resets=resets)
    return y, (a, b, anchor + n * w_C)


def _sequential_fwd(w_C, u_C, k_BTC, v_BTC, a0, b0, p0, resets, unroll):
    y, (a, b, anchor, n), kept = _recurrence(w_C, u_C, k_BTC, v_BTC, (a0, b0, p0, jnp.zeros_like(p0)), unroll,
                                             checkpoint_every=CHECKPOINT_EVERY, resets=resets)
    return (y, (a, b, anchor + n * w_C)), (w_C, u_C, k_BTC, v_BTC, kept, (a0, b0), (a, b, n), resets)


def _sequential_bwd(unroll, residuals, cotangents):
    """The reverse recurrence of `wkv_sequential`'s docstring, token T-1 down to 0, one span of
    CHECKPOINT_EVERY tokens at a time: recompute the span's states from its checkpoint, then go back.

    With resets, the adjoints (alpha, beta) of the state entering a reset position t go to the reset state
    (dL/da, dL/db, and alpha a + beta b to its p) and the state before t gets none. The final exponent's
    anchor is the reset state's p when the last reset r came after every token that set it (n_T = T - r);
    tokens before r never anchor it."""
    w_C, u_C, k_BTC, v_BTC, kept, (a0, b0), (a_end, b_end, n_end), resets = residuals
    g_BTC, (g_a, g_b, g_p) = cotangents
    B, T, C = k_BTC.shape
    span = CHECKPOINT_EVERY
    n_full, tail = divmod(T, span)
    # The final exponent's cotangent net of its effect on a_T = N_T e^-p_T and b_T = D_T e^-p_T.
    g_p_end = g_p - g_a * a_end - g_b * b_end

    def back(t, state_t, carry):
        alpha, beta, g_w, g_u, g_k, g_v, *g_reset = carry
        a, b, p = state_t
        k, v, g = _at(k_BTC, t), _at(v_BTC, t), _at(g_BTC, t)
        bonus = u_C + k - p                     # the forward's output weights, recomputed
        e = jnp.exp(-jnp.abs(bonus))
        bonus_is_max = bonus > 0
        e_state, e_token = jnp.where(bonus_is_max, e, 1), jnp.where(bonus_is_max, 1, e)
        inv_zeta = 1 / (e_state * b + e_token)
        y = (e_state * a + e_token * v) * inv_zeta
        q = g * inv_zeta
        g_k_t = q * e_token * (v - y)
        g_u = g_u + g_k_t
        decayed = p + w_C                       # the forward's update weights
        k_is_max = k >= decayed
        f = jnp.exp(-jnp.abs(k - decayed))
        f_state, f_token = jnp.where(k_is_max, f, 1), jnp.where(k_is_max, 1, f)
        # p_T's cotangent into its anchor when that is k_t (n_T = T-1-t).
        anchors_here = n_end == (T - 1 - t).astype(n_end.dtype)
        if resets:
            anchors_here = anchors_here & (t >= resets[4])
        g_k_t = g_k_t + f_token * (alpha * v + beta) + jnp.where(anchors_here, g_p_end, 0)
        g_v_t = q * e_token + f_token * alpha
        g_w = g_w + f_state * (alpha * a + beta * b)
        alpha, beta = q * e_state + f_state * alpha, f_state * beta - q * e_state * y
        if resets:  # the state entering t was the reset state: its adjoints go there, none before
            r = _at(resets[0], t)
            g_ra, g_rb, g_rp = g_reset
            anchors_reset = r & (n_end == (T - t).astype(n_end.dtype))
            g_ra, g_rb = g_ra + jnp.where(r, alpha, 0), g_rb + jnp.where(r, beta, 0)
            g_rp = g_rp + jnp.where(r, alpha * a + beta * b, 0) + jnp.where(anchors_reset, g_p_end, 0)
            alpha, beta = jnp.where(r, 0, alpha), jnp.where(r, 0, beta)
            g_reset = (g_ra, g_rb, g_rp)
        return (alpha, beta, g_w, g_u, _put(g_k, t, g_k_t), _put(g_v, t, g_v_t), *g_reset)

    def back_span(index, length, carry):
        start = index * span
        state = tuple(jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False) for x in kept)

        def forward(t, forward_carry):          # the states before each token of the span, [length, B, C]
            state, states = forward_carry
            state = _reset_at(resets, t, state)
            _, p, next_state = _step(w_C, u_C, _at(k_BTC, t), _at(v_BTC, t), *state)
            states = tuple(jax.lax.dynamic_update_index_in_dim(x, s, t - start, 0)
                           for x, s in zip(states, (state[0], state[1], p)))
            return next_state, states

        states = tuple(jnp.zeros((length, B, C), k_BTC.dtype) for _ in range(3))
        _, states = _loop(start, length, forward, (state, states), unroll)

        def backward(i, carry):
            j = length - 1 - i
            return back(start + j, tuple(jax.lax.dynamic_index_in_dim(x, j, 0, keepdims=False) for x in states),
                        carry)
        return _loop(0, length, backward, carry, unroll)

    zeros_BC = jnp.zeros_like(g_a)
    carry = (g_a, g_b, zeros_BC, zeros_BC, jnp.zeros_like(k_BTC), jnp.zeros_like(v_BTC))
    if resets:
        carry += (zeros_BC,) * 3
    if tail:
        carry = back_span(n_full, tail, carry)
    carry = jax.lax.fori_loop(0, n_full, lambda i, carry: back_span(n_full - 1 - i, span, carry), carry)
    alpha, beta, g_w, g_u, g_k, g_v, *g_reset = carry
    p0_anchors = n_end == T                                              # p_T = p_0 + T w: anchor p_0
    if resets:
        p0_anchors = p0_anchors & (resets[4] < 0)
    g_p0 = alpha * a0 + beta * b0 + jnp.where(p0_anchors, g_p_end, 0)
    g_w = g_w + n_end * g_p_end                                          # p_T = anchor + n w
    g_resets = ()
    if resets:  # no cotangent for the mask and the last-reset index (integers and bools: float0)
        float0 = lambda x: np.zeros(x.shape, jax.dtypes.float0)
        g_resets = (float0(resets[0]), *g_reset, float0(resets[4]))
    return g_w.sum(0), g_u.sum(0), g_k, g_v, alpha, beta, g_p0, g_resets


_sequential.defvjp(_sequential_fwd, _sequential_bwd)


def wkv_sequential(time_decay, time_first, k_BTC, v_BTC, state: WKVState | None = None, *, unroll: int = 2,
                   reset_BT=None, reset_state: WKVState | None = None):
    """The recurrence, one token per loop step, with a hand-written backward. Returns y [B, T, C] and the
    final state. `unroll` tokens go into one loop iteration (benchmarks/wkv.py compares the choices; the
    default was the fastest on a 2-core CPU). `reset_BT`, `reset_state`: document resets (module
    docstring; the backward's handling of them is in `_sequential_bwd`).

    The exponent is carried as an anchor plus a count of decay steps since it was set (p = anchor + n w),
    so it is rounded once per read instead of accumulating one rounding of `p + w` per token; with a tiny
    |w| over thousands of tokens that accumulation is visible in fp32 (the official kernel has it).

    Backward (a `jax.custom_vjp`; autodiff through the loop would store and reload every intermediate of
    every step). Write N_t = a_t e^{p_t}, D_t = b_t e^{p_t} for the sums before token t, E_t = e^{u + k_t}
    and Z_t = D_t + E_t, so that

        y_t = (N_t + E_t v_t) / Z_t,   N_{t+1} = e^w N_t + e^{k_t} v_t,   D_{t+1} = e^w D_t + e^{k_t}.

    For a loss L with g_t = dL/dy_t, the adjoints dL/dN_t and dL/dD_t run backwards as
    dL/dN_t = g_t / Z_t + e^w dL/dN_{t+1} and dL/dD_t = -g_t y_t / Z_t + e^w dL/dD_{t+1}. They scale like
    e^{-p_t}, so they are carried as alpha_t = e^{p_t} dL/dN_t and beta_t = e^{p_t} dL/dD_t (= dL/da_t and
    dL/db_t at fixed p_t), which stay of the size of g because p_t is the running maximum. With the
    forward's weights, each an exp of a difference to a maximum and so <= 1,

        output: e1 = e^{p_t - P_t}, e2 = e^{u + k_t - P_t}, P_t = max(p_t, u + k_t), zeta_t = e1 b_t + e2
        update: f1 = e^{p_t + w - p_{t+1}}, f2 = e^{k_t - p_{t+1}}

    the backward is, for t = T-1 .. 0 from alpha_T = dL/da_T, beta_T = dL/db_T:

        dL/dk_t = e2 (v_t - y_t) g_t / zeta_t + f2 (alpha_{t+1} v_t + beta_{t+1})
        dL/dv_t = e2 g_t / zeta_t + f2 alpha_{t+1}
        dL/du  += e2 (v_t - y_t) g_t / zeta_t
        dL/dw  += f1 (alpha_{t+1} a_t + beta_{t+1} b_t)          (= e^w (N_t dL/dN_{t+1} + D_t dL/dD_{t+1}))
        alpha_t = e1 g_t / zeta_t + f1 alpha_{t+1},   beta_t = -e1 y_t g_t / zeta_t + f1 beta_{t+1}

    and dL/da_0 = alpha_0, dL/db_0 = beta_0, dL/dp_0 = alpha_0 a_0 + beta_0 b_0 (from N_0 = a_0 e^{p_0}).
    The final state is (N_T e^{-p_T}, D_T e^{-p_T}, p_T) with p_T = anchor + n w; the cotangent of p_T net
    of its effect on a_T and b_T, dL/dp_T - a_T dL/da_T - b_T dL/db_T, goes n times into w and once into
    the anchor: k_{T-1-n}, or p_0 when n = T. The forward keeps the state every CHECKPOINT_EVERY tokens;
    the backward goes through the sequence a span at a time from the end: it recomputes the span's states
    from its checkpoint into a small buffer, then runs the recurrence above back over the span, recomputing
    the weights from the states (two exps per token, as the forward takes). (The official CUDA kernel
    recomputes the forward sums of the whole sequence in a first backward pass and has no gradient into the
    state.) Forward-mode differentiation (jax.jvp) is not defined for this form.
    """
    if unroll < 1:
        raise ValueError(f"unroll must be >= 1, got {unroll}")
    w_C, u_C, k, v, state = _prepare(time_decay, time_first, k_BTC, v_BTC, state)
    resets = _prepare_resets(reset_BT, reset_state, k, k.dtype)
    if k.shape[1] == 0:
        return v_BTC, state
    if resets is not None:
        reset_BT1, reset_state = resets
        positions = jnp.arange(k.shape[1], dtype=jnp.int32)[None, :]
        last_reset_B1 = jnp.max(jnp.where(reset_BT1[:, :, 0], positions, -1), axis=1, keepdims=True)
        resets = (reset_BT1, *reset_state, last_reset_B1)
    y, (a, b, p) = _sequential(w_C, u_C, k, v, *state, resets or (), min(unroll, k.shape[1]))
    return y.astype(v_BTC.dtype), WKVState(a, b, p)


def wkv_parallel(time_decay, time_first, k_BTC, v_BTC, state: WKVState | None = None, *,
                 reset_BT=None, reset_state: WKVState | None = None):
    """`lax.associative_scan` form: prefix sums of decayed terms in O(log T) depth.

    Element t is the one-token sum (a=v_t, b=1, p=k_t, n=1). Joining a left span with a right span of
    n2 tokens decays the left one by n2 steps (p1 + n2 w) and adds; lengths add. This is associative,
    so the scan gives every prefix sum S_t; the initial state joins as a span of length 0.

    Resets make it a segmented scan: element t at a reset position is the reset state joined with token t
    and carries a flag; a flagged right span does not take the left one (the join returns it as it is),
    which keeps the join associative. The state entering a reset position is the reset state.
    """
    w_C, u_C, k, v, state = _prepare(time_decay, time_first, k_BTC, v_BTC, state)
    resets = _prepare_resets(reset_BT, reset_state, k, k.dtype)
    T = k.shape[1]
    if T == 0:
        return v_BTC, state

    def join(left, right):
        (a1, b1, p1, n1, *flag1), (a2, b2, p2, n2, *flag2) = left, right
        p, a, b = _mix(p1 + n2 * w_C, a1, b1, p2, a2, b2)
        if not flag2:
            return a, b, p, n1 + n2
        keep = lambda joined, alone: jnp.where(flag2[0], alone, joined)
        return keep(a, a2), keep(b, b2), keep(p, p2), n1 + n2, flag1[0] | flag2[0]

    ones_1T1 = jnp.ones((1, T, 1), k.dtype)
    elements = (v, jnp.ones_like(v), k, ones_1T1)
    if resets is not None:
        reset_BT1, reset_state = resets
        rp, ra, rb = _mix(reset_state.p[:, None] + w_C, reset_state.a[:, None], reset_state.b[:, None], k, v, 1.0)
        elements = (jnp.where(reset_BT1, ra, v), jnp.where(reset_BT1, rb, 1.0), jnp.where(reset_BT1, rp, k),
                    ones_1T1, reset_BT1)
    a, b, p, n, *flags = jax.lax.associative_scan(join, elements, axis=1)
    initial = (state.a[:, None], state.b[:, None], state.p[:, None], jnp.zeros((1, 1, 1), k.dtype))
    a, b, p, *_ = join(initial + tuple(False for _ in flags), (a, b, p, n, *flags))  # S_t, t = 1..T

    # The state *before* token t: the initial state, then S_1 .. S_{T-1} (the reset state at resets).
    def before(initial_BC, after_BTC):
        return jnp.concatenate([initial_BC[:, None], after_BTC[:, :-1]], axis=1)

    prior = WKVState(before(state.a, a), before(state.b, b), before(state.p, p))
    if resets is not None:
        prior = WKVState(*(jnp.where(reset_BT1, r[:, None], x) for r, x in zip(reset_state, prior)))
    y = _output(prior, u_C + k, v)
    return y.astype(v_BTC.dtype), WKVState(a[:, -1], b[:, -1], p[:, -1])


def _chunk(w_C, u_C, k_BLC, v_BLC, state: WKVState, resets=None):
    """One block of L tokens, all pairs at once. Returns y [B, L, C] and the state after the block.

    resets: None, or (mask [B, L, 1], reset state). Position j after the block's last reset s <= j sees
    only tokens s..j-1 and the reset state decayed j - s steps in place of the incoming state."""
    L = k_BLC.shape[1]
    j = jnp.arange(L, dtype=k_BLC.dtype)
    # Exponent of token i's term in the output at position j (i < j: decayed j-1-i steps; i == j: bonus).
    lag_LL = j[:, None] - 1.0 - j[None, :]
    pairs = (lag_LL >= 0)[None, :, :, None]
    # The state that position j's sums start from, and how many steps it has decayed at j: the incoming
    # state and j, or the reset state at the last reset s <= j and j - s.
    start = (state.a[:, None], state.b[:, None], state.p[:, None])
    steps_BL1 = j[None, :, None]
    if resets is not None:
        reset_BL1, reset_state = resets
        last_BL1 = jax.lax.cummax(jnp.where(reset_BL1, steps_BL1, -1.0), axis=1)  # last reset <= j, or -1
        after_reset = last_BL1 >= 0
        start = tuple(jnp.where(after_reset, r[:, None], x) for r, x in zip(reset_state, start))
        steps_BL1 = jnp.where(after_reset, steps_BL1 - last_BL1, steps_BL1)
        pairs = pairs & (j[None, None, :, None] >= last_BL1[:, :, None])  # token i at or after the reset
    logw_BLLC = jnp.where(pairs, k_BLC[:, None] + lag_LL[None, :, :, None] * w_C, EMPTY_EXPONENT)
    on_diag = jnp.eye(L, dtype=bool)[None, :, :, None]
    logw_BLLC = jnp.where(on_diag, (u_C + k_BLC)[:, :, None], logw_BLLC)
    a_in, b_in, p_in = start
    p_in_BLC = p_in + steps_BL1 * w_C
    q_BLC = jnp.maximum(p_in_BLC, logw_BLLC.max(axis=2))
    e_in = jnp.exp(p_in_BLC - q_BLC)
    e_BLLC = jnp.exp(logw_BLLC - q_BLC[:, :, None])
    num = e_in * a_in + jnp.einsum("bjic,bic->bjc", e_BLLC, v_BLC)
    den = e_in * b_in + e_BLLC.sum(axis=2)
    y_BLC = num / den

    # State after the block: every token decayed L-1-i steps, the incoming state L steps (after a reset:
    # the tokens from the last reset s on, and the reset state L - s steps).
    logw_end_BLC = k_BLC + (L - 1.0 - j)[None, :, None] * w_C
    a_in, b_in, p_in = state
    p_in_end = p_in + L * w_C
    if resets is not None:
        last_B1 = last_BL1[:, -1]
        after_reset = last_B1 >= 0
        a_in, b_in = jnp.where(after_reset, reset_state.a, a_in), jnp.where(after_reset, reset_state.b, b_in)
        p_in_end = jnp.where(after_reset, reset_state.p + (L - last_B1) * w_C, p_in_end)
        logw_end_BLC = jnp.where(j[None, :, None] >= last_B1[:, None], logw_end_BLC, EMPTY_EXPONENT)
    p_end = jnp.maximum(p_in_end, logw_end_BLC.max(axis=1))
    e_in_end = jnp.exp(p_in_end - p_end)
    e_end_BLC = jnp.exp(logw_end_BLC - p_end[:, None])
    a_end = e_in_end * a_in + (e_end_BLC * v_BLC).sum(axis=1)
    b_end = e_in_end * b_in + e_end_BLC.sum(axis=1)
    return y_BLC, WKVState(a_end, b_end, p_end)


def wkv_chunked(time_decay, time_first, k_BTC, v_BTC, state: WKVState | None = None, *, chunk_len: int = 32,
                reset_BT=None, reset_state: WKVState | None = None):
    """Blocks of `chunk_len` tokens computed densely, the state carried across blocks by `lax.scan`.

    T need not be a multiple of chunk_len: the remainder is one shorter block. Memory per block is
    O(B * L^2 * C), so keep chunk_len small (16-64). With resets, a block masks the pairs across a reset
    and starts the positions after it from the reset state (`_chunk`).
    """
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    w_C, u_C, k, v, state = _prepare(time_decay, time_first, k_BTC, v_BTC, state)
    resets = _prepare_resets(reset_BT, reset_state, k, k.dtype)
    B, T, C = k.shape
    if T == 0:
        return v_BTC, state
    streams = (k, v) if resets is None else (k, v, resets[0])
    reset_state = None if resets is None else resets[1]
    chunk = lambda state, k, v, reset=None: _chunk(w_C, u_C, k, v, state,
                                                   None if reset is None else (reset, reset_state))
    n_full = T // chunk_len
    ys = []
    if n_full:
        def to_chunks(x_BTC):  # [B, n*L, C] -> [n, B, L, C]
            return x_BTC[:, :n_full * chunk_len].reshape(B, n_full, chunk_len, x_BTC.shape[2]).swapaxes(0, 1)

        def body(carry, blocks):
            y, carry = chunk(carry, *blocks)
            return carry, y

        state, y_NBLC = jax.lax.scan(body, state, tuple(map(to_chunks, streams)))
        ys.append(y_NBLC.swapaxes(0, 1).reshape(B, n_full * chunk_len, C))
    if T % chunk_len:
        y_tail, state = chunk(state, *(x[:, n_full * chunk_len:] for x in streams))
        ys.append(y_tail)
    y = ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=1)
    return y.astype(v_BTC.dtype), state


def wkv(time_decay, time_first, k_BTC, v_BTC, state: WKVState | None = None, *,
        form: str = "auto", chunk_len: int = 32, reset_BT=None, reset_state: WKVState | None = None):
    """WKV over a sequence in the chosen form ('auto': `default_form()` of the current backend).
    `reset_BT`, `reset_state`: document resets (module docstring)."""
    form = default_form() if form == "auto" else form
    resets = dict(reset_BT=reset_BT, reset_state=reset_state)
    if form == "sequential":
        return wkv_sequential(time_decay, time_first, k_BTC, v_BTC, state, **resets)
    if form == "parallel":
        return wkv_parallel(time_decay, time_first, k_BTC, v_BTC, state, **resets)
    if form == "chunked":
        return wkv_chunked(time_decay, time_first, k_BTC, v_BTC, state, chunk_len=chunk_len, **resets)
    if form == "pallas":  # lazy: Pallas is only imported by runs that use the kernel
        from rwkv_jax.ops import wkv4_pallas
        return wkv4_pallas.wkv_pallas_auto(time_decay, time_first, k_BTC, v_BTC, state, **resets)
    raise ValueError(f"unknown WKV form {form!r}: choose one of {FORMS + KERNEL_FORMS} or 'auto'")
