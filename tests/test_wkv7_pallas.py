"""Tests of the WKV-7 Pallas kernel (rwkv_jax/ops/wkv7_pallas.py), on CPU in interpret mode.

Values, final state and the gradients into r, w, k, v, a, b and the initial state against the float64
recurrence (tests.helpers.wkv7_reference, and float64 autodiff of a plain lax.scan for gradients), relative
to the largest magnitude of each reference quantity: T of one token, a masked tail (17), 16 chunks (256)
and 1000 (slow); decays at both ends of the model's range; bf16 inputs; every chunk length; document
resets (into a learned reset state too); the state handed between the kernel and the chunked form; the
dispatcher, 'auto' on TPU, bad arguments; the cost
estimates; the kernel under shard_map on 4 simulated devices (slow) and, with libtpu installed, compiled
ahead of time for a TPU v5e 2x2 inside the real train step of configs/rwkv7_tiny.py (slow).

The kernel is compiled in interpret mode once per shape (~5 s for forward and backward on 2 CPU cores):
the cases use head size 32 (the tiny config's) and few heads, and share shapes where they can.
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax.ops import wkv7 as ops
from rwkv_jax.ops.wkv7_pallas import wkv7_pallas as kernel
from tests.helpers import (
    WKV7_W_MIN,
    rel_err,
    wkv7_inputs,
    wkv7_reference,
    wkv7_reference_grads,
)

REPO = Path(__file__).resolve().parents[1]
FP32_RTOL = 1e-5
H, N = 2, 32
NAMES = "r w k v a b state".split()


def _case(B, T, seed, decay="mixed", heads=H, head_size=N):
    """Inputs, random cotangents (dy, dS) and the float64 references (y, S, the 7 gradients)."""
    streams, state = wkv7_inputs(B, T, seed=seed, decay=decay, heads=heads, N=head_size)
    y_ref, S_ref = wkv7_reference(*streams, state)
    rng = np.random.default_rng(seed)
    dy, dS = rng.normal(size=y_ref.shape).astype(np.float32), rng.normal(size=S_ref.shape).astype(np.float32)
    return streams, state, dy, dS, y_ref, S_ref, wkv7_reference_grads(streams, state, dy, dS)


@functools.cache
def _jitted(chunk_len, backend="tpu"):
    def run(streams, state, dy, dS):
        (y, S), pullback = jax.vjp(lambda *a: kernel(*a, chunk_len=chunk_len, backend=backend), *streams, state)
        return y, S, pullback((dy, dS))
    return jax.jit(run)


_forward = jax.jit(kernel)  # the forward alone at the default chunk (16)


def _assert_matches_reference(B, T, seed, decay="mixed", chunk_len=16, heads=H, head_size=N, backend="tpu"):
    streams, state, dy, dS, y_ref, S_ref, grads_ref = _case(B, T, seed, decay, heads, head_size)
    y, S, grads = _jitted(chunk_len, backend)(streams, state, dy, dS)
    assert y.dtype == S.dtype == jnp.float32 and S.shape == (B, heads, head_size, head_size)
    assert rel_err(y, y_ref) < FP32_RTOL and rel_err(S, S_ref) < FP32_RTOL
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert g.dtype == jnp.float32 and g.shape == g_ref.shape, name
        assert rel_err(g, g_ref) < FP32_RTOL, (name, rel_err(g, g_ref))


GPU_SLOW = pytest.mark.slow  # the interpreted Triton kernel walks tokens one by one: its longer cases are slow


@pytest.mark.parametrize("backend,B,T,heads", [
    ("tpu", 1, 1, H), ("tpu", 2, 17, H), ("tpu", 1, 256, 1), ("gpu", 2, 17, H),
    pytest.param("gpu", 1, 1, H, marks=GPU_SLOW), pytest.param("gpu", 1, 256, 1, marks=GPU_SLOW)])
def test_values_state_and_gradients_match_float64(backend, B, T, heads):
    """One token (15 padding tokens), a masked tail across two chunks (GPU: two checkpoint spans),
    sixteen chunks; the Mosaic kernel and the Triton one, both interpreted."""
    _assert_matches_reference(B, T, seed=T, heads=heads, backend=backend)


@pytest.mark.parametrize("decay", ["fast", "slow"])
def test_decays_at_both_ends_of_their_range(decay):
    """w near the model's smallest decay 0.545 (the pairwise decays reach e^{-0.6 * 15} within a chunk)
    and w within 1e-5 of 1 (log w near fp32's resolution)."""
    streams, *_ = _case(2, 17, seed=1, decay=decay)
    w = streams[1]
    assert (w.max() < WKV7_W_MIN + 0.01) if decay == "fast" else (w.min() > 1 - 1e-5)
    _assert_matches_reference(2, 17, seed=1, decay=decay)


@pytest.mark.parametrize("chunk_len", [32, pytest.param(64, marks=pytest.mark.slow)])
def test_longer_chunks_and_head_size_64(chunk_len):
    """The model's default chunk (32) and the longest (64, fast decays: factors up to e^{0.61 * 32}),
    at the released models' head size 64: two chunks, the second partly padding."""
    _assert_matches_reference(1, chunk_len + 5, seed=2, decay="fast", chunk_len=chunk_len, heads=1, head_size=64)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_long_sequence_matches_float64(backend):
    _assert_matches_reference(1, 1000, seed=9, heads=1, backend=backend)


def test_bf16_inputs():
    """bf16 streams: y in bf16 (rounded: 8 significant bits), the state fp32 arithmetic on the bf16 values,
    the gradients in the inputs' dtypes and, before their rounding, the float64 ones of the bf16 values."""
    streams, state = wkv7_inputs(2, 17, seed=4, heads=H, N=N)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in streams]
    as_f32 = [np.asarray(x, np.float32) for x in bf16]
    y_ref, S_ref = wkv7_reference(*as_f32, state)
    rng = np.random.default_rng(4)
    dy, dS = rng.normal(size=y_ref.shape).astype(np.float32), rng.normal(size=S_ref.shape).astype(np.float32)
    grads_ref = wkv7_reference_grads(as_f32, state, np.asarray(jnp.asarray(dy, jnp.bfloat16), np.float32), dS)
    y, S, grads = _jitted(16)(bf16, state, jnp.asarray(dy, jnp.bfloat16), dS)
    assert y.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert rel_err(y, y_ref) < 2 ** -8 and rel_err(S, S_ref) < FP32_RTOL
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 6 + [jnp.float32]
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert rel_err(g, g_ref) < (2 ** -8 if g.dtype == jnp.bfloat16 else FP32_RTOL), name


