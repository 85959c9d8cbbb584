"""The WKV operator of RWKV-7 "Goose" (x070) as pure functions, in forms that agree to fp32 precision.

Per head (N = head size) the state S is an [N, N] matrix whose row i indexes the value channel and whose
column j indexes the key channel (the orientation of the official `rwkv` package and CUDA kernels:
`state[i, j]`, `y = state @ r`). For each token t, with vectors r, w, k, v, a, b of length N:

    S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T        y_t = S_t r_t

i.e. S_t = S_{t-1} G_t + v_t k_t^T with the diagonal-plus-rank-one transition G_t = diag(w_t) + a_t b_t^T.
The model makes w = exp(-exp(-0.5) sigmoid(.)) in (0.545, 1), a = -kk and b = kk * iclr with kk unit-norm
per head and iclr in (0, 1): G_t = diag(w_t) - kk_t (iclr_t kk_t)^T, which for w = 1 removes the part
iclr of S along kk_t (the delta rule), so S stays bounded. The operator itself takes any w in (0, 1] and
any a, b.

Forms (all take an initial state and return the final state, so a sequence can be split anywhere, and
gradients flow into r, w, k, v, a, b and the initial state):
  * `wkv7_sequential`: the recurrence as a `lax.scan` over T with a hand-written backward
                       (`jax.custom_vjp`): the forward keeps the state every `CHECKPOINT_EVERY` tokens,
                       the backward recomputes the states inside each span from its checkpoint and runs
                       the reverse recurrence. (The official training kernel also keeps a state per 16
                       tokens, but walks the state backwards by dividing by w; recomputing forwards
                       from the checkpoint never divides, so small w cannot amplify rounding errors.)
  * `wkv7_chunked`:    blocks of `chunk_len` tokens in matmul form (a WY representation of the products
                       of the G_t, see `_chunk`), the state carried across blocks by a scan; autodiff.
  * `wkv7_step`:       one token, for RNN-mode decoding.
  * 'pallas' (`wkv7`'s form only): rwkv_jax/ops/wkv7_pallas.py, the chunked math as a Mosaic (TPU) kernel
               or the recurrence as a Triton (GPU) kernel.

Inputs may be bf16; the arithmetic and the state are fp32 (float64 for float64 inputs under
jax_enable_x64), and `y` comes back in v's dtype.

Document resets (both sequence forms and the dispatcher): `reset_BT` (bool [B, T]) marks positions where
the state *entering* token t is replaced by `reset_state` (default zeros; else [B, H, N, N], or anything
that broadcasts to it, e.g. a learned [H, N, N] state) before token t is processed. The result equals
running each segment on its own from `reset_state`, in values and in gradients (into `reset_state` from
every reset position; none into the state before a reset). `reset_BT=None` traces the code without resets.
"""

import jax
import jax.numpy as jnp

from rwkv_jax.ops.wkv7_resets import prepare_resets as _prepare_resets

FORMS: tuple[str, ...] = ("sequential", "chunked")
KERNEL_FORMS: tuple[str, ...] = ("pallas",)  # rwkv_jax/ops/wkv7_pallas.py, imported when chosen
CHECKPOINT_EVERY = 16  # tokens between the states the sequential forward keeps for its backward

_HIGHEST = jax.lax.Precision.HIGHEST  # full fp32 products on accelerators (no tf32/bf16 passes)


def _einsum(spec, *operands):
    return jnp.einsum(spec, *operands, precision=_HIGHEST)


def _compute_dtype(v_dtype):
    return jnp.promote_types(jnp.float32, v_dtype)


def _prepare(r, w, k, v, a, b, state):
    """The six streams and the state in the compute dtype; a zero state where none was given."""
    dtype = _compute_dtype(v.dtype)
    streams = tuple(x.astype(dtype) for x in (r, w, k, v, a, b))
    shape = r.shape[:1] + r.shape[2:] + r.shape[-1:]  # [B, H, N, N]
    state = jnp.zeros(shape, dtype) if state is None else jnp.asarray(state).astype(dtype)
    if state.shape != shape:
        raise ValueError(f"state must be [batch, heads, N, N] = {shape}, got {state.shape}")
    return streams, state


