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
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

# log(0) stand-in for an empty state, as in the official `rwkv` package; finite on purpose (see above).
EMPTY_EXPONENT = -1e30

FORMS: tuple[str, ...] = ("sequential", "parallel", "chunked")  # the pure-JAX forms of this module
KERNEL_FORMS: tuple[str, ...] = ("pallas",)  # rwkv_jax/ops/wkv_pallas.py, imported when chosen


class WKVState(NamedTuple):
    """Running WKV sums of one layer: numerator a*e^p and denominator b*e^p, each [B, C] fp32."""
    a: jax.Array
    b: jax.Array
    p: jax.Array


def empty_state(batch_size: int, channels: int, dtype=jnp.float32) -> WKVState:
    zeros = jnp.zeros((batch_size, channels), dtype)
    return WKVState(zeros, zeros, jnp.full((batch_size, channels), EMPTY_EXPONENT, dtype))


def default_form(backend: str | None = None) -> str:
    """The WKV form that 'auto' picks on a backend ('cpu', 'gpu', 'tpu'; None: the current one).

    CPU: the recurrence with its hand-written backward, the fastest form in `benchmarks/wkv.py` (2-core
    CPU, B=8 T=1024 C=768 fp32: see README). TPU and GPU: the Pallas kernels (rwkv_jax/ops/wkv_pallas.py),
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


def _recurrence(w_C, u_C, k_BTC, v_BTC, state, unroll, checkpoint_every=None):
    """The forward loop from state (a, b, anchor, n). Returns y [B, T, C], the final (a, b, anchor, n) and,
    given `checkpoint_every` = L, the state before tokens 0, L, 2L, ... stacked ([ceil(T/L), B, C] each).

    The loop reads token t out of [B, T, C] in place (B rows of C contiguous values): on CPU this measured
    faster than a `lax.scan` over time-major copies, whose transposes in and out cost as much as the loop.
    """
    T = k_BTC.shape[1]
    span = checkpoint_every or T
    n_full, tail = divmod(T, span)  # full spans, then a shorter one

    def token(t, carry):
        state, y = carry
        y_t, _, state = _step(w_C, u_C, _at(k_BTC, t), _at(v_BTC, t), *state)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _sequential(w_C, u_C, k_BTC, v_BTC, a0, b0, p0, unroll):
    y, (a, b, anchor, n), _ = _recurrence(w_C, u_C, k_BTC, v_BTC, (a0, b0, p0, jnp.zeros_like(p0)), unroll)
    return y, (a, b, anchor + n * w_C)


def _sequential_fwd(w_C, u_C, k_BTC, v_BTC, a0, b0, p0, unroll):
    y, (a, b, anchor, n), kept = _recurrence(w_C, u_C, k_BTC, v_BTC, (a0, b0, p0, jnp.zeros_like(p0)), unroll,
                                             checkpoint_every=CHECKPOINT_EVERY)
    return (y, (a, b, anchor + n * w_C)), (w_C, u_C, k_BTC, v_BTC, kept, (a0, b0), (a, b, n))


def _sequential_bwd(unroll, residuals, cotangents):
    """The reverse recurrence of `wkv_sequential`'s docstring, token T-1 down to 0, one span of
    CHECKPOINT_EVERY tokens at a time: recompute the span's states from its checkpoint, then go back."""
    w_C, u_C, k_BTC, v_BTC, kept, (a0, b0), (a_end, b_end, n_end) = residuals
    g_BTC, (g_a, g_b, g_p) = cotangents
    B, T, C = k_BTC.shape
    span = CHECKPOINT_EVERY
    n_full, tail = divmod(T, span)
    # The final exponent's cotangent net of its effect on a_T = N_T e^-p_T and b_T = D_T e^-p_T.
    g_p_end = g_p - g_a * a_end - g_b * b_end

    def back(t, state_t, carry):
        alpha, beta, g_w, g_u, g_k, g_v = carry
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
        g_k_t = g_k_t + f_token * (alpha * v + beta) + jnp.where(anchors_here, g_p_end, 0)
        g_v_t = q * e_token + f_token * alpha
        g_w = g_w + f_state * (alpha * a + beta * b)
        alpha, beta = q * e_state + f_state * alpha, f_state * beta - q * e_state * y
        return alpha, beta, g_w, g_u, _put(g_k, t, g_k_t), _put(g_v, t, g_v_t)

    def back_span(index, length, carry):
        start = index * span
        state = tuple(jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False) for x in kept)

        def forward(t, forward_carry):          # the states before each token of the span, [length, B, C]
            state, states = forward_carry
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
    if tail:
        carry = back_span(n_full, tail, carry)
    carry = jax.lax.fori_loop(0, n_full, lambda i, carry: back_span(n_full - 1 - i, span, carry), carry)
    alpha, beta, g_w, g_u, g_k, g_v = carry
    g_p0 = alpha * a0 + beta * b0 + jnp.where(n_end == T, g_p_end, 0)  # p_T = p_0 + T w: anchor p_0
    g_w = g_w + n_end * g_p_end                                          # p_T = anchor + n w
    return g_w.sum(0), g_u.sum(0), g_k, g_v, alpha, beta, g_p0


