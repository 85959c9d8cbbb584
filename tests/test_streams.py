"""Streamed training (config.data.sampling='streams'), issue 13 point 1:

  * streams batches are a pure function of (seed, step) and of the process's rows; row r reads the corpus
    in order, window after window, from evenly spaced starts, wrapping at the corpus end;
  * the carried state enters the next step: two steps of T tokens equal one model run over the 2T tokens
    (forward values, the final state), with microbatches too, and the gradient stops at the window boundary;
  * train.bptt_windows=2 equals one pass over the 2T tokens (loss, gradient, update, final state);
  * SIGKILL resume stays bit exact with streaming (tests/test_train.py), a changed sampling on resume is
    refused (tests/test_train_failures.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rwkv_jax import data
from rwkv_jax.data import pipeline
from rwkv_jax.model import ModelConfig
from rwkv_jax.train import optim, sharding, train_step

N = 1000
TOKENS_N = np.arange(N, dtype=np.uint16)  # token i is i: a window shows where it was cut


def test_streams_batches_are_pure_in_seed_and_step():
    a = data.Batches(TOKENS_N, seq_len=16, batch_size=4, seed=7, sampling="streams")
    b = data.Batches(TOKENS_N, seq_len=16, batch_size=4, seed=7, sampling="streams")
    for step in (0, 5, 123):  # a fresh instance (a resumed run) jumps straight to any step
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(a.batch_at(step)[key], b.batch_at(step)[key])
    other = data.Batches(TOKENS_N, seq_len=16, batch_size=4, seed=8, sampling="streams").batch_at(5)
    assert not np.array_equal(other["inputs"], a.batch_at(5)["inputs"])


def test_each_row_reads_consecutive_windows_from_evenly_spaced_starts_and_wraps():
    T, B = 16, 4
    batches = data.Batches(TOKENS_N, seq_len=T, batch_size=B, seed=3, sampling="streams")
    starts = batches.batch_at(0)["inputs"][:, 0].astype(np.int64)
    np.testing.assert_array_equal((starts - starts[0]) % N, np.arange(B) * N // B)  # N/B apart
    stream_B = [[] for _ in range(B)]
    previous = None
    for step in range(2 * N // T):  # every row goes round the corpus at least once
        batch = batches.batch_at(step)
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        if step:  # step n+1's first input is step n's last target: no token is skipped or repeated
            np.testing.assert_array_equal(batch["inputs"][:, 0], previous["targets"][:, -1])
        previous = batch
        for r in range(B):
            stream_B[r].extend(batch["inputs"][r])
    for r in range(B):  # each row is the corpus read as a cycle from its start
        np.testing.assert_array_equal(stream_B[r], (starts[r] + np.arange(len(stream_B[r]))) % N)


def test_streams_rows_split_over_processes():
    full = data.Batches(TOKENS_N, seq_len=16, batch_size=6, seed=3, sampling="streams")
    parts = [data.Batches(TOKENS_N, seq_len=16, batch_size=6, seed=3, process_index=p, process_count=2,
                          sampling="streams") for p in range(2)]
    for step in (0, 9):
        np.testing.assert_array_equal(np.concatenate([p.batch_at(step)["inputs"] for p in parts]),
                                      full.batch_at(step)["inputs"])


def test_an_unknown_sampling_is_refused():
    with pytest.raises(ValueError, match=r"sampling must be one of \['random', 'streams'\], got 'stream'"):
        data.Batches(TOKENS_N, seq_len=16, batch_size=4, sampling="stream")


def test_a_cyclic_window_longer_than_the_tail_continues_at_the_start():
    np.testing.assert_array_equal(pipeline.cyclic_window(TOKENS_N, N - 3, 6), [997, 998, 999, 0, 1, 2])
    np.testing.assert_array_equal(pipeline.cyclic_window(TOKENS_N, 2 * N + 5, 3), [5, 6, 7])


# --- The carried state in the train step -------------------------------------------------------------------

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layer=2, emb_init_scale=0.5)
B, T = 4, 16


def _two_windows():
    tokens = np.random.default_rng(0).integers(0, MODEL.vocab_size, size=(B, 2 * T + 1), dtype=np.int32)
    windows = [{"inputs": jnp.asarray(tokens[:, i * T:(i + 1) * T]),
                "targets": jnp.asarray(tokens[:, i * T + 1:(i + 1) * T + 1])} for i in range(2)]
    return tokens, windows


def _streamed_steps(microbatches: int):
    """Two streamed steps from random parameters at a learning rate so small that they do not move
    (Adam's first update is ~lr in size): what is compared is how the state travels, not the update."""
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    config = optim.default_optim_config()
    config.lr_init = config.lr_final = 1e-30
    optimizer = optim.make_optimizer(config, 10)
    graphdef, init, _, shardings = train_step.train_state_factory(MODEL, optimizer, mesh, 0, carry_rows=B)
    step_fn = train_step.make_train_step(graphdef, optimizer, optim.learning_rate(config, 10), shardings, mesh,
                                         microbatches=microbatches, l2wrap_factor=0.0)
    state = init()
    # RWKV starts with zero output projections, a model blind to its context: move every parameter off init.
    leaves, treedef = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    state = state._replace(params=jax.tree.unflatten(treedef, noisy))
    params0 = jax.device_get(state.params)
    empty = jax.device_get(state.carry)
    _, windows = _two_windows()
    out = []
    for batch in windows:
        state, metrics = step_fn(state, batch)
        out.append((float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(state.carry)))
    return graphdef, params0, empty, out


@pytest.fixture(scope="module")
def streamed():
    return {m: _streamed_steps(m) for m in (1, 2)}


def _mean_loss(model, inputs, targets, state=None):
    hidden, final = model.hidden(inputs, state)
    return optim.cross_entropy(model.logits(hidden), targets, 0.0), final


def test_the_carry_starts_empty_and_two_steps_equal_one_run_over_2t_tokens(streamed):
    graphdef, params0, empty, out = streamed[1]
    model = nnx.merge(graphdef, params0)
    np.testing.assert_array_equal(empty.wkv_p, np.full_like(empty.wkv_p, -1e30))
    assert all(not np.any(x) for x in (empty.att_x, empty.wkv_a, empty.wkv_b, empty.ffn_x))
    tokens, _ = _two_windows()
    hidden, final = model.hidden(jnp.asarray(tokens[:, :-1]))
    losses = optax.softmax_cross_entropy_with_integer_labels(model.logits(hidden), jnp.asarray(tokens[:, 1:]))
    np.testing.assert_allclose(out[0][0], losses[:, :T].mean(), rtol=1e-5)
    np.testing.assert_allclose(out[1][0], losses[:, T:].mean(), rtol=1e-5)  # the second window saw the first
    for got, want in zip(out[1][2], final):  # the carry after step 2 is the state after all 2T tokens
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # ... and differs from what the second window alone, from the empty state, gives
    alone, _ = _mean_loss(model, jnp.asarray(tokens[:, T:-1]), jnp.asarray(tokens[:, T + 1:]))
    assert abs(float(alone) - out[1][0]) > 1e-3


def test_microbatches_carry_their_own_rows(streamed):
    for (loss1, norm1, carry1), (loss2, norm2, carry2) in zip(streamed[1][3], streamed[2][3]):
        np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
        np.testing.assert_allclose(norm2, norm1, rtol=1e-5)
        for a, b in zip(carry2, carry1):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_gradient_stops_at_the_window_boundary(streamed):
    graphdef, params0, _, out = streamed[1]
    tokens, (first, second) = _two_windows()
    carry = out[0][2]

    def truncated(params):  # the second window's loss with the carry a constant
        return _mean_loss(nnx.merge(graphdef, params), second["inputs"], second["targets"], carry)[0]

    def through(params):  # the same loss, differentiated back through the first window too
        model = nnx.merge(graphdef, params)
        _, state = model.hidden(first["inputs"])
        return _mean_loss(model, second["inputs"], second["targets"], state)[0]

    norm_truncated = float(optax.global_norm(jax.jit(jax.grad(truncated))(params0)))
    norm_through = float(optax.global_norm(jax.jit(jax.grad(through))(params0)))
    np.testing.assert_allclose(out[1][1], norm_truncated, rtol=1e-4)
    assert abs(norm_through - norm_truncated) > 1e-3 * norm_truncated  # the comparison can tell them apart


# --- train.bptt_windows: consecutive windows in one step, the gradient flowing across them -----------------

@pytest.mark.slow
def test_bptt_windows_equal_one_pass_over_their_tokens_and_carry_on():
    """One step over 2 windows of T (scan, remat) gives the loss, gradient and final state of one step over
    2T tokens: the gradient flows back across the window boundary inside the step. L2Wrap on: its
    per-position term must not change either."""
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    config = optim.default_optim_config()
    optimizer = optim.make_optimizer(config, 10)
    graphdef, init, _, shardings = train_step.train_state_factory(MODEL, optimizer, mesh, 0, carry_rows=B)
    state0 = init()
    leaves, treedef = jax.tree.flatten(state0.params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    state0 = state0._replace(params=jax.tree.unflatten(
        treedef, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))
    tokens, _ = _two_windows()
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    results = {}
    for windows in (1, 2):
        step_fn = train_step.make_train_step(graphdef, optimizer, optim.learning_rate(config, 10), shardings, mesh,
                                             l2wrap_factor=0.5, bptt_windows=windows)
        state, metrics = step_fn(jax.tree.map(jnp.copy, state0), batch)
        results[windows] = jax.device_get((metrics["loss"], metrics["grad_norm"], state.carry, state.params))
    (loss1, norm1, carry1, params1), (loss2, norm2, carry2, params2) = results[1], results[2]
    np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
    np.testing.assert_allclose(norm2, norm1, rtol=1e-5)
    for a, b in zip(carry2, carry1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_streamed_run_with_bptt_windows_and_microbatches_trains_and_checkpoints_its_carry(tmp_path):
    from tests.helpers import copy_package_source, make_config, read_records, restore_latest, tiny_overrides
    env = {"corpus": copy_package_source(tmp_path / "corpus"), "data_dir": tmp_path / "data"}
    config = make_config(tiny_overrides(env, data__sampling="streams", train__bptt_windows=2, train__microbatches=2,
                                        train__num_steps=4, train__eval_every=0, train__seq_len=16))
    from rwkv_jax.train import trainer
    trainer.train(config, tmp_path / "run")
    records = [r for r in read_records(tmp_path / "run") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in records)
    state, extra, step = restore_latest(config, tmp_path / "run")
    assert step == 4 and extra["data"]["sampling"] == "streams"
    assert state.carry.wkv_a.shape == (2, 4, 32) and np.any(np.asarray(state.carry.wkv_a))