@pytest.mark.slow  # every case above already starts from a random state and checks the final one
def test_state_carries_between_kernel_and_chunked_form():
    """A sequence split at 17 and 23: the kernel's final state continues in the chunked form and back."""
    streams, state = wkv7_inputs(2, 40, seed=5, heads=H, N=N)
    y_ref, S_ref = wkv7_reference(*streams, state)
    first, second, third = ([x[:, a:b] for x in streams] for a, b in ((0, 17), (17, 23), (23, 40)))
    y1, S1 = _forward(*first, state)
    y2, S2 = ops.wkv7_chunked(*second, S1)
    y3, S3 = _forward(*third, S2)
    assert rel_err(np.concatenate([y1, y2, y3], axis=1), y_ref) < FP32_RTOL
    assert rel_err(S3, S_ref) < FP32_RTOL


def test_zero_state_and_empty_sequence():
    streams, _ = wkv7_inputs(2, 17, seed=6, heads=H, N=N)
    y, S = _forward(*streams)                                 # no state: zeros
    y_ref, S_ref = wkv7_reference(*streams, np.zeros((2, H, N, N), np.float32))
    assert rel_err(y, y_ref) < FP32_RTOL and rel_err(S, S_ref) < FP32_RTOL
    y0, S0 = kernel(*(x[:, :0] for x in streams), S)
    assert y0.shape == (2, 0, H, N) and np.array_equal(S0, S)


def test_dispatcher_and_auto_form():
    """wkv7(form='pallas') is the kernel; model.wkv_form='auto' picks it on TPU only (the Triton kernel
    has not run on a GPU yet)."""
    from rwkv_jax.model import ModelConfig

    streams, state = wkv7_inputs(1, 3, seed=6, heads=H, N=N)
    via_dispatcher = jax.make_jaxpr(lambda *a: ops.wkv7(*a, form="pallas", chunk_len=16))(*streams, state)
    assert "pallas_call" in str(via_dispatcher)
    picks = {p: ModelConfig.from_dict({"version": 7, "wkv_form": "auto"}, platform=p).wkv_form
             for p in ("cpu", "gpu", "tpu")}
    assert picks == {"cpu": "chunked", "gpu": "chunked", "tpu": "pallas"}
    assert ModelConfig.from_dict({"version": 7, "wkv_form": "pallas"}).wkv_form == "pallas"
    # a model loaded to run without gradients: the sequential form's one scan on CPU; the same elsewhere
    loaded = {p: ModelConfig.from_dict({"version": 7, "wkv_form": "auto"}, platform=p, inference=True).wkv_form
              for p in ("cpu", "gpu", "tpu")}
    assert loaded == {"cpu": "sequential", "gpu": "chunked", "tpu": "pallas"}
    assert ModelConfig.from_dict({"version": 4}, platform="cpu", inference=True).wkv_form == "sequential"


