"""Tests of the WKV operator (rwkv_jax/ops/wkv4.py).

Every form (sequential, parallel, chunked, and token-by-token `wkv_step`) is checked against an independent
float64 numpy reference written from the unscaled definition, against each other (values, final state and
gradients, including gradients into the initial state), against float64 finite differences, for splitting
a sequence anywhere, for extreme inputs and bf16, and for the empty state and the dispatcher. The sequential
form's hand-written backward (`jax.custom_vjp`) is also checked against JAX's autodiff of a plain scan, in
float64 under x64, for T = 0 and 1, unrolled, and with bf16 inputs.

XLA compiles take most of the time on CPU, so the tests share a few shapes (B=2, C=8, T in 0, 1, 12, 16,
17, 31, 32, 50, 70; B=1, T=4096) and a few cached jitted functions; the rest is under @pytest.mark.slow.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax.ops.wkv4 import (
    CHECKPOINT_EVERY,
    EMPTY_EXPONENT,
    FORMS,
    WKVState,
    default_form,
    empty_state,
    wkv,
    wkv_chunked,
    wkv_sequential,
    wkv_step,
)
from tests.helpers import (
    WKV_B,
    WKV_C,
    WKV_GRAD_NAMES,
    assert_close,
    assert_state_close,
    extreme_inputs,
    grad_args,
    make_inputs,
    reference_recurrence,
    reference_wkv,
)

B, C = WKV_B, WKV_C  # the default shapes of make_inputs and extreme_inputs
CHUNK_LEN = 16
RUNNERS = FORMS + ("step",)  # the three sequence forms and a Python loop over `wkv_step`
GRAD_NAMES = WKV_GRAD_NAMES


# ------------------------------------------------------------------------------------------------ runners

@functools.partial(jax.jit, static_argnames=("form", "chunk_len"))
def _run_form(time_decay, time_first, k, v, state, *, form, chunk_len):
    return wkv(time_decay, time_first, k, v, state, form=form, chunk_len=chunk_len)


_jit_step = jax.jit(wkv_step)


def _run_steps(time_decay, time_first, k, v, state):
    """Token by token with `wkv_step` (RNN mode)."""
    ys = []
    for t in range(k.shape[1]):
        y, state = _jit_step(time_decay, time_first, k[:, t], v[:, t], state)
        ys.append(y)
    return jnp.stack(ys, axis=1), state


def run(runner, time_decay, time_first, k, v, state=None, chunk_len=CHUNK_LEN):
    """y [B, T, C] and the final state of one runner (a form name or 'step'), jitted."""
    if state is None:
        state = empty_state(k.shape[0], k.shape[2])
    if runner == "step":
        return _run_steps(time_decay, time_first, k, v, state)
    return _run_form(time_decay, time_first, k, v, state, form=runner, chunk_len=chunk_len)


@functools.cache
def value_and_grads(runner, chunk_len=CHUNK_LEN):
    """f(time_decay, time_first, k, v, a0, b0, p0, r) -> ((loss, (y, final state)), gradients of loss wrt the
    first 7 arguments), where loss = sum(y r_y) + sum(a r_a) + sum(b r_b) + sum(p r_p) uses y and every part
    of the final state. a and b are scaled by e^-p, so comparing them across forms relies on every form
    keeping the same running maximum p (checked)."""
    def loss(time_decay, time_first, k, v, a0, b0, p0, r):
        y, state = run(runner, time_decay, time_first, k, v, WKVState(a0, b0, p0), chunk_len=chunk_len)
        value = (jnp.sum(y.astype(jnp.float32) * r["y"]) + jnp.sum(state.a * r["a"])
                 + jnp.sum(state.b * r["b"]) + jnp.sum(state.p * r["p"]))
        return value, (y, state)
    fn = jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True)
    return fn if runner == "step" else jax.jit(fn)


# ------------------------------------------------------------------------------------------------- inputs

# ---------------------------------------------------------------------------------------------- reference

def assert_all_finite(tree, what):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32))), f"{what}{jax.tree_util.keystr(path)}"


# ---------------------------------------------------------------------------- agreement with the reference

@pytest.mark.parametrize("with_state", [False, True], ids=["empty_state", "initial_state"])
@pytest.mark.parametrize("T", [1, 17, 50])
@pytest.mark.parametrize("runner", RUNNERS)
def test_matches_float64_reference(runner, T, with_state):
    x = make_inputs(seed=T, T=T, with_state=with_state)
    (_, (y, state)), grads = value_and_grads(runner)(*grad_args(x, seed=0))
    y_ref, num_ref, den_ref, p_ref = reference_wkv(**x)

    assert y.dtype == jnp.float32 and y.shape == (B, T, C)
    assert_close(y, y_ref, rtol=1e-5, atol=1e-6, err_msg="y")
    # All forms keep the same running maximum p, so it is compared directly, and a, b as a*e^p, b*e^p.
    assert_close(state.p, p_ref, rtol=1e-6, atol=1e-6, err_msg="p")
    scale = np.exp(np.asarray(state.p, np.float64))
    assert_close(state.a * scale, num_ref, rtol=1e-5, atol=1e-6, err_msg="a * e^p")
    assert_close(state.b * scale, den_ref, rtol=1e-5, err_msg="b * e^p")
    assert_all_finite(grads, "gradient ")


# ------------------------------------------------------------------------ agreement between forms, grads

@pytest.mark.parametrize("T", [1, pytest.param(15, marks=pytest.mark.slow),
                               pytest.param(16, marks=pytest.mark.slow), 17, pytest.param(50, marks=pytest.mark.slow)])
def test_forms_agree_on_values_state_and_gradients(T):
    """chunk_len 16: T below, at and just past one chunk edge, and across three edges with a tail of 2.
    (T = 16 and 15 only add compiles: exact multiples are covered in the default run by the split tests.)"""
    args = grad_args(make_inputs(seed=100 + T, T=T), seed=T)
    (loss_seq, (y_seq, state_seq)), grads_seq = value_and_grads("sequential")(*args)
    for form in ("parallel", "chunked"):
        (loss, (y, state)), grads = value_and_grads(form)(*args)
        assert_close(y, y_seq, rtol=1e-5, atol=1e-6, err_msg=form)
        assert_close(state.p, state_seq.p, rtol=0, atol=1e-6, err_msg=f"{form} p")  # the same p ...
        assert_state_close(state, state_seq, rtol=1e-5, atol=1e-6, err_msg=form)   # ... so a, b compare
        assert_close(loss, loss_seq, rtol=1e-5, err_msg=f"{form} loss")
        for name, g, g_seq in zip(GRAD_NAMES, grads, grads_seq):
            assert np.all(np.isfinite(g)), f"{form} d loss / d {name}"
            # Gradients are sums over up to B*T terms: absolute tolerance relative to the largest entry.
            assert_close(g, g_seq, rtol=1e-5, atol=2e-6 * float(np.abs(g_seq).max()),
                         err_msg=f"{form} d loss / d {name}")


@pytest.mark.parametrize("runner", RUNNERS)
def test_gradients_match_float64_finite_differences(runner):
    """jax.grad of the fp32 code against central differences of the float64 reference, at chosen entries
    of every input (first, last and chunk-edge tokens, and random ones). The ops compute in fp32 whatever
    the input dtype, even under jax_enable_x64, so differencing the code itself would only resolve ~1e-3;
    float64 differences with h = 1e-6 are accurate to ~1e-9, so the tolerance is that of fp32 gradients.
    T = 17 with chunk_len 16: one full chunk and a tail."""
    T = 17
    x = make_inputs(seed=7, T=T)
    args = grad_args(x, seed=8)
    _, grads = value_and_grads(runner)(*args)
    assert_grads_match_finite_differences(grads, args, runner, rtol=1e-4, atol=1e-5)


def reference_loss(r, time_decay, time_first, k, v, a0, b0, p0):
    """The loss of `value_and_grads` computed by the float64 reference."""
    y, num, den, p = reference_wkv(time_decay, time_first, k, v, (a0, b0, p0))
    return (np.sum(y * r["y"]) + np.sum(num * np.exp(-p) * r["a"]) + np.sum(den * np.exp(-p) * r["b"])
            + np.sum(p * r["p"]))


def assert_grads_match_finite_differences(grads, args, what, rtol, atol):
    """Each gradient of the loss of `value_and_grads` against central differences of `reference_loss`
    (h = 1e-6 in float64, accurate to ~1e-9) at chosen entries: first and last, random ones, and for k, v
    tokens 0, 15, 16 (either side of a chunk edge at chunk_len 16) and T-1. |jax - FD| must be within
    rtol |FD| + atol max|gradient|."""
    r = {name: np.asarray(value, np.float64) for name, value in args[-1].items()}
    primals = [np.asarray(a, np.float64) for a in args[:-1]]
    T = primals[2].shape[1]
    rng = np.random.default_rng(9)
    h = 1e-6
    for index, (name, g) in enumerate(zip(GRAD_NAMES, grads)):
        shape = primals[index].shape
        positions = [tuple(rng.integers(0, n) for n in shape) for _ in range(4)]
        if len(shape) == 3:
            positions += [(0, 0, 0), (1, 15, 3), (0, 16, 5), (1, T - 1, 7)]
        else:
            positions += [(0,) * len(shape), tuple(n - 1 for n in shape)]
        g = np.asarray(g, np.float64)
        scale = float(np.abs(g).max())
        assert scale > 1e-3, f"degenerate check: d loss / d {name} is ~0"
        for position in positions:
            plus = [p.copy() for p in primals]
            minus = [p.copy() for p in primals]
            plus[index][position] += h
            minus[index][position] -= h
            fd = (reference_loss(r, *plus) - reference_loss(r, *minus)) / (2 * h)
            assert abs(g[position] - fd) <= rtol * abs(fd) + atol * scale, \
                f"{what} d loss / d {name}{list(position)}: jax {g[position]:.8g}, float64 FD {fd:.8g}"


# ------------------------------------------------------------------- the sequential form's hand-written backward

def _scan_of_steps(time_decay, time_first, k, v, state):
    """The recurrence as a plain `lax.scan` over `wkv_step`, differentiated by JAX's autodiff."""
    def body(state, kv):
        y, state = wkv_step(time_decay, time_first, kv[0], kv[1], state)
        return state, y
    state, y_TBC = jax.lax.scan(body, state, (k.swapaxes(0, 1), v.swapaxes(0, 1)))
    return y_TBC.swapaxes(0, 1), state


