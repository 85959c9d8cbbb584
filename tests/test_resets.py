"""Tests of document resets inside a packed window (issue 13, point 3).

A packed row with `reset_BT` must equal running each document on its own from the reset state: every WKV
form (sequential, parallel, chunked with a chunk length that does not divide the documents, and the
Pallas kernel in interpret mode) in values, final state and gradients (into time_decay, time_first, k, v,
the initial state and the reset state) against a float64 reference that runs the documents one by one
without resets; reset at t=0, consecutive resets and no resets. The whole model (scan_layers both ways):
the logits of a packed row equal each document's logits run separately. The data layer marks the eot
inputs, and a short training run with data.reset_at_eot=True works.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax.ops.wkv4 import WKVState, empty_state, wkv, wkv_parallel
from tests.helpers import assert_close, make_inputs

B, T, C = 2, 40, 8
CHUNK_LEN = 6  # 40 = 6 x 6 + 4: blocks that do not line up with the documents
GRAD_NAMES = ("time_decay", "time_first", "k", "v", "state.a", "state.b", "state.p",
              "reset.a", "reset.b", "reset.p")
# Reset positions per row: several documents, a reset at 0, consecutive resets, resets around the
# sequential backward's checkpoint every 32 tokens, one reset, the last token, no reset.
MASKS = {
    "packed": [[0, 5, 6, 13, 31, 32, 33], [7]],
    "consecutive": [[3, 4, 5], [1, 2, 39]],
    "none": [[], []],
}


def reset_mask(name):
    mask = np.zeros((B, T), bool)
    for row, positions in enumerate(MASKS[name]):
        mask[row, positions] = True
    return jnp.asarray(mask)


def reset_state_of(seed, empty):
    if empty:
        return empty_state(B, C)
    rng = np.random.default_rng(seed)
    return WKVState(*(jnp.asarray(x, jnp.float32) for x in (
        rng.normal(size=(B, C)), rng.uniform(0.5, 2.0, (B, C)), rng.normal(size=(B, C)))))


def weights(seed):
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray(rng.normal(size=shape), jnp.float32)
            for name, shape in (("y", (B, T, C)), ("a", (B, C)), ("b", (B, C)), ("p", (B, C)))}


def _loss(y, state, r):
    return (jnp.sum(y * r["y"]) + jnp.sum(state.a * r["a"]) + jnp.sum(state.b * r["b"])
            + jnp.sum(state.p * r["p"]))


@functools.cache
def value_and_grads(form, **kwargs):
    """f(time_decay, time_first, k, v, a0, b0, p0, ra, rb, rp, reset_BT, r) -> ((loss, (y, state)),
    10 gradients) of one form with resets."""
    def loss(time_decay, time_first, k, v, a0, b0, p0, ra, rb, rp, reset_BT, r):
        if form.startswith("pallas"):
            from rwkv_jax.ops.wkv4_pallas import wkv_pallas
            y, state = wkv_pallas(time_decay, time_first, k, v, WKVState(a0, b0, p0), reset_BT=reset_BT,
                                  interpret=True, **kwargs)
        else:
            y, state = wkv(time_decay, time_first, k, v, WKVState(a0, b0, p0), form=form, reset_BT=reset_BT,
                           reset_state=WKVState(ra, rb, rp), **kwargs)
        return _loss(y.astype(jnp.float32), state, r), (y, state)
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(10)), has_aux=True))


def reference(args, reset_BT):
    """float64: each row's documents run one by one by `wkv_parallel` without resets (the first from the
    initial state, the others from the reset state); the loss and its 10 gradients by jax.grad."""
    mask = np.asarray(reset_BT)
    with jax.enable_x64(True):
        args64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), args)

        def loss(time_decay, time_first, k, v, a0, b0, p0, ra, rb, rp, r):
            ys, finals = [], []
            for row in range(B):
                starts = sorted({0, *np.flatnonzero(mask[row]).tolist()})
                state = WKVState(a0[row:row + 1], b0[row:row + 1], p0[row:row + 1])
                for s, e in zip(starts, starts[1:] + [T]):
                    if mask[row, s]:
                        state = WKVState(ra[row:row + 1], rb[row:row + 1], rp[row:row + 1])
                    y, state = wkv_parallel(time_decay, time_first, k[row:row + 1, s:e], v[row:row + 1, s:e],
                                            state)
                    ys.append(y)
                finals.append(state)
            y = jnp.concatenate(ys, axis=1).reshape(B, T, C)
            state = WKVState(*(jnp.concatenate(parts) for parts in zip(*finals)))
            return _loss(y, state, r), (y, state)
        (value, (y, state)), grads = jax.value_and_grad(loss, argnums=tuple(range(10)), has_aux=True)(*args64)
        return value, np.asarray(y), WKVState(*map(np.asarray, state)), [np.asarray(g) for g in grads]


def make_args(seed, empty_reset=False):
    x = make_inputs(seed, T, batch=B, channels=C)
    return (x["time_decay"], x["time_first"], x["k"], x["v"], *x["state"],
            *reset_state_of(seed + 1, empty_reset))


def check_form(form, mask_name, seed=0, empty_reset=False, rtol=1e-4, **kwargs):
    args = make_args(seed, empty_reset)
    reset_BT, r = reset_mask(mask_name), weights(seed + 2)
    (value, (y, state)), grads = value_and_grads(form, **kwargs)(*args, reset_BT, r)
    value_ref, y_ref, state_ref, grads_ref = reference(args + (r,), reset_BT)
    assert_close(y, y_ref, rtol=rtol, atol=1e-5, err_msg=f"{form} y")
    assert_close(state.p, state_ref.p, rtol=rtol, atol=1e-5, err_msg=f"{form} state.p")
    assert_close(state.a, state_ref.a, rtol=rtol, atol=1e-5, err_msg=f"{form} state.a")
    assert_close(state.b, state_ref.b, rtol=rtol, atol=1e-5, err_msg=f"{form} state.b")
    assert_close(value, value_ref, rtol=rtol)
    names = GRAD_NAMES if not empty_reset else GRAD_NAMES[:7]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert np.all(np.isfinite(np.asarray(g))), f"{form}: d loss / d {name} is not finite"
        assert_close(g, g_ref, rtol=rtol, atol=1e-5 * float(np.abs(g_ref).max() + 1),
                     err_msg=f"{form}: d loss / d {name}")
    return grads


FORM_KWARGS = {"sequential": {}, "parallel": {}, "chunked": {"chunk_len": CHUNK_LEN}}


# CI time: every form on the packed mask, the chunked form on all three; the rest slow.
FORM_MASKS = [pytest.param(form, mask, marks=[pytest.mark.slow] if mask != "packed" and form != "chunked" else [])
              for form in FORM_KWARGS for mask in MASKS]


@pytest.mark.parametrize("form,mask_name", FORM_MASKS)
def test_forms_equal_documents_run_one_by_one(form, mask_name):
    check_form(form, mask_name, **FORM_KWARGS[form])


PALLAS_KWARGS = {"tpu": dict(backend="tpu", block_c=128, block_t=16),  # 3 T blocks, C padded to 128
                 "gpu": dict(backend="gpu", block_c=64)}


@pytest.mark.parametrize("mask_name", ["packed", pytest.param("consecutive", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend", ["tpu", pytest.param("gpu", marks=pytest.mark.slow)])
def test_pallas_kernel_equals_documents_run_one_by_one(backend, mask_name):
    """The kernels (interpreted) reset to the empty state; the reference runs the documents from it."""
    check_form("pallas", mask_name, empty_reset=True, **PALLAS_KWARGS[backend])


def test_pallas_refuses_a_reset_state_naming_the_alternative():
    from rwkv_jax.ops.wkv4_pallas import wkv_pallas
    args = make_args(5)
    with pytest.raises(NotImplementedError, match="empty state only.*'sequential', 'parallel' or 'chunked'"):
        wkv_pallas(*args[:4], reset_BT=reset_mask("packed"), reset_state=empty_state(B, C), interpret=True)


@pytest.mark.parametrize("form", list(FORM_KWARGS))
def test_no_reset_mask_equals_no_resets(form):
    """An all-False mask changes nothing (and reset_BT=None is the code without resets)."""
    args = make_args(3)
    x, state = args[:4], WKVState(*args[4:7])
    run = jax.jit(functools.partial(wkv, form=form, **FORM_KWARGS[form]))
    y0, s0 = run(*x, state)
    y1, s1 = run(*x, state, reset_BT=jnp.zeros((B, T), bool))
    assert_close(y1, y0, rtol=1e-6, atol=1e-7)
    for a, b in zip(s1, s0):
        assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bad_reset_mask_raises():
    args = make_args(4)
    with pytest.raises(ValueError, match=r"reset_BT must be \[batch, time\]"):
        wkv(*args[:4], form="parallel", reset_BT=jnp.zeros((B, T + 1), bool))
    with pytest.raises(ValueError, match="reset_state was given without reset_BT"):
        wkv(*args[:4], form="parallel", reset_state=empty_state(B, C))


# ------------------------------------------------------------------------------------------ the model

def _random_model(**config):
    from flax import nnx

    from rwkv_jax.model import RWKV, ModelConfig
    model = RWKV(ModelConfig(vocab_size=50, d_model=16, n_layer=2, d_ffn=32, **config), rngs=nnx.Rngs(0))
    state = nnx.state(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                                                   for x, k in zip(leaves, keys)]))
    return model


def _random_state(model, batch, seed):
    """A model state with random previous inputs and WKV sums (b > 0)."""
    from rwkv_jax.model import RWKVState
    shapes = model.init_state(batch)
    keys = jax.random.split(jax.random.key(seed), 5)
    parts = [jax.random.normal(key, x.shape) for key, x in zip(keys, shapes)]
    parts[2] = jnp.abs(parts[2]) + 0.5
    return RWKVState(*parts)


EOT = 0


def _forward(model, tokens, state=None, reset_BT=None, reset_to=None):
    """The model's logits, jitted."""
    from flax import nnx
    return nnx.jit(lambda m, t, s, r, s0: m(t, s, reset_BT=r, reset_to=s0)[0])(model, tokens, state, reset_BT,
                                                                               reset_to)