def _mv(S_BHNN, x_BHN):
    """S x over the key index: [B, H, N(i)]."""
    return _einsum("bhij,bhj->bhi", S_BHNN, x_BHN)


def _vm(x_BHN, S_BHNN):
    """x^T S over the value index: [B, H, N(j)]."""
    return _einsum("bhi,bhij->bhj", x_BHN, S_BHNN)


def _transition(S_BHNN, w, k, v, a, b):
    """(S G + v k^T with G = diag(w) + a b^T, S a)."""
    sa_BHN = _mv(S_BHNN, a)
    S_BHNN = (S_BHNN * w[..., None, :] + sa_BHN[..., :, None] * b[..., None, :]
              + v[..., :, None] * k[..., None, :])
    return S_BHNN, sa_BHN


def wkv7_step(r_BHN, w_BHN, k_BHN, v_BHN, a_BHN, b_BHN, state_BHNN=None):
    """One token per sequence (RNN mode): (y [B, H, N] in v's dtype, the next state [B, H, N, N])."""
    (r, w, k, v, a, b), S = _prepare(r_BHN[:, None], w_BHN[:, None], k_BHN[:, None], v_BHN[:, None],
                                     a_BHN[:, None], b_BHN[:, None], state_BHNN)
    S, _ = _transition(S, w[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0])
    return _mv(S, r[:, 0]).astype(v_BHN.dtype), S


# ----------------------------------------------------------------------------------------------------
# Sequential form. Inside the custom_vjp everything is time-major and padded to whole spans:
# streams [n, P, B, H, N] (n spans of P = CHECKPOINT_EVERY tokens), resets [n, P, B] or absent.


def _enter(S_BHNN, reset_B, reset_state):
    """The state entering a token: the reset state where the token starts a new document."""
    if reset_B is None:
        return S_BHNN
    return jnp.where(reset_B[:, None, None, None], reset_state, S_BHNN)


def _run_span(S_BHNN, span, reset_state):
    """The forward over one span: (state after it, y [P, B, H, N])."""
    def token(S, inputs):
        r, w, k, v, a, b, reset = inputs
        S, _ = _transition(_enter(S, reset, reset_state), w, k, v, a, b)
        return S, _mv(S, r)
    return jax.lax.scan(token, S_BHNN, span)


@jax.custom_vjp
def _sequential(streams, S0_BHNN, mask, reset_state):
    """Undifferentiated (inference): one scan over every token, no checkpoints kept."""
    flat = lambda x: None if x is None else x.reshape(-1, *x.shape[2:])  # noqa: E731  [n, P, ...] -> [n P, ...]
    S, y = _run_span(S0_BHNN, (*map(flat, streams), flat(mask)), reset_state)
    return y.reshape(*streams[0].shape[:2], *y.shape[1:]), S


def _sequential_fwd_impl(streams, S0_BHNN, mask, reset_state):
    def span(S, inputs):
        S_end, y = _run_span(S, inputs, reset_state)
        return S_end, (y, S)                      # keep the state entering each span
    S_end, (y, checkpoints) = jax.lax.scan(span, S0_BHNN, (*streams, mask))
    return y, S_end, checkpoints


def _sequential_fwd(streams, S0_BHNN, mask, reset_state):
    y, S_end, checkpoints = _sequential_fwd_impl(streams, S0_BHNN, mask, reset_state)
    return (y, S_end), (streams, checkpoints, mask, reset_state)