def _loss_and_grads(run_fn):
    def loss(time_decay, time_first, k, v, a0, b0, p0, r):
        y, state = run_fn(time_decay, time_first, k, v, WKVState(a0, b0, p0))
        value = (jnp.sum(y.astype(r["y"].dtype) * r["y"]) + jnp.sum(state.a * r["a"])
                 + jnp.sum(state.b * r["b"]) + jnp.sum(state.p * r["p"]))
        return value, (y, state)
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))


@pytest.mark.parametrize("case", ["T=1", "two_spans_and_a_tail", "initial_p_stays_max"])
def test_sequential_gradients_match_autodiff_of_a_plain_scan(case):
    """The custom_vjp against jax.grad of the same steps in a `lax.scan`, into every input and the initial
    state. The backward recomputes spans of CHECKPOINT_EVERY tokens: T = 1 is a lone short span, then two
    full spans and a tail of 6. 'initial_p_stays_max': p_0 = 30 outlasts every k (|k| < 5, 12 tokens), so
    the final exponent is p_0 + T w and its cotangent flows into p_0; otherwise into the k that set it."""
    T = {"T=1": 1, "two_spans_and_a_tail": 2 * CHECKPOINT_EVERY + 6, "initial_p_stays_max": 12}[case]
    x = make_inputs(seed=20 + T, T=T)
    if case == "initial_p_stays_max":
        x["k"] = jnp.clip(x["k"], -5, 5)
        x["state"] = x["state"]._replace(p=jnp.full((B, C), 30.0))
    args = grad_args(x, seed=T)
    (loss, (y, state)), grads = value_and_grads("sequential")(*args)
    (loss_scan, (y_scan, _)), grads_scan = _loss_and_grads(_scan_of_steps)(*args)
    if case == "initial_p_stays_max":
        assert_close(state.p, x["state"].p + T * -np.exp(np.asarray(x["time_decay"], np.float64)), rtol=1e-6)
    assert_close(y, y_scan, rtol=1e-5, atol=1e-6)
    assert_close(loss, loss_scan, rtol=1e-6)
    for name, g, g_scan in zip(GRAD_NAMES, grads, grads_scan):
        assert_close(g, g_scan, rtol=1e-5, atol=2e-6 * float(np.abs(g_scan).max()), err_msg=f"d loss / d {name}")