MODEL_TOKENS = np.array([[0, 5, 9, 3, 0, 7, 0, 0, 12, 4, 8, 1, 2, 0, 6, 6],   # reset at 0, consecutive
                         [3, 4, 11, 0, 9, 9, 2, 5, 7, 1, 3, 8, 0, 44, 2, 7]])  # a first document cut


def _documents_one_by_one(model, tokens, state, reset_to):
    """Each row's documents run separately, as rows of one batch padded at the end (later positions do
    not change earlier logits): the first document of a row from `state`, each one that starts at an
    eot from `reset_to` (None: the empty state)."""
    from rwkv_jax.model import RWKVState
    empty = model.init_state(tokens.shape[0])
    documents = []  # (row, start, end, the state it starts from)
    for row in range(tokens.shape[0]):
        starts = sorted({0, *np.flatnonzero(tokens[row] == EOT).tolist()})
        for s, e in zip(starts, starts[1:] + [tokens.shape[1]]):
            documents.append((row, s, e, (reset_to if tokens[row, s] == EOT else state) or empty))
    width = max(e - s for _, s, e, _ in documents)
    batch = np.zeros((len(documents), width), np.int32)
    for i, (row, s, e, _) in enumerate(documents):
        batch[i, :e - s] = tokens[row, s:e]
    initial = RWKVState(*(jnp.stack([d[3][part][:, d[0]] for d in documents], axis=1) for part in range(5)))
    logits = _forward(model, jnp.asarray(batch), initial)
    return jnp.stack([jnp.concatenate([logits[i, :e - s] for i, (r, s, e, _) in enumerate(documents) if r == row])
                      for row in range(tokens.shape[0])])