def _back_token(carry, inputs):
    """One step of the reverse recurrence. carry: (dS = cotangent of the state after the token, d reset
    state); inputs: the states entering and leaving the token, its streams, reset flag and dy.
    With S' = S_in G + v k^T, y = S' r and G = diag(w) + a b^T:
        dS' += dy r^T;  dr = S'^T dy;  dv = dS' k;  dk = dS'^T v;
        dG = S_in^T dS'  ->  dw = diag(dG), da = dG b = S_in^T (dS' b), db = dG^T a = dS'^T (S_in a);
        dS_in = dS' G^T = dS' diag(w) + (dS' b) a^T."""
    dS, d_reset = carry
    S_in, S_out, r, w, k, v, a, b, reset, dy = inputs
    sa = _mv(S_in, a)
    dr = _vm(dy, S_out)
    dS = dS + dy[..., :, None] * r[..., None, :]
    dv = _mv(dS, k)
    dk = _vm(v, dS)
    dw = jnp.sum(S_in * dS, axis=-2)
    dSb = _mv(dS, b)
    da = _vm(dSb, S_in)
    db = _vm(sa, dS)
    dS_in = dS * w[..., None, :] + dSb[..., :, None] * a[..., None, :]
    if reset is not None:                         # a reset token's incoming state came from reset_state
        at_reset = reset[:, None, None, None]
        d_reset = d_reset + jnp.where(at_reset, dS_in, 0)
        dS_in = jnp.where(at_reset, 0, dS_in)
    return (dS_in, d_reset), (dr, dw, dk, dv, da, db)


def _sequential_bwd(residuals, cotangents):
    streams, checkpoints, mask, reset_state = residuals
    dy, dS_end = cotangents
    d_reset0 = None if reset_state is None else jnp.zeros_like(reset_state)

    def back_span(carry, inputs):
        S_start, span, dy_span = inputs

        def states(S, token_inputs):              # recompute the states entering and leaving each token
            r, w, k, v, a, b, reset = token_inputs
            S_in = _enter(S, reset, reset_state)
            S_out = _transition(S_in, w, k, v, a, b)[0]
            return S_out, (S_in, S_out)
        _, (S_in, S_out) = jax.lax.scan(states, S_start, span)   # [P, B, H, N, N] each
        return jax.lax.scan(_back_token, carry, (S_in, S_out, *span, dy_span), reverse=True)

    (dS0, d_reset), grads = jax.lax.scan(back_span, (dS_end, d_reset0),
                                         (checkpoints, (*streams, mask), dy), reverse=True)
    return grads, dS0, None, d_reset


_sequential.defvjp(_sequential_fwd, _sequential_bwd)