_sequential.defvjp(_sequential_fwd, _sequential_bwd)


def wkv_sequential(time_decay, time_first, k_BTC, v_BTC, state: WKVState | None = None, *, unroll: int = 2):
    """The recurrence, one token per loop step, with a hand-written backward. Returns y [B, T, C] and the
    final state. `unroll` tokens go into one loop iteration (2 measured fastest on a 2-core CPU, 1 and 4
    within 20%, 8 and 16 slower: see benchmarks/wkv.py).

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
    if k.shape[1] == 0:
        return v_BTC, state
    y, (a, b, p) = _sequential(w_C, u_C, k, v, *state, min(unroll, k.shape[1]))
    return y.astype(v_BTC.dtype), WKVState(a, b, p)


def wkv_parallel(time_decay, time_first, k_BTC, v_BTC, state: WKVState | None = None):
    """`lax.associative_scan` form: prefix sums of decayed terms in O(log T) depth.

    Element t is the one-token sum (a=v_t, b=1, p=k_t, n=1). Joining a left span with a right span of
    n2 tokens decays the left one by n2 steps (p1 + n2 w) and adds; lengths add. This is associative,
    so the scan gives every prefix sum S_t; the initial state joins as a span of length 0.
    """
    w_C, u_C, k, v, state = _prepare(time_decay, time_first, k_BTC, v_BTC, state)
    T = k.shape[1]
    if T == 0:
        return v_BTC, state

    def join(left, right):
        (a1, b1, p1, n1), (a2, b2, p2, n2) = left, right
        p, a, b = _mix(p1 + n2 * w_C, a1, b1, p2, a2, b2)
        return a, b, p, n1 + n2

    ones_1T1 = jnp.ones((1, T, 1), k.dtype)
    a, b, p, n = jax.lax.associative_scan(join, (v, jnp.ones_like(v), k, ones_1T1), axis=1)
    initial = (state.a[:, None], state.b[:, None], state.p[:, None], jnp.zeros((1, 1, 1), k.dtype))
    a, b, p, _ = join(initial, (a, b, p, n))  # S_t including the initial state, t = 1..T

    # The state *before* token t: the initial state, then S_1 .. S_{T-1}.
    def before(initial_BC, after_BTC):
        return jnp.concatenate([initial_BC[:, None], after_BTC[:, :-1]], axis=1)

    prior = WKVState(before(state.a, a), before(state.b, b), before(state.p, p))
    y = _output(prior, u_C + k, v)
    return y.astype(v_BTC.dtype), WKVState(a[:, -1], b[:, -1], p[:, -1])


def _chunk(w_C, u_C, k_BLC, v_BLC, state: WKVState):
    """One block of L tokens, all pairs at once. Returns y [B, L, C] and the state after the block."""
    L = k_BLC.shape[1]
    j = jnp.arange(L, dtype=k_BLC.dtype)
    # Exponent of token i's term in the output at position j (i < j: decayed j-1-i steps; i == j: bonus).
    lag_LL = j[:, None] - 1.0 - j[None, :]
    lower_LL = lag_LL >= 0
    logw_BLLC = jnp.where(lower_LL[None, :, :, None], k_BLC[:, None] + lag_LL[None, :, :, None] * w_C,
                          EMPTY_EXPONENT)
    on_diag = jnp.eye(L, dtype=bool)[None, :, :, None]
    logw_BLLC = jnp.where(on_diag, (u_C + k_BLC)[:, :, None], logw_BLLC)
    # Incoming state decayed j steps for position j.
    p_in_BLC = state.p[:, None] + j[None, :, None] * w_C
    q_BLC = jnp.maximum(p_in_BLC, logw_BLLC.max(axis=2))
    e_in = jnp.exp(p_in_BLC - q_BLC)
    e_BLLC = jnp.exp(logw_BLLC - q_BLC[:, :, None])
    num = e_in * state.a[:, None] + jnp.einsum("bjic,bic->bjc", e_BLLC, v_BLC)
    den = e_in * state.b[:, None] + e_BLLC.sum(axis=2)
    y_BLC = num / den

    # State after the block: every token decayed L-1-i steps, the incoming state L steps.
    logw_end_BLC = k_BLC + (L - 1.0 - j)[None, :, None] * w_C
    p_in_end = state.p + L * w_C
    p_end = jnp.maximum(p_in_end, logw_end_BLC.max(axis=1))
    e_in_end = jnp.exp(p_in_end - p_end)
    e_end_BLC = jnp.exp(logw_end_BLC - p_end[:, None])
    a_end = e_in_end * state.a + (e_end_BLC * v_BLC).sum(axis=1)
    b_end = e_in_end * state.b + e_end_BLC.sum(axis=1)
    return y_BLC, WKVState(a_end, b_end, p_end)


def wkv_chunked(time_decay, time_first, k_BTC, v_BTC, state: WKVState | None = None, *, chunk_len: int = 32):
    """Blocks of `chunk_len` tokens computed densely, the state carried across blocks by `lax.scan`.

    T need not be a multiple of chunk_len: the remainder is one shorter block. Memory per block is
    O(B * L^2 * C), so keep chunk_len small (16-64).
    """
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    w_C, u_C, k, v, state = _prepare(time_decay, time_first, k_BTC, v_BTC, state)
    B, T, C = k.shape
    if T == 0:
        return v_BTC, state
    n_full = T // chunk_len
    ys = []
    if n_full:
        def to_chunks(x_BTC):  # [B, n*L, C] -> [n, B, L, C]
            return x_BTC[:, :n_full * chunk_len].reshape(B, n_full, chunk_len, C).swapaxes(0, 1)

        def body(carry, kv):
            y, carry = _chunk(w_C, u_C, kv[0], kv[1], carry)
            return carry, y

        state, y_NBLC = jax.lax.scan(body, state, (to_chunks(k), to_chunks(v)))
        ys.append(y_NBLC.swapaxes(0, 1).reshape(B, n_full * chunk_len, C))
    if T % chunk_len:
        y_tail, state = _chunk(w_C, u_C, k[:, n_full * chunk_len:], v[:, n_full * chunk_len:], state)
        ys.append(y_tail)
    y = ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=1)
    return y.astype(v_BTC.dtype), state


def wkv(time_decay, time_first, k_BTC, v_BTC, state: WKVState | None = None, *,
        form: str = "auto", chunk_len: int = 32):
    """WKV over a sequence in the chosen form ('auto': `default_form()` of the current backend)."""
    form = default_form() if form == "auto" else form
    if form == "sequential":
        return wkv_sequential(time_decay, time_first, k_BTC, v_BTC, state)
    if form == "parallel":
        return wkv_parallel(time_decay, time_first, k_BTC, v_BTC, state)
    if form == "chunked":
        return wkv_chunked(time_decay, time_first, k_BTC, v_BTC, state, chunk_len=chunk_len)
    if form == "pallas":  # lazy: Pallas is only imported by runs that use the kernel
        from rwkv_jax.ops import wkv_pallas
        return wkv_pallas.wkv_pallas_auto(time_decay, time_first, k_BTC, v_BTC, state)
    raise ValueError(f"unknown WKV form {form!r}: choose one of {FORMS + KERNEL_FORMS} or 'auto'")