@pytest.mark.parametrize("scan_layers, remat, form, with_states", [
    (False, False, "sequential", False), (True, True, "chunked", True), (False, True, "parallel", True)])
def test_model_packed_row_equals_documents_run_separately(scan_layers, remat, form, with_states):
    model = _random_model(scan_layers=scan_layers, remat=remat, wkv_form=form, wkv_chunk_len=5)
    tokens = MODEL_TOKENS
    state = _random_state(model, 2, seed=3) if with_states else None
    reset_to = _random_state(model, 2, seed=4) if with_states else None
    logits = _forward(model, jnp.asarray(tokens), state, jnp.asarray(tokens == EOT), reset_to)
    expected = _documents_one_by_one(model, tokens, state, reset_to)
    assert_close(logits, expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))
    # ... and resets change the logits (the row without them sees across documents)
    assert float(jnp.abs(_forward(model, jnp.asarray(tokens), state) - expected).max()) > 1e-2


def test_model_step_resets_the_state():
    """RNN mode (one token) with a reset starts from the empty state whatever state it is given."""
    model = _random_model()
    tokens = jnp.asarray([[EOT], [7]])
    logits, _ = model(tokens, _random_state(model, 2, seed=5), reset_BT=jnp.asarray([[True], [True]]))
    assert_close(logits, model(tokens)[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- data and training

def test_batches_mark_the_eot_inputs():
    from rwkv_jax import data
    rng = np.random.default_rng(0)
    tokens_N = rng.integers(0, 6, size=400).astype(np.uint16)  # id 0 (the eot here) is frequent
    batch = data.Batches(tokens_N, seq_len=16, batch_size=4, seed=1, reset_id=0).batch_at(3)
    assert batch["reset"].dtype == bool and batch["reset"].any()
    np.testing.assert_array_equal(batch["reset"], batch["inputs"] == 0)
    plain = data.Batches(tokens_N, seq_len=16, batch_size=4, seed=1).batch_at(3)
    assert "reset" not in plain  # the default, as the official trainer: no resets
    np.testing.assert_array_equal(plain["inputs"], batch["inputs"])
    for evals in data.EvalBatches(tokens_N[:50], seq_len=16, batch_size=4, reset_id=0):
        # only real inputs: the zero padding of the last windows is not a reset
        np.testing.assert_array_equal(evals["reset"], (evals["inputs"] == 0) & (evals["mask"] == 1))
    padding = evals["mask"] == 0  # the last batch's padding: input id 0, the eot id here, and no reset
    assert padding.any() and (evals["inputs"][padding] == 0).all() and not evals["reset"][padding].any()


def test_default_config_does_not_reset():
    from rwkv_jax.data import default_data_config
    assert default_data_config().reset_at_eot is False


def test_eval_step_passes_the_resets_to_the_model():
    """The jitted eval step with a 'reset' key scores the packed rows as the model with reset_BT does."""
    from flax import nnx

    from rwkv_jax.train import optim, sharding, train_step
    model = _random_model()
    graphdef, params = nnx.split(model)
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    eval_fn = train_step.make_eval_step(graphdef, sharding.replicated(mesh), mesh)
    inputs, targets = MODEL_TOKENS[:, :-1], MODEL_TOKENS[:, 1:]
    batch = {"inputs": inputs, "targets": targets, "mask": np.ones_like(inputs)}
    total, count = eval_fn(params, dict(batch, reset=inputs == EOT), None)
    hidden, _ = model.hidden(jnp.asarray(inputs), reset_BT=jnp.asarray(inputs == EOT))
    expected, _ = optim.chunked_token_losses(*model.head_operands(hidden), jnp.asarray(targets))
    assert_close(total, expected, rtol=1e-5)
    assert abs(float(eval_fn(params, batch, None)[0]) - float(total)) > 1e-3


def test_training_with_reset_at_eot(train_env, tmp_path):
    from rwkv_jax.train import trainer
    from tests.helpers import make_config, read_records, tiny_overrides
    config = make_config(tiny_overrides(train_env, train__num_steps=3, train__eval_every=0, data__reset_at_eot=True,
                                        train__microbatches=2, checkpoint__every_steps=100))
    result = trainer.train(config, tmp_path)
    losses = [r["loss"] for r in read_records(tmp_path) if r["kind"] == "train"]
    assert len(losses) == 3 and all(np.isfinite(losses)) and np.isfinite(result["eval_loss"])
    meta = (tmp_path / "checkpoints" / "3").rglob("*")
    assert any(p.is_file() and b'"reset_at_eot": true' in p.read_bytes() for p in meta)


def test_triton_lowering_with_resets():
    """The GPU kernels with the reset mask lower to Triton IR for CUDA from this CPU host."""
    from rwkv_jax.ops.wkv4_pallas import wkv_pallas

    def loss(time_decay, time_first, k, v, reset_BT):
        y, state = wkv_pallas(time_decay, time_first, k, v, backend="gpu", interpret=False, reset_BT=reset_BT)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state.a) + jnp.sum(state.p)

    spec_c = jax.ShapeDtypeStruct((C,), jnp.float32)
    spec = jax.ShapeDtypeStruct((B, T, C), jnp.bfloat16)
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(
        spec_c, spec_c, spec, spec, jax.ShapeDtypeStruct((B, T), bool)).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("triton") >= 2  # the forward and the backward kernel


# ------------------------------------------------------------------------------- sharded and compiled

@pytest.mark.slow
def test_sharded_kernel_with_resets_matches_sequential():
    """The Pallas kernel with resets, inside shard_map over data 2 x tensor 2 on 4 simulated CPU devices
    (directly and through wkv(form='pallas') under activation_sharding): values, state and gradients equal
    wkv_sequential's with the same resets."""
    from tests.helpers import assert_sharded_probe_matches, run_sharded_probe
    out = run_sharded_probe("--resets")
    assert out["resets"] > 4, out
    assert_sharded_probe_matches(out)


@pytest.mark.slow
def test_tpu_train_step_with_resets_compiles_ahead_of_time():
    """configs/tiny.py with data.reset_at_eot=True and the Mosaic kernel, compiled for a TPU v5e 2x2 from
    this CPU (needs libtpu): the train and eval steps take the reset mask."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -r requirements-dev.txt)")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "train.py", "--compile_only", "--config=configs/tiny.py", "--topology=v5e:2x2",
         "--config.mesh.fsdp=4", "--config.mesh.data=1", "--config.model.wkv_form=pallas",
         "--config.data.reset_at_eot=True"], cwd=repo, env={**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"},
        capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WKV pallas" in proc.stdout and "FITS" in proc.stdout


@pytest.mark.parametrize("form", ["parallel", "chunked"])
def test_extreme_inputs_with_resets_are_finite_and_agree(form):
    """k, v in [-60, 60], w from -3e-4 to -403, time_first in [-10, 10], an empty and a random reset
    state: finite values and gradients, and the forms agree with the recurrence."""
    from tests.helpers import extreme_inputs
    x = extreme_inputs(7, T, batch=B, channels=C)
    args = (x["time_decay"], x["time_first"], x["k"], x["v"], *empty_state(B, C), *reset_state_of(8, False))
    reset_BT, r = reset_mask("packed"), weights(9)
    (_, (y, state)), grads = value_and_grads(form, **FORM_KWARGS[form])(*args, reset_BT, r)
    (_, (y_seq, state_seq)), grads_seq = value_and_grads("sequential")(*args, reset_BT, r)
    for name, g in zip(GRAD_NAMES, grads + grads_seq):
        assert np.all(np.isfinite(np.asarray(g))), f"{form}: d loss / d {name} is not finite"
    assert np.all(np.isfinite(np.asarray(y))) and np.all(np.isfinite(np.asarray(state.p)))
    assert_close(y, y_seq, rtol=1e-4, atol=1e-4 * float(jnp.abs(y_seq).max()))
    assert_close(state.p, state_seq.p, rtol=1e-5, atol=1e-3)