def _to_spans(x_BT, T_pad, fill, P):
    """[B, T, ...] -> [n, P, B, ...], padded along T to T_pad with `fill`."""
    B, T = x_BT.shape[:2]
    x = jnp.pad(x_BT, [(0, 0), (0, T_pad - T)] + [(0, 0)] * (x_BT.ndim - 2), constant_values=fill)
    x = jnp.moveaxis(x, 1, 0)
    return x.reshape(T_pad // P, P, *x.shape[1:])


def wkv7_sequential(r_BTHN, w_BTHN, k_BTHN, v_BTHN, a_BTHN, b_BTHN, state_BHNN=None, *, reset_BT=None,
                    reset_state=None):
    """The recurrence token by token: (y [B, T, H, N] in v's dtype, final state [B, H, N, N]).

    Backward: a `jax.custom_vjp` that keeps one state per CHECKPOINT_EVERY tokens (O(T/16 N^2) memory per
    head instead of autodiff's state per token), recomputes the states inside each span and runs the
    reverse recurrence (`_back_token`). T need not be a multiple of the span: the tail is padded with
    identity tokens (w = 1, r = k = v = a = b = 0), which leave the state unchanged.
    """
    streams, S0 = _prepare(r_BTHN, w_BTHN, k_BTHN, v_BTHN, a_BTHN, b_BTHN, state_BHNN)
    B, T = r_BTHN.shape[:2]
    resets = _prepare_resets(reset_BT, reset_state, S0.shape, T, S0.dtype)
    if T == 0:
        return v_BTHN, S0
    P = CHECKPOINT_EVERY
    T_pad = -(-T // P) * P
    spans = tuple(_to_spans(x, T_pad, 1.0 if i == 1 else 0.0, P) for i, x in enumerate(streams))
    mask = None if resets is None else _to_spans(resets[0], T_pad, False, P)
    y, S = _sequential(spans, S0, mask, None if resets is None else resets[1])
    y = jnp.moveaxis(y.reshape(T_pad, *y.shape[2:]), 0, 1)[:, :T]
    return y.astype(v_BTHN.dtype), S


# ----------------------------------------------------------------------------------------------------
# Chunked form.


def _chunk(S0_BHNN, r, w, k, v, a, b, resets=None):
    """One block of L tokens from the state S0 entering it; streams [B, H, L, N]. Returns (y, state after).

    With c_t = sum_{s<=t} log w_s (inclusive, within the block) and u_t = S_{t-1} a_t, unrolling the
    diagonal part of the recurrence gives, exactly,

        S_t = S0 diag(e^{c_t}) + sum_{s<=t} (u_s b_s^T + v_s k_s^T) diag(e^{c_t - c_s}).

    Writing this for u_t = S_{t-1} a_t gives a unit lower-triangular system for U = [u_1 .. u_L]^T
    (solved by substitution, `_unit_lower_solve`):

        (I - A_ab) U = (a e^{c_{t-1}}) S0^T + A_ak V,   A_xy[t, s] = sum_j x_t[j] y_s[j] e^{c_{t-1}[j] - c_s[j]}
                                                        for s < t (the WY / UT form of prod G_t),
    and then y_t = S_t r_t and S_L are matmuls with the pairwise decays e^{c_t - c_s} (s <= t).

    The pairwise decays are factored through a reference position m in the middle of the block:
    e^{c_t - c_s} = e^{c_t - c_m} e^{c_m - c_s}, so every factor is at most e^{(L/2) max|log w|}. For the
    model's decays (w >= e^{-e^{-0.5}} = 0.545, |log w| <= 0.607) and L <= 64 that is <= e^{19.4} = 2.7e8,
    far inside fp32's range, and each product is formed as one rounding of each factor (no cancellation);
    the factors cover only pairs s <= t, whose exact value is <= 1. Decays far below 0.545 with long
    blocks would overflow: keep L * max|log w| below ~80 (chunk_len 16 allows w down to ~e^-10).

    resets: (mask bool [B, L], reset state [B, H, N, N]) or None. Token t then starts from its last reset
    p_t <= t in the block, if any: its pairs keep only s >= p_t, and its base term is the reset state
    decayed from p_t instead of S0 decayed from the block's start (`_reset_starts`).
    """
    L = r.shape[-2]
    log_w = jnp.log(w)                                 # w in (0, 1]: finite
    c = jnp.cumsum(log_w, axis=-2)                     # through token t
    c_before = jnp.concatenate([jnp.zeros_like(c[..., :1, :]), c[..., :-1, :]], axis=-2)  # through t-1
    c_ref = c[..., (L - 1) // 2:(L - 1) // 2 + 1, :]
    a_hat, r_hat = a * jnp.exp(c_before - c_ref), r * jnp.exp(c - c_ref)
    b_hat, k_hat = b * jnp.exp(c_ref - c), k * jnp.exp(c_ref - c)
    t, s = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
    strictly, inclusive = s < t, s <= t
    base_from_S0, c_start = jnp.ones((1, 1, L, 1), bool), jnp.zeros_like(c)
    if resets is not None:
        since_reset_BLL, base_from_S0, c_start = _reset_starts(resets[0], c_before)
        strictly, inclusive = strictly & since_reset_BLL[:, None], inclusive & since_reset_BLL[:, None]
    pairs = lambda x, y, keep: jnp.where(keep, _einsum("bhtn,bhsn->bhts", x, y), 0)
    A_ab, A_ak = pairs(a_hat, b_hat, strictly), pairs(a_hat, k_hat, strictly)
    M_rb, M_rk = pairs(r_hat, b_hat, inclusive), pairs(r_hat, k_hat, inclusive)

    def base(x_BHLN):                                  # x_t^T (the state token t's terms start from)^T
        from_S0 = _einsum("bhtj,bhij->bhti", x_BHLN, S0_BHNN)
        if resets is None:
            return from_S0
        return jnp.where(base_from_S0, from_S0, _einsum("bhtj,bhij->bhti", x_BHLN, resets[1]))

    rhs = base(a * jnp.exp(c_before - c_start)) + _einsum("bhts,bhsi->bhti", A_ak, v)
    U = _unit_lower_solve(A_ab, rhs)
    y = (base(r * jnp.exp(c - c_start)) + _einsum("bhts,bhsi->bhti", M_rb, U)
         + _einsum("bhts,bhsi->bhti", M_rk, v))
    to_end = jnp.exp(c[..., -1:, :] - c)               # e^{c_L - c_s} <= 1
    S_start = S0_BHNN
    if resets is not None:                             # the last token's start: S0 or the reset state
        to_end = jnp.where(inclusive[..., -1, :, None], to_end, 0)
        S_start = jnp.where(base_from_S0[:, :, -1:], S0_BHNN, resets[1])
    S_end = (S_start * jnp.exp(c[..., -1, :] - c_start[..., -1, :])[..., None, :]
             + _einsum("bhsi,bhsj->bhij", U, b * to_end) + _einsum("bhsi,bhsj->bhij", v, k * to_end))
    return y, S_end


@jax.custom_vjp
def _unit_lower_solve(A_BHLL, rhs_BHLN):
    """U with (I - A) U = rhs for strictly lower-triangular A [B, H, L, L], by forward substitution.

    Not jax.scipy.linalg.solve_triangular: on CPU (jax 0.10.2) its batched LAPACK trsm splits the batch
    over the XLA:CPU thread pool and waits for the parts from a pool thread; several such solves running
    at once in the scan's backward deadlocked the pool (tests/test_wkv7.py::test_long_sequence, L=64).
    """
    return _substitute(A_BHLL, rhs_BHLN, transpose=False)


def _substitute(A_BHLL, rhs_BHLN, transpose: bool):
    """(I - A)^{-1} rhs (rows first to last), or (I - A)^{-T} rhs (last to first), one row per step."""
    L = A_BHLL.shape[-1]

    def row(i, U):          # rows not yet solved are zero, so the full row of A can be used
        t = L - 1 - i if transpose else i
        coefficients = A_BHLL[..., :, t] if transpose else A_BHLL[..., t, :]
        return U.at[..., t, :].set(rhs_BHLN[..., t, :] + _einsum("bhs,bhsn->bhn", coefficients, U))
    return jax.lax.fori_loop(0, L, row, jnp.zeros_like(rhs_BHLN))


def _unit_lower_solve_fwd(A_BHLL, rhs_BHLN):
    U = _substitute(A_BHLL, rhs_BHLN, transpose=False)
    return U, (A_BHLL, U)


def _unit_lower_solve_bwd(residuals, dU):
    """From (I - A) U = rhs: d rhs = (I - A)^{-T} dU and dA = d rhs U^T on the strictly lower part."""
    A_BHLL, U = residuals
    d_rhs = _substitute(A_BHLL, dU, transpose=True)
    L = A_BHLL.shape[-1]
    dA = jnp.where(jnp.tri(L, k=-1, dtype=bool), _einsum("bhtn,bhsn->bhts", d_rhs, U), 0)
    return dA, d_rhs


_unit_lower_solve.defvjp(_unit_lower_solve_fwd, _unit_lower_solve_bwd)


def _reset_starts(reset_BL, c_before):
    """For each token t of a block with resets: (pairs (t, s) with s at or after t's last reset p_t
    [B, L, L], whether t has no reset at or before it [B, 1, L, 1], and c_before at p_t (0 without a
    reset) [B, H, L, N], the log-decay the reset state's terms start from)."""
    L = reset_BL.shape[-1]
    positions = jnp.arange(L)
    last_BL = jax.lax.cummax(jnp.where(reset_BL, positions, -1), axis=1)   # p_t, -1 if none
    since_reset_BLL = positions[None, None, :] >= last_BL[:, :, None]
    no_reset = (last_BL < 0)[:, None, :, None]
    index = jnp.broadcast_to(jnp.maximum(last_BL, 0)[:, None, :, None], c_before.shape)
    c_start = jnp.where(no_reset, 0, jnp.take_along_axis(c_before, index, axis=2))
    return since_reset_BLL, no_reset, c_start


def wkv7_chunked(r_BTHN, w_BTHN, k_BTHN, v_BTHN, a_BTHN, b_BTHN, state_BHNN=None, *, chunk_len: int = 16,
                 reset_BT=None, reset_state=None):
    """Blocks of `chunk_len` tokens in matmul form (`_chunk`), the state carried across blocks by
    `lax.scan`; gradients by autodiff. T need not be a multiple of chunk_len: the tail is padded with
    identity tokens (w = 1, r = k = v = a = b = 0). chunk_len 16 (default) to 64; see `_chunk` for the
    decay range a block length allows. `reset_BT`, `reset_state`: document resets (module docstring)."""
    if not 1 <= chunk_len <= 64:
        raise ValueError(f"chunk_len must be in [1, 64], got {chunk_len}")
    streams, S = _prepare(r_BTHN, w_BTHN, k_BTHN, v_BTHN, a_BTHN, b_BTHN, state_BHNN)
    B, T, H, N = r_BTHN.shape
    resets = _prepare_resets(reset_BT, reset_state, S.shape, T, S.dtype)
    if T == 0:
        return v_BTHN, S
    L = chunk_len
    T_pad = -(-T // L) * L
    # [B, T, H, N] -> [n, B, H, L, N]
    blocks = tuple(jnp.moveaxis(_to_spans(x, T_pad, 1.0 if i == 1 else 0.0, L), 1, -2)
                   for i, x in enumerate(streams))
    masks = None if resets is None else _to_spans(resets[0], T_pad, False, L).swapaxes(1, 2)  # [n, B, L]

    def body(S, block):
        *streams, mask = block
        y, S = _chunk(S, *streams, None if mask is None else (mask, resets[1]))
        return S, y

    S, y = jax.lax.scan(body, S, (*blocks, masks))               # y [n, B, H, L, N]
    y = jnp.moveaxis(y, -2, 1).reshape(T_pad, B, H, N)
    return jnp.moveaxis(y, 0, 1)[:, :T].astype(v_BTHN.dtype), S


def wkv7(r_BTHN, w_BTHN, k_BTHN, v_BTHN, a_BTHN, b_BTHN, state_BHNN=None, *, form: str = "sequential",
         chunk_len: int = 16, reset_BT=None, reset_state=None):
    """WKV-7 over a sequence in the chosen form (`FORMS`). `reset_BT`, `reset_state`: document resets
    (module docstring)."""
    args = (r_BTHN, w_BTHN, k_BTHN, v_BTHN, a_BTHN, b_BTHN, state_BHNN)
    resets = dict(reset_BT=reset_BT, reset_state=reset_state)
    if form == "sequential":
        return wkv7_sequential(*args, **resets)
    if form == "chunked":
        return wkv7_chunked(*args, chunk_len=chunk_len, **resets)
    if form == "pallas":  # lazy: Pallas is only imported by runs that use the kernel
        from rwkv_jax.ops import wkv7_pallas
        return wkv7_pallas.wkv7_pallas_auto(*args, chunk_len=chunk_len, **resets)
    raise ValueError(f"unknown WKV-7 form {form!r}: choose one of {FORMS + KERNEL_FORMS}")


def default_form(platform: str, inference: bool = False) -> str:
    """The form model.wkv_form='auto' picks on a platform ('cpu', 'gpu', 'tpu'): the Mosaic kernel on
    TPU, the chunked form elsewhere (benchmarks/wkv.py compares the pure-JAX forms). The Triton kernel
    (wkv7_pallas, backend 'gpu') is tested interpreted and lowered to Triton IR only: it has not been
    compiled or timed on a GPU, so 'auto' does not pick it there yet.

    `inference`: for a model loaded to run without gradients (prefill, evaluation, scoring). On CPU that is
    the sequential form, whose undifferentiated path is one scan over the tokens: the chunked form's
    matmuls win only with a backward to share them (benchmarks/wkv.py --version=7, forward vs
    forward+backward)."""
    if platform == "tpu":
        return "pallas"
    return "sequential" if inference and platform == "cpu" else "chunked"