@pytest.mark.parametrize("unroll", [1, 3])
def test_sequential_unroll_changes_nothing(unroll):
    """Other unroll values (3 does not divide T = 17) give the values, state and gradients of the default."""
    args = grad_args(make_inputs(seed=21, T=17), seed=22)
    (loss, (y, state)), grads = value_and_grads("sequential")(*args)
    (loss_u, (y_u, state_u)), grads_u = _loss_and_grads(functools.partial(wkv_sequential, unroll=unroll))(*args)
    assert_close(y_u, y, rtol=1e-6, atol=1e-7)
    assert_state_close(state_u, state, rtol=1e-6, atol=1e-7)
    assert_close(loss_u, loss, rtol=1e-6)
    for name, g, g_u in zip(GRAD_NAMES, grads, grads_u):
        assert_close(g_u, g, rtol=1e-6, atol=1e-7 * float(np.abs(g).max()), err_msg=f"d loss / d {name}")


def test_sequential_unroll_below_one_raises():
    x = make_inputs(seed=23, T=2, with_state=False)
    with pytest.raises(ValueError, match="unroll"):
        wkv_sequential(x["time_decay"], x["time_first"], x["k"], x["v"], unroll=0)


def test_sequential_float64_gradients_under_x64():
    """Under jax_enable_x64 with float64 inputs the backward runs in float64: gradients match float64 finite
    differences of the reference to ~1e-8, far below fp32 precision."""
    with jax.enable_x64(True):
        x = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), make_inputs(seed=24, T=17))
        args = grad_args(x, seed=25)
        args = (*args[:-1], jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), args[-1]))
        (_, (y, state)), grads = _loss_and_grads(wkv_sequential)(*args)
        assert y.dtype == jnp.float64 and all(g.dtype == jnp.float64 for g in grads)
        assert_grads_match_finite_differences(grads, args, "float64", rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("form", FORMS)
def test_empty_sequence_gradients_pass_through_the_state(form):
    """T = 0: the final state is the initial one, so its cotangent comes back unchanged, and nothing flows
    into time_decay or time_first."""
    args = grad_args(make_inputs(seed=26, T=0), seed=27)
    _, grads = _loss_and_grads(functools.partial(wkv, form=form))(*args)
    r = args[-1]
    for name, g, want in zip(GRAD_NAMES, grads, (0, 0, np.zeros((B, 0, C)), np.zeros((B, 0, C)),
                                                   r["a"], r["b"], r["p"])):
        np.testing.assert_array_equal(g, np.broadcast_to(want, g.shape), err_msg=name)


def test_sequential_bf16_gradients():
    """bf16 inputs: gradients come back in bf16, equal (to bf16 rounding) to the fp32 gradients of the
    bf16-rounded inputs with y rounded to bf16 (which rounds its cotangent too), since the arithmetic is
    fp32 either way."""
    x16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), make_inputs(seed=28, T=16))
    args16 = grad_args(x16, seed=29)
    args32 = jax.tree.map(lambda a: a.astype(jnp.float32), args16)

    def bf16_output(*inputs):
        y, state = wkv_sequential(*inputs)
        return y.astype(jnp.bfloat16), state

    _, grads16 = _loss_and_grads(wkv_sequential)(*args16)
    _, grads32 = _loss_and_grads(bf16_output)(*args32)
    for name, g16, g32 in zip(GRAD_NAMES, grads16, grads32):
        assert g16.dtype == jnp.bfloat16, name
        assert_close(g16, g32, rtol=2 ** -8, atol=1e-6 * float(np.abs(g32).max()), err_msg=name)


