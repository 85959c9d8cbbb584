"""Tests of the Pallas WKV kernels (rwkv_jax/ops/wkv4_pallas.py), on CPU in interpret mode.

Values, final state and gradients into every input (time_decay, time_first, k, v, state.a/b/p) against
`wkv_sequential` (fp32, tight) and against float64 (the definition, tests.helpers.reference_wkv, for values, and
jax.grad of wkv_sequential run in float64 for gradients); C not a multiple of 128 (padding, several lane
blocks), T not a multiple of 16 (masked tail) and several T blocks (the state carried through scratch, the
reverse pass over blocks), bf16, extreme inputs, sequences split anywhere, both kernel variants (the Mosaic
one and the Triton one, interpreted), the Triton lowering, the sharded call on 4 simulated devices, whole-
model parity with HF, and (with libtpu installed) the Mosaic kernel compiled ahead of time for a TPU v5e 2x2
inside the real training step of configs/tiny.py, with the step's bytes per chip.

Interpret-mode compiles of the backward kernel take ~20 s on 2 CPU cores: the tests share shapes and
cached jitted functions, and the long ones are marked slow.
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

from rwkv_jax.ops.wkv4 import WKVState, wkv, wkv_sequential
from rwkv_jax.ops.wkv4_pallas import wkv_pallas
from tests.helpers import (
    WKV_GRAD_NAMES,
    assert_close,
    assert_sharded_probe_matches,
    assert_state_close,
    extreme_inputs,
    grad_args,
    make_inputs,
    reference_recurrence,
    reference_wkv,
    run_sharded_probe,
)

REPO = Path(__file__).resolve().parents[1]
GRAD_NAMES = WKV_GRAD_NAMES
C = 130  # not a multiple of 128: padded to 256, two lane blocks of 128 on the TPU variant


# ------------------------------------------------------------------------------------------------ runners

def _kernel(backend):
    """The kernel with small blocks, so that small shapes still use several channel and T blocks."""
    if backend == "tpu":
        return functools.partial(wkv_pallas, backend="tpu", interpret=True, block_c=128, block_t=16)
    return functools.partial(wkv_pallas, backend="gpu", interpret=True, block_c=64)


RUNNERS = {"tpu": _kernel("tpu"), "gpu": _kernel("gpu"), "sequential": wkv_sequential}


@functools.cache
def value_and_grads(runner):
    """f(time_decay, time_first, k, v, a0, b0, p0, r) -> ((loss, (y, state)), 7 gradients), where the loss
    uses y and every part of the final state (see tests/test_wkv.py)."""
    run = RUNNERS[runner]

    def loss(time_decay, time_first, k, v, a0, b0, p0, r):
        y, state = run(time_decay, time_first, k, v, WKVState(a0, b0, p0))
        value = (jnp.sum(y.astype(jnp.float32) * r["y"]) + jnp.sum(state.a * r["a"]) + jnp.sum(state.b * r["b"])
                 + jnp.sum(state.p * r["p"]))
        return value, (y, state)
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))


def float64_grads(args):
    """Gradients of the same loss by jax.grad of wkv_sequential computed in float64."""
    with jax.enable_x64(True):
        args64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), args)

        def loss(time_decay, time_first, k, v, a0, b0, p0, r):
            y, state = wkv_sequential(time_decay, time_first, k, v, WKVState(a0, b0, p0))
            return (jnp.sum(y * r["y"]) + jnp.sum(state.a * r["a"]) + jnp.sum(state.b * r["b"])
                    + jnp.sum(state.p * r["p"]))
        return [np.asarray(g) for g in jax.jit(jax.grad(loss, argnums=tuple(range(7))))(*args64)]


def assert_grads_close(grads, desired, rtol, atol_frac, what):
    for name, g, g_ref in zip(GRAD_NAMES, grads, desired):
        g = np.asarray(g, np.float64)
        assert np.all(np.isfinite(g)), f"{what}: d loss / d {name} is not finite"
        # Sums over up to B*T terms: the absolute tolerance is relative to the largest entry.
        assert_close(g, g_ref, rtol=rtol, atol=atol_frac * float(np.abs(g_ref).max()),
                     err_msg=f"{what}: d loss / d {name}")


# ------------------------------------------------------------------------ values, state and gradients

CASES = [pytest.param(17, 3, id="T17-B3"), pytest.param(1, 1, id="T1-B1", marks=pytest.mark.slow),
         pytest.param(256, 3, id="T256-B3", marks=pytest.mark.slow)]


def _check_against_sequential_and_float64(backend, T, batch, seed):
    x = make_inputs(seed=seed, T=T, batch=batch, channels=C)
    args = grad_args(x, seed=seed + 1)
    (loss, (y, state)), grads = value_and_grads(backend)(*args)
    (loss_seq, (y_seq, state_seq)), grads_seq = value_and_grads("sequential")(*args)

    assert y.dtype == jnp.float32 and y.shape == (batch, T, C)
    assert all(s.dtype == jnp.float32 and s.shape == (batch, C) for s in state)
    # Against the fp32 recurrence: the same arithmetic, so the same running maximum p and tight a, b.
    assert_close(y, y_seq, rtol=1e-5, atol=1e-6, err_msg="y vs sequential")
    assert_close(state.p, state_seq.p, rtol=0, atol=1e-6, err_msg="p vs sequential")
    assert_state_close(state, state_seq, rtol=1e-5, atol=1e-6, err_msg="vs sequential")
    assert_close(loss, loss_seq, rtol=1e-5)
    assert_grads_close(grads, grads_seq, rtol=1e-5, atol_frac=2e-6, what="vs sequential fp32")

    # Against float64: the definition for values, jax.grad of the float64 recurrence for gradients.
    y_ref, num_ref, den_ref, p_ref = reference_wkv(**x)
    assert_close(y, y_ref, rtol=1e-5, atol=1e-6, err_msg="y vs float64")
    assert_close(state.p, p_ref, rtol=1e-6, atol=1e-6, err_msg="p vs float64")
    scale = np.exp(np.asarray(state.p, np.float64))
    assert_close(state.a * scale, num_ref, rtol=1e-5, atol=1e-6, err_msg="a e^p vs float64")
    assert_close(state.b * scale, den_ref, rtol=1e-5, err_msg="b e^p vs float64")
    assert_grads_close(grads, float64_grads(args), rtol=1e-4, atol_frac=1e-5, what="vs float64")


@pytest.mark.parametrize("T, batch", CASES)
def test_tpu_kernel_matches_sequential_and_float64(T, batch):
    """block_t=16: T=17 is two T blocks, the second masked after one token; T=256 is 16 blocks."""
    _check_against_sequential_and_float64("tpu", T, batch, seed=T)


@pytest.mark.parametrize("T, batch", [pytest.param(17, 1, id="T17-B1"),
                                      pytest.param(5, 2, id="T5-B2", marks=pytest.mark.slow),
                                      pytest.param(256, 3, id="T256-B3", marks=pytest.mark.slow)])
def test_gpu_kernel_matches_sequential_and_float64(T, batch):
    """The Triton variant's code (rows loaded and stored one token at a time, the next chunk prefetched,
    one program per batch row), interpreted: two chunks (the last masked), one chunk, sixteen."""
    _check_against_sequential_and_float64("gpu", T, batch, seed=50 + T)


@pytest.mark.slow
def test_long_sequence_gradients_match_float64():
    """T=1000 (62 blocks of 16 and a masked tail) with moderate inputs, values and all gradients."""
    _check_against_sequential_and_float64("tpu", 1000, 1, seed=1000)


# -------------------------------------------------------------------------------- extreme inputs, bf16

@functools.cache
def _forward(backend):
    return jax.jit(RUNNERS[backend])


@pytest.mark.parametrize("T", [pytest.param(50, id="T50", marks=pytest.mark.slow), pytest.param(1000, id="T1000")])
def test_extreme_bf16_inputs_match_float64(T):
    """k, v in [-60, 60], raw time_decay in [-8, 6] (w from -3e-4 to -403), bf16. The arithmetic is fp32
    whatever the input dtype: the bf16 run equals the fp32 run on the bf16-rounded inputs up to y's final
    rounding (exactly: the same operations), and that fp32 run is within 1e-5 of v's range of the float64
    recurrence (no drift of the exponent over 1000 tokens, nothing overflows)."""
    x16 = extreme_inputs(seed=3, T=T, batch=1, channels=C, dtype=jnp.bfloat16)
    x32 = {name: value.astype(jnp.float32) for name, value in x16.items()}
    y16, state16 = _forward("tpu")(x16["time_decay"], x16["time_first"], x16["k"], x16["v"])
    y32, state32 = _forward("tpu")(x32["time_decay"], x32["time_first"], x32["k"], x32["v"])
    assert y16.dtype == jnp.bfloat16 and all(s.dtype == jnp.float32 for s in state16)
    np.testing.assert_array_equal(np.asarray(y16, np.float32), np.asarray(y32.astype(jnp.bfloat16), np.float32))
    for s16, s32 in zip(state16, state32):
        np.testing.assert_array_equal(s16, s32)
    assert np.all(np.isfinite(np.asarray(y32))) and float(jnp.max(jnp.abs(y32))) <= 60.0
    assert_close(y32, reference_recurrence(**x32), rtol=0, atol=60 * 1e-5, err_msg="y vs float64")


def test_extreme_bf16_gradients_match_sequential():
    """Gradients with extreme bf16 inputs and an empty initial state (p0 = EMPTY_EXPONENT): finite, in
    bf16 for k and v as jax.grad of the recurrence gives them, and equal to the recurrence's up to the
    final bf16 rounding of dk, dv (one bf16 ulp, 2^-8 relative) and fp32 sums elsewhere."""
    x = extreme_inputs(seed=4, T=17, batch=3, channels=C, dtype=jnp.bfloat16)
    args = grad_args(x, seed=5)
    (_, (y, state)), grads = value_and_grads("tpu")(*args)
    (_, (y_seq, state_seq)), grads_seq = value_and_grads("sequential")(*args)
    assert grads[2].dtype == grads[3].dtype == jnp.bfloat16
    assert_close(y, y_seq, rtol=2 ** -8, atol=0, err_msg="y")
    assert_state_close(state, state_seq, rtol=1e-5, atol=1e-6)
    for name, g, g_ref in zip(GRAD_NAMES, grads, grads_seq):
        g, g_ref = np.asarray(g, np.float64), np.asarray(g_ref, np.float64)
        assert np.all(np.isfinite(g)), name
        rtol = 2 ** -7 if name in ("k", "v") else 1e-4
        assert_close(g, g_ref, rtol=rtol, atol=1e-5 * float(np.abs(g_ref).max()), err_msg=f"d loss / d {name}")


@pytest.mark.slow
def test_long_extreme_gradients_are_as_accurate_as_the_recurrence():
    """T=1000 of extreme inputs: every gradient is finite and its error against float64 (jax.grad of the
    float64 recurrence) is within 3x that of jax.grad of the fp32 recurrence, entry by entry up to 1e-6 of
    the largest gradient. (A reverse pass with its own running maximum failed this by 10-100x.)"""
    x = extreme_inputs(seed=6, T=1000, batch=1, channels=C)
    args = grad_args(x, seed=7)
    (_, (y, state)), grads = value_and_grads("tpu")(*args)
    (_, (y_seq, _)), grads_seq = value_and_grads("sequential")(*args)
    assert_close(y, y_seq, rtol=1e-5, atol=60 * 1e-6)
    for name, g, g_seq, g64 in zip(GRAD_NAMES, grads, grads_seq, float64_grads(args)):
        g, g_seq = np.asarray(g, np.float64), np.asarray(g_seq, np.float64)
        assert np.all(np.isfinite(g)), name
        floor = 1e-6 * float(np.abs(g64).max())
        excess = np.abs(g - g64) - (3 * np.abs(g_seq - g64) + floor)
        assert excess.max() <= 0, f"d loss / d {name}: error {np.abs(g - g64).max():.3g} vs recurrence's " \
                                   f"{np.abs(g_seq - g64).max():.3g}"


# ------------------------------------------------------------------------------------------- splitting

@pytest.mark.parametrize("split", [pytest.param(1, marks=pytest.mark.slow), 16])
def test_split_sequence_equals_whole(split):
    """Two kernel calls with the state carried equal one call (17 tokens split at 1 and 16: a one-token
    piece, and a whole chunk followed by one token)."""
    x = make_inputs(seed=8, T=17, batch=3, channels=C)
    run = _forward("tpu")
    y_whole, state_whole = run(x["time_decay"], x["time_first"], x["k"], x["v"], x["state"])
    y1, state1 = run(x["time_decay"], x["time_first"], x["k"][:, :split], x["v"][:, :split], x["state"])
    y2, state2 = run(x["time_decay"], x["time_first"], x["k"][:, split:], x["v"][:, split:], state1)
    assert_close(jnp.concatenate([y1, y2], axis=1), y_whole, rtol=1e-5, atol=1e-6)
    assert_state_close(state2, state_whole, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_gradients_flow_through_a_split():
    """jax.grad through two kernel calls joined by the state (split at token 5 of 17) equals the
    gradients of one sequential call: the initial-state gradients of the second call are right."""
    x = make_inputs(seed=9, T=17, batch=3, channels=C)
    args = grad_args(x, seed=10)
    kernel = RUNNERS["tpu"]

    def loss(time_decay, time_first, k, v, a0, b0, p0, r):
        y1, state = kernel(time_decay, time_first, k[:, :5], v[:, :5], WKVState(a0, b0, p0))
        y2, state = kernel(time_decay, time_first, k[:, 5:], v[:, 5:], state)
        y = jnp.concatenate([y1, y2], axis=1)
        return (jnp.sum(y * r["y"]) + jnp.sum(state.a * r["a"]) + jnp.sum(state.b * r["b"])
                + jnp.sum(state.p * r["p"]))

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(7))))(*args)
    _, grads_seq = value_and_grads("sequential")(*args)
    assert_grads_close(grads, grads_seq, rtol=1e-5, atol_frac=2e-6, what="split at 5")


def test_state_carries_between_kernel_and_sequential():
    """The kernel's state is the same representation: a prefix by the kernel continues sequentially."""
    x = make_inputs(seed=11, T=17, batch=3, channels=C)
    y_whole, state_whole = wkv_sequential(x["time_decay"], x["time_first"], x["k"], x["v"], x["state"])
    y1, state1 = _forward("tpu")(x["time_decay"], x["time_first"], x["k"][:, :16], x["v"][:, :16], x["state"])
    y2, state2 = wkv_sequential(x["time_decay"], x["time_first"], x["k"][:, 16:], x["v"][:, 16:], state1)
    assert_close(jnp.concatenate([y1, y2], axis=1), y_whole, rtol=1e-5, atol=1e-6)
    assert_state_close(state2, state_whole, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- edges and dispatcher

def test_one_token_from_empty_state():
    """y_0 = v_0 and the state is exactly (v_0, 1, k_0) after one token from the empty state."""
    x = extreme_inputs(seed=12, T=1, batch=3, channels=C)
    y, state = _forward("tpu")(x["time_decay"], x["time_first"], x["k"], x["v"])
    assert_close(y[:, 0], x["v"][:, 0], rtol=1e-6)
    assert_close(state.a, x["v"][:, 0], rtol=1e-6)
    assert_close(state.b, np.ones((3, C)), rtol=1e-6)
    np.testing.assert_array_equal(state.p, x["k"][:, 0])


def test_empty_sequence_returns_the_state():
    x = make_inputs(seed=13, T=1, batch=2, channels=C)
    y, state = wkv_pallas(x["time_decay"], x["time_first"], x["k"][:, :0], x["v"][:, :0], x["state"])
    assert y.shape == (2, 0, C)
    for got, want in zip(state, x["state"]):
        np.testing.assert_array_equal(got, want)


def test_dispatcher_form_pallas_is_the_kernel():
    x = make_inputs(seed=14, T=17, batch=3, channels=C)
    y, state = jax.jit(lambda *a: wkv(*a, form="pallas"))(x["time_decay"], x["time_first"], x["k"], x["v"],
                                                           x["state"])
    y_seq, state_seq = wkv_sequential(x["time_decay"], x["time_first"], x["k"], x["v"], x["state"])
    assert_close(y, y_seq, rtol=1e-5, atol=1e-6)
    assert_state_close(state, state_seq, rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise_clear_errors():
    x = make_inputs(seed=15, T=4, batch=1, channels=8, with_state=False)
    args = (x["time_decay"], x["time_first"], x["k"], x["v"])
    with pytest.raises(ValueError, match="backend"):
        wkv_pallas(*args, backend="cuda")
    with pytest.raises(ValueError, match="block_c"):
        wkv_pallas(*args, backend="tpu", block_c=100)
    with pytest.raises(ValueError, match="block_c"):
        wkv_pallas(*args, backend="gpu", block_c=48)
    with jax.enable_x64(True):
        with pytest.raises(ValueError, match="float64"):
            wkv_pallas(*(jnp.asarray(np.asarray(a), jnp.float64) for a in args))


# ------------------------------------------------------------------------------------------- lowerings

def test_triton_lowering_of_forward_and_backward():
    """The GPU variant lowers to Triton IR for CUDA from this CPU host (jax lowers Pallas to the Triton
    dialect itself; turning that into PTX needs a GPU and is left to benchmarks/device.sh)."""
    B, T, channels = 3, 100, 200
    dtype = jnp.bfloat16

    def loss(time_decay, time_first, k, v):
        y, state = wkv_pallas(time_decay, time_first, k, v, backend="gpu", interpret=False)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state.a) + jnp.sum(state.p)

    spec_c = jax.ShapeDtypeStruct((channels,), jnp.float32)
    spec = jax.ShapeDtypeStruct((B, T, channels), dtype)
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(spec_c, spec_c, spec, spec).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("triton") >= 2  # the forward and the backward kernel


def _kernel_jaxprs(jaxpr):
    """The kernel bodies of the pallas_calls inside `jaxpr` (searched through nested jaxprs)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn.params["jaxpr"])
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns") and eqn.primitive.name != "pallas_call":
                found += _kernel_jaxprs(inner)
    return found


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


def test_triton_kernels_move_one_token_row_per_load_and_store():
    """O(1) work per token on GPU: every load and store of the Triton kernels moves one row [1, 1, block_c]
    (no [T, block_c] block with rows picked out by masked sums: no reductions, no iota masks)."""
    B, T, channels = 3, 40, 200

    def loss(time_decay, time_first, k, v):
        y, state = wkv_pallas(time_decay, time_first, k, v, backend="gpu", interpret=False, block_c=32)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state.a)

    spec_c = jax.ShapeDtypeStruct((channels,), jnp.float32)
    spec = jax.ShapeDtypeStruct((B, T, channels), jnp.bfloat16)
    kernels = _kernel_jaxprs(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(spec_c, spec_c, spec, spec).jaxpr)
    assert len(kernels) == 2  # the forward and the backward
    for kernel in kernels:
        equations = list(_equations(kernel))
        moved = [eqn.outvars[0].aval.shape if eqn.primitive.name == "get" else eqn.invars[1].aval.shape
                 for eqn in equations if eqn.primitive.name in ("get", "swap")]
        assert len(moved) > 2 * 16 and set(moved) == {(1, 1, 32)}, set(moved)
        assert not {eqn.primitive.name for eqn in equations} & {"reduce_sum", "iota"}


def _libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


needs_libtpu = pytest.mark.skipif(not _libtpu_available(),
                                  reason="libtpu is not installed (pip install -r requirements-dev.txt): the "
                                         "ahead-of-time TPU compile needs it, not a TPU")


def _tpu_aot_probe(mode, forms, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "wkv_pallas_tpu_aot_probe.py"), mode,
                           "tiny", forms], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"probe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {row["form"]: row for row in rows}


@needs_libtpu
def test_tpu_aot_wkv_bytes_fall_at_least_5x():
    """WKV forward+backward at the tiny step's layer shape (16 x 128 x 128, bf16, batch over 4 chips),
    compiled for TPU v5e 2x2: the Mosaic kernel is in the program, and cost_analysis() counts >= 5x fewer
    bytes per chip than the associative scan (measured ~30x)."""
    rows = _tpu_aot_probe("wkv", "parallel,pallas")
    assert rows["pallas"]["mosaic_calls"] >= 2 and rows["parallel"]["mosaic_calls"] == 0
    assert rows["parallel"]["bytes"] >= 5 * rows["pallas"]["bytes"], rows


@pytest.mark.slow
@needs_libtpu
def test_tpu_aot_train_step_of_tiny_config_compiles_with_the_kernel():
    """The real jitted train step of configs/tiny.py on a TPU v5e 2x2 mesh (batch over the 4 chips), WKV
    by the Mosaic kernel inside shard_map, compiled ahead of time; the step's bytes per chip fall against
    the associative scan (tiny: WKV is a small part of the step; measured 7.3e8 -> 4.6e8)."""
    rows = _tpu_aot_probe("step", "parallel,pallas")
    assert rows["pallas"]["devices"] == 4
    assert rows["pallas"]["mosaic_calls"] >= 2 * 4  # forward and backward in each of the 4 layers
    assert rows["pallas"]["bytes"] < 0.8 * rows["parallel"]["bytes"], rows


# -------------------------------------------------------------------------------------------- sharding

@pytest.mark.slow
def test_sharded_kernel_on_four_devices_matches_sequential():
    """shard_map over (data 2, tensor 2) on 4 simulated CPU devices: values, state and every gradient
    (time_decay/time_first summed over the batch shards) equal wkv_sequential's."""
    assert_sharded_probe_matches(run_sharded_probe())


# ------------------------------------------------------------------------------------------ whole model

def test_model_with_kernel_matches_hf(tmp_path):
    """Whole-model parity: wkv_form='pallas' logits within 1e-4 of HF transformers' RwkvForCausalLM (the
    same random model and tokens as tests/test_peer_parity.py, T=72)."""
    from flax import nnx

    from rwkv_jax.io import weights
    from tests import peers

    tokens = np.random.default_rng(0).integers(0, 97, (2, 72))
    hf = peers.random_hf_model(vocab_size=97, d_model=32, n_layer=3, seed=0)
    reference = peers.hf_logits(hf, tokens)
    hf.save_pretrained(tmp_path / "hf")
    model = weights.load_model(tmp_path / "hf", wkv_form="pallas")
    logits, _ = nnx.jit(lambda model, tokens: model(tokens))(model, jnp.asarray(tokens))
    assert np.abs(np.asarray(logits) - reference).max() < 1e-4