RESETS = {0: [5, 9, 32], 2: [0, 16]}  # row 1 never resets; two in one chunk; at chunk starts (0, 16, 32)


def _reset_reference_grads(streams, state, reset_BT, R, dy, dS):
    """float64 cotangents of (r, w, k, v, a, b, state, R) with resets: autodiff of the plain recurrence
    as a lax.scan whose state entering token t is R where reset_BT[:, t]."""
    def run(*args):
        *xs, S0, R_HNN = args

        def token(S, x):
            r, w, k, v, a, b, reset = x
            S = jnp.where(reset[:, None, None, None], R_HNN, S)
            Sa = jnp.einsum("bhij,bhj->bhi", S, a)
            S = S * w[:, :, None, :] + Sa[..., None] * b[:, :, None, :] + v[..., None] * k[:, :, None, :]
            return S, jnp.einsum("bhij,bhj->bhi", S, r)
        S, y = jax.lax.scan(token, S0, (*(jnp.moveaxis(x, 1, 0) for x in xs), jnp.asarray(reset_BT).T))
        return jnp.moveaxis(y, 0, 1), S

    with jax.enable_x64(True):
        f64 = lambda x: jnp.asarray(x, jnp.float64)
        _, pullback = jax.vjp(run, *map(f64, (*streams, state, R)))
        return [np.asarray(g) for g in pullback((f64(dy), f64(dS)))]


@pytest.mark.parametrize("backend,learned", [("tpu", True), pytest.param("tpu", False, marks=pytest.mark.slow),
                                             pytest.param("gpu", True, marks=GPU_SLOW)])
def test_resets_match_float64(backend, learned):
    """Document resets (data.reset_at_eot) to a learned [H, N, N] state or to zeros: values and state equal
    the float64 recurrence with resets, and every gradient (into R too) float64 autodiff's of it."""
    B, T = 3, 40
    streams, state = wkv7_inputs(B, T, seed=7, heads=1, N=N)
    reset_BT = np.zeros((B, T), bool)
    for row, cuts in RESETS.items():
        reset_BT[row, cuts] = True
    R = np.random.default_rng(7).normal(0, 0.3, (1, N, N)).astype(np.float32) if learned else np.zeros(
        (1, N, N), np.float32)
    y_ref, S_ref = wkv7_reference(*streams, state, reset_BT, R)
    rng = np.random.default_rng(8)
    dy, dS = rng.normal(size=y_ref.shape).astype(np.float32), rng.normal(size=S_ref.shape).astype(np.float32)
    expected = _reset_reference_grads(streams, state, reset_BT, R, dy, dS)
    run = lambda *a: kernel(*a[:7], backend=backend, reset_BT=reset_BT, reset_state=a[7] if learned else None)
    (y, S), pullback = jax.vjp(run, *streams, state, R)
    assert rel_err(y, y_ref) < FP32_RTOL and rel_err(S, S_ref) < FP32_RTOL
    grads = pullback((jnp.asarray(dy), jnp.asarray(dS)))
    for name, g, g_ref in zip([*NAMES, "reset_state"], grads, expected):
        if name == "reset_state" and not learned:
            assert np.all(np.asarray(g) == 0)                # zeros by default: the given R is not used
        else:
            assert rel_err(g, g_ref) < FP32_RTOL, (name, rel_err(g, g_ref))


def test_refusals_name_the_problem():
    streams, state = wkv7_inputs(1, 4, seed=0, heads=H, N=N)
    with pytest.raises(ValueError, match="reset_state was given without"):
        kernel(*streams, state, reset_state=state)
    with pytest.raises(ValueError, match="chunk_len must be one of"):
        kernel(*streams, state, chunk_len=8)
    with pytest.raises(ValueError, match="state must be"):
        kernel(*streams, state[:, :1])
    with pytest.raises(ValueError, match="power-of-2 head size"):
        kernel(*(x[..., :24] for x in streams), backend="gpu")
    with pytest.raises(ValueError, match="unknown Pallas backend"):
        kernel(*streams, state, backend="cuda")
    with jax.enable_x64(True), pytest.raises(ValueError, match="float64"):
        kernel(*(jnp.asarray(x, jnp.float64) for x in streams), state)


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs in its equations' parameters (not inside kernels)."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name == "pallas_call":
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_cost_estimates_on_both_calls(backend):
    """Both pallas_calls carry a pl.CostEstimate (XLA's cost_analysis() counts Mosaic calls by it)."""
    streams, state = wkv7_inputs(1, 32, seed=0, heads=H, N=N)
    loss = lambda *a: kernel(*a, backend=backend)[1].sum()
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(7))))(*streams, state)
    calls = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "pallas_call"]
    name = lambda e: str(e.params.get("name", e.params.get("name_and_src_info")))
    estimates = {kind: e.params["cost_estimate"] for e in calls for kind in ("wkv7_forward", "wkv7_backward")
                 if kind in name(e)}
    assert len(calls) == 2 and len(estimates) == 2, [name(e) for e in calls]
    for estimate in estimates.values():   # the Triton kernel's recurrence has no exp or log
        assert estimate.flops > 0 and estimate.bytes_accessed > 0
        assert (estimate.transcendentals > 0) == (backend == "tpu")
    assert estimates["wkv7_backward"].flops > estimates["wkv7_forward"].flops