# ------------------------------------------------------------------------------------------------ splitting

SPLIT_T = 32  # chunk_len 16: two full chunks; pieces of 1, 16 and 31 (a chunk and a tail of 15) tokens


@pytest.mark.parametrize("split", [1, 16, SPLIT_T - 1])
@pytest.mark.parametrize("form", FORMS)
def test_split_sequence_equals_whole(form, split):
    x = make_inputs(seed=3, T=SPLIT_T)
    y_whole, state_whole = run(form, **x)
    y1, state1 = run(form, **dict(x, k=x["k"][:, :split], v=x["v"][:, :split]))
    y2, state2 = run(form, **dict(x, k=x["k"][:, split:], v=x["v"][:, split:], state=state1))
    assert_close(jnp.concatenate([y1, y2], axis=1), y_whole, rtol=1e-5, atol=1e-6, err_msg="y")
    assert_state_close(state2, state_whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("second_form", FORMS)
@pytest.mark.parametrize("first_form", FORMS)
def test_state_carries_across_forms(first_form, second_form):
    """The state is one representation: a prefix run in one form continues in any other."""
    x = make_inputs(seed=4, T=SPLIT_T)
    y_whole, state_whole = run("sequential", **x)
    y1, state1 = run(first_form, **dict(x, k=x["k"][:, :31], v=x["v"][:, :31]))
    y2, state2 = run(second_form, **dict(x, k=x["k"][:, 31:], v=x["v"][:, 31:], state=state1))
    assert_close(jnp.concatenate([y1, y2], axis=1), y_whole, rtol=1e-5, atol=1e-6)
    assert_state_close(state2, state_whole, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- robustness

@pytest.mark.parametrize("runner", RUNNERS)
def test_extreme_inputs_give_finite_values_and_gradients(runner):
    x = extreme_inputs(seed=1, T=50)
    (_, (y, state)), grads = value_and_grads(runner)(*grad_args(x, seed=1))
    assert_all_finite((y, state), "output ")
    assert_all_finite(grads, "gradient ")
    assert float(jnp.max(jnp.abs(y))) <= 60.0  # y is a weighted mean of v
    assert_close(y, reference_recurrence(**x), rtol=0, atol=60 * 1e-5, err_msg="y against float64")


@functools.cache
def _long_grad(form):
    def loss(time_decay, time_first, k, v, r):
        y, state = wkv(time_decay, time_first, k, v, form=form, chunk_len=32)
        return jnp.sum(y * r) + jnp.sum(state.a) + jnp.sum(state.b) + jnp.sum(state.p)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


LONG_T = 4096


def _long_case(form, with_grads):
    x = extreme_inputs(seed=2, T=LONG_T, batch=1)
    y, state = run(form, **x, chunk_len=32)
    assert_all_finite((y, state), f"{form} output ")
    assert float(jnp.max(jnp.abs(y))) <= 60.0
    if with_grads:
        r = jnp.asarray(np.random.default_rng(2).normal(size=y.shape), jnp.float32)
        assert_all_finite(_long_grad(form)(*x.values(), r), f"{form} gradient ")
    return x, y


@pytest.mark.parametrize("form", ["sequential", "chunked"])
def test_long_extreme_sequence_is_finite_with_gradients(form):
    _long_case(form, with_grads=True)


def test_long_extreme_sequence_is_finite_parallel():
    _long_case("parallel", with_grads=False)


@pytest.mark.slow
def test_long_extreme_sequence_parallel_gradients_are_finite():
    _long_case("parallel", with_grads=True)  # the gradient compile alone takes ~20 s on 2 CPU cores


@pytest.mark.parametrize("form", ["sequential", "parallel", "chunked"])
def test_long_extreme_sequence_accuracy_against_float64(form):
    """|y - y_float64| <= 1e-5 of v's range (60) after 4096 tokens of extreme inputs. Catches an exponent
    updated as p += w per token: with |w| << ulp(p) (time_decay ~ -8, p ~ 60) its rounding accumulates to
    ~5e-3 in y over 4096 tokens."""
    x, y = _long_case(form, with_grads=False)
    assert_close(y, reference_recurrence(**x), rtol=0, atol=60 * 1e-5)


@pytest.mark.parametrize("runner", RUNNERS)
def test_bf16_inputs(runner):
    x32 = make_inputs(seed=11, T=16, with_state=False)
    x16 = {name: value.astype(jnp.bfloat16) for name, value in x32.items()}
    y16, state16 = run(runner, **x16)
    assert y16.dtype == jnp.bfloat16
    assert all(s.dtype == jnp.float32 for s in state16)
    assert_all_finite((y16, state16), "output ")
    # The arithmetic is fp32: identical to an fp32 run on the bf16-rounded inputs, up to y's final rounding.
    y_rounded, state_rounded = run(runner, **{name: value.astype(jnp.float32) for name, value in x16.items()})
    assert_close(y16, y_rounded.astype(jnp.bfloat16), rtol=0, atol=0)
    assert_state_close(state16, state_rounded, rtol=1e-6, atol=1e-7)
    # And close to the fp32 run on the unrounded inputs: rounding k, u, time_decay to 8-bit mantissas moves
    # the log-weights by up to ~2^-9 * |x| (~1e-2 for |x| < 4) and y is rounded to bf16 once (2^-9 relative).
    y32, _ = run(runner, **x32)
    assert_close(y16, y32, rtol=1e-2, atol=3e-2)


@pytest.mark.parametrize("runner", RUNNERS)
def test_bf16_extreme_inputs_are_finite(runner):
    x = extreme_inputs(seed=5, T=16, dtype=jnp.bfloat16)
    y, state = run(runner, **x)
    assert y.dtype == jnp.bfloat16 and all(s.dtype == jnp.float32 for s in state)
    assert_all_finite((y, state), "output ")


# --------------------------------------------------------------------------------------------- empty state

def test_empty_state_is_zero_and_finite():
    state = empty_state(3, 5)
    assert all(s.shape == (3, 5) and s.dtype == jnp.float32 for s in state)
    assert np.all(np.asarray(state.a) == 0) and np.all(np.asarray(state.b) == 0)
    assert np.isfinite(EMPTY_EXPONENT) and np.all(np.asarray(state.p) == np.float32(EMPTY_EXPONENT))


@pytest.mark.parametrize("runner", RUNNERS)
def test_first_output_from_empty_state_is_v0(runner):
    """Only the bonus term e^{u+k_0} v_0 exists at t = 0, so y_0 = v_0 for any k and u; p stays finite."""
    x = extreme_inputs(seed=9, T=16)
    y, state = run(runner, **x)
    assert_close(y[:, 0], x["v"][:, 0], rtol=1e-6)
    assert np.all(np.isfinite(state.p)) and np.all(np.asarray(state.p) >= -60 - 15 * 403.5)


@pytest.mark.parametrize("runner", RUNNERS)
def test_one_token_from_empty_state_gives_exact_state(runner):
    """After one token the state is (v_0, 1, k_0): the empty part carries zero weight."""
    x = extreme_inputs(seed=10, T=1)
    _, state = run(runner, **x)
    assert_close(state.a, x["v"][:, 0], rtol=1e-6)
    assert_close(state.b, np.ones((B, C)), rtol=1e-6)
    assert_close(state.p, x["k"][:, 0], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- dispatcher

def _jaxpr(fn, x):
    return str(jax.make_jaxpr(fn)(x["time_decay"], x["time_first"], x["k"], x["v"]))


def test_default_forms():
    assert default_form("cpu") == "sequential"  # measured fastest on CPU by benchmarks/wkv.py
    # the Pallas kernels: on an H200 the 169M/430M train steps ran 2%/11% faster than with the parallel scan
    assert default_form("gpu") == "pallas"
    assert default_form("tpu") == "pallas"


def test_auto_form_is_the_backend_default():
    x = make_inputs(seed=12, T=9, with_state=False)
    auto = _jaxpr(lambda *a: wkv(*a, form="auto"), x)
    assert auto == _jaxpr(lambda *a: wkv(*a, form=default_form()), x)
    assert auto != _jaxpr(lambda *a: wkv(*a, form="chunked" if default_form() != "chunked" else "parallel"), x)


def test_dispatcher_passes_chunk_len():
    x = make_inputs(seed=13, T=9, with_state=False)
    for chunk_len in (1, 2, 4):  # T = 9: 9, 4 and 2 full chunks, each differing from chunk_len + 1
        via_wkv = _jaxpr(lambda *a: wkv(*a, form="chunked", chunk_len=chunk_len), x)
        assert via_wkv == _jaxpr(lambda *a: wkv_chunked(*a, chunk_len=chunk_len), x)
        assert via_wkv != _jaxpr(lambda *a: wkv_chunked(*a, chunk_len=chunk_len + 1), x)


@pytest.mark.parametrize("chunk_len", [1, 64])
def test_chunked_at_extreme_chunk_lengths_matches_reference(chunk_len):
    """chunk_len 1 (a scan of one-token blocks) and chunk_len > T (only the tail block)."""
    x = make_inputs(seed=14, T=16)
    y, state = run("chunked", **x, chunk_len=chunk_len)
    y_ref, num_ref, den_ref, p_ref = reference_wkv(**x)
    assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert_close(state.p, p_ref, rtol=1e-6, atol=1e-6)
    assert_close(state.b * np.exp(np.asarray(state.p, np.float64)), den_ref, rtol=1e-5)


def test_unknown_form_raises_naming_the_choices():
    x = make_inputs(seed=15, T=2, with_state=False)
    with pytest.raises(ValueError) as error:
        wkv(x["time_decay"], x["time_first"], x["k"], x["v"], form="recurrent")
    message = str(error.value)
    assert "recurrent" in message
    for choice in FORMS + ("auto",):
        assert repr(choice) in message


@pytest.mark.parametrize("chunk_len", [0, -1])
def test_chunk_len_below_one_raises(chunk_len):
    x = make_inputs(seed=16, T=4, with_state=False)
    args = (x["time_decay"], x["time_first"], x["k"], x["v"])
    with pytest.raises(ValueError, match="chunk_len"):
        wkv_chunked(*args, chunk_len=chunk_len)
    with pytest.raises(ValueError, match="chunk_len"):
        wkv(*args, form="chunked", chunk_len=chunk_len)


@pytest.mark.parametrize("form", FORMS)
def test_float64_inputs_compute_in_float64(form):
    with jax.enable_x64(True):
        zeros_C = jnp.zeros(3, jnp.float64)
        k = jnp.zeros((1, 4, 3), jnp.float64)
        v = jnp.full((1, 4, 3), 1 + 1e-12, jnp.float64)
        y, state = wkv(zeros_C, zeros_C, k, v, form=form, chunk_len=2)
        assert y.dtype == jnp.float64 and all(s.dtype == jnp.float64 for s in state)
        np.testing.assert_allclose(np.asarray(y) - 1, 1e-12, rtol=0, atol=1e-15)  # fp32 would give 0


@pytest.mark.parametrize("form", FORMS)
def test_empty_sequence_returns_the_state_unchanged(form):
    x = make_inputs(seed=3, T=1, with_state=True)
    empty = {**x, "k": x["k"][:, :0], "v": x["v"][:, :0]}
    y, state = wkv(empty["time_decay"], empty["time_first"], empty["k"], empty["v"], empty["state"], form=form)
    assert y.shape == (x["k"].shape[0], 0, x["k"].shape[2])
    for got, want in zip(state, x["state"]):
        np.testing.assert_array_equal(got, want)
