"""WKV-7 forms against a float64 reference written independently of rwkv_jax/ops/wkv7.py.

Values and final states are checked against a plain numpy loop over t in float64; gradients against
float64 autodiff of a plain `lax.scan` (under jax.enable_x64), with random cotangents for y and the final
state. Errors are measured relative to the largest magnitude of the reference quantity.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax.ops import wkv7 as ops
from tests.helpers import WKV7_H as H
from tests.helpers import WKV7_N as N
from tests.helpers import WKV7_W_MIN as W_MIN
from tests.helpers import rel_err
from tests.helpers import wkv7_inputs as make_inputs
from tests.helpers import wkv7_reference as reference
from tests.helpers import wkv7_reference_grads as reference_grads

FP32_RTOL = 1e-5
CHUNK_LENS = (16, 32, 64)


def run(form, *args, chunk_len=16, **kwargs):
    return ops.wkv7(*args, form=form, chunk_len=chunk_len, **kwargs)


FORM_CASES = [("sequential", None)] + [("chunked", L) for L in CHUNK_LENS]
IDS = ["sequential"] + [f"chunked{L}" for L in CHUNK_LENS]


@pytest.mark.parametrize("form,chunk_len", FORM_CASES, ids=IDS)
@pytest.mark.parametrize("B,T", [(1, 1), (3, 17), (1, 256)])
def test_values_and_state_match_reference(form, chunk_len, B, T):
    streams, state = make_inputs(B, T, seed=T)
    y_ref, S_ref = reference(*streams, state)
    y, S = run(form, *streams, state, chunk_len=chunk_len or 16)
    assert y.dtype == jnp.float32 and S.dtype == jnp.float32 and S.shape == (B, H, N, N)
    assert rel_err(y, y_ref) < FP32_RTOL
    assert rel_err(S, S_ref) < FP32_RTOL


@pytest.mark.parametrize("form,chunk_len", FORM_CASES, ids=IDS)
@pytest.mark.parametrize("decay", ["fast", "slow"])
def test_decays_at_both_ends_of_their_range(form, chunk_len, decay):
    streams, state = make_inputs(2, 100, seed=1, decay=decay)
    w = streams[1]
    assert (w.max() < W_MIN + 0.01) if decay == "fast" else (w.min() > 1 - 1e-5)
    y_ref, S_ref = reference(*streams, state)
    y, S = run(form, *streams, state, chunk_len=chunk_len or 16)
    assert rel_err(y, y_ref) < FP32_RTOL
    assert rel_err(S, S_ref) < FP32_RTOL


@pytest.mark.parametrize("form,chunk_len", FORM_CASES, ids=IDS)
@pytest.mark.parametrize("B,T", [(1, 1), (3, 17), (1, 256)])
def test_gradients_match_reference(form, chunk_len, B, T):
    streams, state = make_inputs(B, T, seed=10 + T)
    rng = np.random.default_rng(T)
    dy = rng.normal(size=(B, T, H, N)).astype(np.float32)
    dS = rng.normal(size=(B, H, N, N)).astype(np.float32)
    expected = reference_grads(streams, state, dy, dS)
    _, pullback = jax.vjp(lambda *args: run(form, *args, chunk_len=chunk_len or 16), *streams, state)
    grads = pullback((jnp.asarray(dy), jnp.asarray(dS)))
    for name, g, g_ref in zip("r w k v a b state".split(), grads, expected):
        assert g.dtype == jnp.float32, name
        assert rel_err(g, g_ref) < FP32_RTOL, name


@pytest.mark.parametrize("form", ops.FORMS)
def test_float64_inputs_compute_in_float64(form):
    streams, state = make_inputs(2, 40, seed=3)
    rng = np.random.default_rng(3)
    dy, dS = rng.normal(size=streams[0].shape), rng.normal(size=state.shape)
    y_ref, S_ref = reference(*streams, state)
    expected = reference_grads(streams, state, dy, dS)
    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in (*streams, state)]
        (y, S), pullback = jax.vjp(lambda *a: run(form, *a), *args)
        grads = pullback((jnp.asarray(dy), jnp.asarray(dS)))
        assert y.dtype == S.dtype == jnp.float64
        assert rel_err(y, y_ref) < 1e-12 and rel_err(S, S_ref) < 1e-12
        for name, g, g_ref in zip("r w k v a b state".split(), grads, expected):
            assert rel_err(g, g_ref) < 1e-12, name


@pytest.mark.parametrize("form,chunk_len", FORM_CASES, ids=IDS)
def test_bf16_inputs_keep_an_fp32_state(form, chunk_len):
    streams, state = make_inputs(3, 50, seed=4)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in streams]
    y_ref, S_ref = reference(*(np.asarray(x, np.float32) for x in bf16), state)
    y, S = run(form, *bf16, state, chunk_len=chunk_len or 16)
    assert y.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert rel_err(y, y_ref) < 2 ** -8          # y is rounded to bf16 (8 significant bits)
    assert rel_err(S, S_ref) < FP32_RTOL        # the state is fp32 arithmetic on the bf16 values
    grads = jax.grad(lambda *a: run(form, *a, chunk_len=chunk_len or 16)[1].sum(), argnums=(0, 1, 6))(
        *bf16, state)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]


@pytest.mark.parametrize("form,chunk_len", FORM_CASES, ids=IDS)
@pytest.mark.parametrize("split", [1, 33])
def test_split_anywhere(form, chunk_len, split):
    streams, state = make_inputs(3, 70, seed=5)
    y, S = run(form, *streams, state, chunk_len=chunk_len or 16)
    y1, S1 = run(form, *(x[:, :split] for x in streams), state, chunk_len=chunk_len or 16)
    y2, S2 = run(form, *(x[:, split:] for x in streams), S1, chunk_len=chunk_len or 16)
    assert rel_err(np.concatenate([y1, y2], axis=1), y) < FP32_RTOL
    assert rel_err(S2, S) < FP32_RTOL


def test_step_matches_the_sequence():
    streams, state = make_inputs(3, 20, seed=6)
    y_ref, S_ref = reference(*streams, state)
    S, ys = jnp.asarray(state), []
    step = jax.jit(ops.wkv7_step)
    for t in range(20):
        y, S = step(*(x[:, t] for x in streams), S)
        ys.append(y)
    assert rel_err(jnp.stack(ys, axis=1), y_ref) < FP32_RTOL
    assert rel_err(S, S_ref) < FP32_RTOL
    y0, S0 = ops.wkv7_step(*(x[:, 0] for x in streams))  # no state: zeros
    y0_ref, S0_ref = reference(*(x[:, :1] for x in streams), np.zeros_like(state))
    assert rel_err(y0, y0_ref[:, 0]) < FP32_RTOL and rel_err(S0, S0_ref) < FP32_RTOL


RESETS = {0: [5, 9, 40], 2: [0, 32]}  # row 1 never resets; two resets in one block; block boundaries
RESET_B, RESET_T = 3, 50


def _segments(state, R):
    """(row, start, stop, the state the segment starts from) for the resets in RESETS."""
    segments = []
    for row in range(state.shape[0]):
        cuts = RESETS.get(row, [])
        starts = [0] + [c for c in cuts if c > 0]
        for i, start in enumerate(starts):
            stop = starts[i + 1] if i + 1 < len(starts) else RESET_T
            from_R = start > 0 or 0 in cuts
            segments.append((row, start, stop, R if from_R else state[row]))
    return segments


@functools.cache
def reset_case(learned: bool):
    """Inputs, reference values and the reference gradients of the segments run separately (shared by
    every form): (streams, state, reset_BT, reset_state, R, y_ref, S_ref, dy, dS, d_state, d_R)."""
    streams, state = make_inputs(RESET_B, RESET_T, seed=7)
    reset_BT = np.zeros((RESET_B, RESET_T), bool)
    for row, cuts in RESETS.items():
        reset_BT[row, cuts] = True
    reset_state = np.random.default_rng(7).normal(0, 0.3, (H, N, N)).astype(np.float32) if learned else None
    R = np.zeros((H, N, N), np.float32) if reset_state is None else reset_state
    y_ref, S_ref = reference(*streams, state, reset_BT, reset_state)
    rng = np.random.default_rng(8)
    dy, dS = rng.normal(size=y_ref.shape).astype(np.float32), rng.normal(size=S_ref.shape).astype(np.float32)
    d_state, d_R = np.zeros_like(state, np.float64), np.zeros((H, N, N))
    for row, start, stop, S_in in _segments(state, R):
        seg = [x[row:row + 1, start:stop] for x in streams]
        dS_seg = dS[row:row + 1] if stop == RESET_T else np.zeros_like(dS[:1])
        g_S_in = reference_grads(seg, np.asarray(S_in)[None], dy[row:row + 1, start:stop], dS_seg)[-1][0]
        if S_in is R:
            d_R += g_S_in
        else:
            d_state[row] += g_S_in
    return streams, state, reset_BT, reset_state, R, y_ref, S_ref, dy, dS, d_state, d_R


@pytest.mark.parametrize("form,chunk_len", FORM_CASES, ids=IDS)
@pytest.mark.parametrize("learned", [pytest.param(False, marks=pytest.mark.slow), True])  # CI time: True is
def test_resets_equal_separate_segments(form, chunk_len, learned):                       # the harder case
    """Values equal the reference with resets, and the gradients into the initial state and the reset
    state equal those of the segments run separately (row 2 resets at 0: its initial state is unused)."""
    streams, state, reset_BT, reset_state, R, y_ref, S_ref, dy, dS, d_state_ref, d_R_ref = reset_case(learned)
    fn = lambda st, R: run(form, *streams, st, chunk_len=chunk_len or 16, reset_BT=reset_BT,
                           reset_state=R if learned else None)
    (y, S), pullback = jax.vjp(fn, jnp.asarray(state), jnp.asarray(R))
    assert rel_err(y, y_ref) < FP32_RTOL and rel_err(S, S_ref) < FP32_RTOL
    d_state, d_R = pullback((jnp.asarray(dy), jnp.asarray(dS)))
    assert rel_err(d_state, d_state_ref) < FP32_RTOL
    if learned:
        assert rel_err(d_R, d_R_ref) < FP32_RTOL
    else:
        assert np.all(np.asarray(d_R) == 0)  # zeros by default: the given R is not used


def test_bad_arguments_raise():
    streams, state = make_inputs(1, 4)
    with pytest.raises(ValueError, match="chunk_len"):
        ops.wkv7(*streams, state, form="chunked", chunk_len=65)
    with pytest.raises(ValueError, match="reset_state was given without"):
        ops.wkv7(*streams, state, reset_state=state)
    with pytest.raises(ValueError, match="unknown WKV-7 form"):
        ops.wkv7(*streams, state, form="parallel")
    with pytest.raises(ValueError, match="reset_BT"):
        ops.wkv7(*streams, state, reset_BT=np.zeros((1, 5), bool))
    with pytest.raises(ValueError, match="state must be"):
        ops.wkv7(*streams, state[:, :1])


@pytest.mark.slow
@pytest.mark.parametrize("form,chunk_len", FORM_CASES, ids=IDS)
def test_long_sequence(form, chunk_len):
    B, T = 2, 1000
    streams, state = make_inputs(B, T, seed=9)
    y_ref, S_ref = reference(*streams, state)
    rng = np.random.default_rng(9)
    dy, dS = rng.normal(size=y_ref.shape).astype(np.float32), rng.normal(size=S_ref.shape).astype(np.float32)
    expected = reference_grads(streams, state, dy, dS)
    (y, S), pullback = jax.vjp(lambda *a: run(form, *a, chunk_len=chunk_len or 16), *streams, state)
    assert rel_err(y, y_ref) < FP32_RTOL and rel_err(S, S_ref) < FP32_RTOL
    for name, g, g_ref in zip("r w k v a b state".split(), pullback((jnp.asarray(dy), jnp.asarray(dS))),
                              expected):
        assert rel_err(g, g_ref) < FP32_RTOL, name