@pytest.mark.parametrize("resets", [False, True])
def test_triton_lowering_of_forward_and_backward(resets):
    """The GPU variant lowers to Triton IR for CUDA from this CPU host at head size 64, bf16 streams, with
    and without resets (jax lowers Pallas to the Triton dialect itself; PTX needs a GPU)."""
    B, T, heads, head_size = 2, 40, 2, 64
    stream = jax.ShapeDtypeStruct((B, T, heads, head_size), jnp.bfloat16)
    state = jax.ShapeDtypeStruct((B, heads, head_size, head_size), jnp.float32)
    extra = [jax.ShapeDtypeStruct((B, T), jnp.bool_), jax.ShapeDtypeStruct(state.shape[1:], jnp.float32)]

    def loss(*a):
        kw = dict(reset_BT=a[7], reset_state=a[8]) if resets else {}
        y, S = kernel(*a[:7], backend="gpu", interpret=False, **kw)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(S)
    args = [stream] * 6 + [state] + (extra if resets else [])
    lowered = jax.jit(jax.grad(loss, argnums=tuple(range(7)))).trace(*args).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("triton") >= 2  # the forward and the backward kernel


# -------------------------------------------------------------------------- mesh and ahead-of-time TPU

@pytest.mark.slow
def test_sharded_kernel_on_four_devices_matches_chunked():
    """shard_map over (data 2, tensor 2) on 4 simulated CPU devices, directly and through
    wkv7(form='pallas') under activation_sharding, and with resets to a given state: values, state and all
    7 gradients equal wkv7_chunked's."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=4"]))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "wkv7_pallas_sharded_probe.py")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("sharded", "dispatcher", "sharded_resets"):
        assert out[name]["mosaic_or_interpret_calls"] >= 2, out
        assert max(out[name]["errors"]) < FP32_RTOL, out


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -r requirements-dev.txt): the "
                                         "ahead-of-time TPU compile needs it, not a TPU")


@pytest.mark.slow
@needs_libtpu
def test_tpu_aot_train_step_of_rwkv7_tiny_compiles_with_the_kernel():
    """The real jitted train step of configs/rwkv7_tiny.py on a TPU v5e 2x2 mesh (batch over the 4 chips),
    WKV-7 by the Mosaic kernel inside shard_map, compiled ahead of time: forward and backward kernels in
    each of the 4 layers (the chunked form's step has none), and fewer bytes per chip than with it."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "wkv_pallas_tpu_aot_probe.py"), "step",
                           "rwkv7_tiny", "chunked,pallas"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"probe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    rows = {row["form"]: row for row in map(json.loads, filter(lambda s: s.startswith("{"),
                                                                   proc.stdout.splitlines()))}
    assert rows["pallas"]["devices"] == 4
    assert rows["pallas"]["mosaic_calls"] >= 2 * 4 and rows["chunked"]["mosaic_calls"] == 0, rows
    # Bytes per chip (the kernels' share is their pl.CostEstimate): measured 1.53e9 with the chunked form's
    # per-chunk scan against 7.36e8 with the kernel (FLOPs 4.76e9 and 5.88e9, the latter estimated).
    assert 0 < rows["pallas"]["bytes"] < 0.8 * rows["chunked"]["bytes"], rows


@pytest.mark.slow
@needs_libtpu
def test_tpu_aot_kernel_with_resets_compiles_at_head_size_64():
    """The Mosaic lowering of forward and backward with document resets to a learned state, at the released
    models' head size 64 and the model's default chunk (32), compiled ahead of time for a v5e chip."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "wkv7_pallas_tpu_aot_probe.py"), "64",
                           "32"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"probe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    row = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert row["mosaic_calls"] == 2 and row["flops"] > 0, row
