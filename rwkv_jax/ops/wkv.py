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
  * `wkv_sequential`: a `lax.scan` recurrence; O(T) work, the fastest form on CPU.
  * `wkv_parallel`:   a `lax.associative_scan` over (a, b, p, length) elements; O(log T) depth.
  * `wkv_chunked`:    blocks of `chunk_len` tokens computed densely ([L, L] pairs per channel), with the
                      state carried across blocks by a scan; fused elementwise work for accelerators.
  * `wkv_step`:       one token, for RNN-mode decoding.

All inputs may be bf16; the arithmetic and the state are fp32 (float64 for float64 inputs under
jax_enable_x64) and `y` comes back in v's dtype.
"""

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

# log(0) stand-in for an empty state, as in the official `rwkv` package; finite on purpose (see above).
EMPTY_EXPONENT = -1e30

WKVForm = Literal["sequential", "parallel", "chunked"]
FORMS: tuple[str, ...] = ("sequential", "parallel", "chunked")  # the pure-JAX forms of this module
KERNEL_FORMS: tuple[str, ...] = ("pallas",)  # rwkv_jax/ops/wkv_pallas.py, imported when chosen

# Default form per backend. Measured by benchmarks/wkv.py on a 2-core CPU at B=8, T=1024, C=768: the
# parallel scan ran forward+backward in 0.45x the time of the recurrence (chunked L=16: 1.25x), and a
# training step of configs/tiny.py in 0.52x. GPU/TPU: the parallel scan's O(log T) depth suits wide
# machines (not yet measured here; benchmarks/wkv.py prints the comparison on any backend).
DEFAULT_FORM_BY_BACKEND: dict[str, str] = {"cpu": "parallel", "gpu": "parallel", "cuda": "parallel",
                                           "rocm": "parallel", "tpu": "parallel"}


class WKVState(NamedTuple):
    """Running WKV sums of one layer: numerator a*e^p and denominator b*e^p, each [B, C] fp32."""
    a: jax.Array
    b: jax.Array
    p: jax.Array


def empty_state(batch_size: int, channels: int, dtype=jnp.float32) -> WKVState:
    zeros = jnp.zeros((batch_size, channels), dtype)
    return WKVState(zeros, zeros, jnp.full((batch_size, channels), EMPTY_EXPONENT, dtype))


def default_form(backend: str | None = None) -> str:
    """The documented default WKV form for a backend ('cpu', 'gpu', 'tpu'; None: the current one)."""
    backend = backend or jax.default_backend()
    return DEFAULT_FORM_BY_BACKEND.get(backend, "parallel")


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


def _step_fp32(w_C, u_C, k_BC, v_BC, state: WKVState):
    y_BC = _output(state, u_C + k_BC, v_BC)
    p, a, b = _mix(state.p + w_C, state.a, state.b, k_BC, v_BC, jnp.ones_like(v_BC))
    return y_BC, WKVState(a, b, p)


def wkv_step(time_decay, time_first, k_BC, v_BC, state: WKVState):
    """One token in RNN mode: returns y [B, C] (v's dtype) and the next state."""
    w_C, u_C, k_BC, v_f32, state = _prepare(time_decay, time_first, k_BC, v_BC, state)
    y_BC, state = _step_fp32(w_C, u_C, k_BC, v_f32, state)
    return y_BC.astype(v_BC.dtype), state


def wkv_sequential(time_decay, time_first, k_BTC, v_BTC, state: WKVState | None = None, *, unroll: int = 8):
    """`lax.scan` recurrence over T. Returns y [B, T, C] and the final state.

    The exponent is carried as an anchor plus a count of decay steps since it was set (p = anchor + n w),
    so it is rounded once per read instead of accumulating one rounding of `p + w` per token; with a tiny
    |w| over thousands of tokens that accumulation is visible in fp32 (the official kernel has it).
    """
    w_C, u_C, k, v, state = _prepare(time_decay, time_first, k_BTC, v_BTC, state)
    if k.shape[1] == 0:
        return v_BTC, state

    def body(carry, kv_t):
        a, b, anchor, n = carry
        k_BC, v_BC = kv_t
        y_BC = _output(WKVState(a, b, anchor + n * w_C), u_C + k_BC, v_BC)
        decayed = anchor + (n + 1) * w_C
        p, a, b = _mix(decayed, a, b, k_BC, v_BC, jnp.ones_like(v_BC))
        k_is_max = k_BC >= decayed
        return (a, b, jnp.where(k_is_max, k_BC, anchor), jnp.where(k_is_max, 0, n + 1)), y_BC

    kv_TBC = (jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1))
    carry = (state.a, state.b, state.p, jnp.zeros_like(state.p))
    (a, b, anchor, n), y_TBC = jax.lax.scan(body, carry, kv_TBC, unroll=min(unroll, k.shape[1]))
    return jnp.swapaxes(y_TBC, 0, 1).astype(v_BTC.dtype), WKVState(a, b, anchor + n * w_C)


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
