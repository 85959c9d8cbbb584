"""The training recipe: v4neo learning-rate schedule, L2Wrap against the official torch formulation,
layer-wise multipliers, decay on matrices only, and non-finite steps skipped."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from rwkv_jax.train import optim


def v4neo_lr(step, lr_init, lr_final, warmup, decay_start, total):
    """The v4neo trainer's schedule (exp decay, warmup from 0.2), written out in plain Python."""
    progress = min(1.0, max(0.0, (step - decay_start) / (total - 1 - decay_start)))
    lr = lr_init * math.exp(math.log(lr_final / lr_init) * progress)
    return lr * (0.2 + 0.8 * step / warmup) if step < warmup else lr


def test_schedule_warmup_constant_then_exponential_decay():
    config = optim.default_optim_config()
    config.lr_init, config.lr_final, config.warmup_steps, config.decay_start = 6e-4, 1e-5, 10, 30
    schedule = optim.learning_rate(config, total_steps=101)
    for step in [0, 5, 9, 10, 20, 30, 31, 60, 99, 100, 150]:
        expected = v4neo_lr(step, 6e-4, 1e-5, 10, 30, 101)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5), step
    assert float(schedule(0)) == pytest.approx(0.2 * 6e-4, rel=1e-6)
    assert float(schedule(100)) == pytest.approx(1e-5, rel=1e-5)


def x070_lr(step, lr_init, lr_final, warmup, total):
    """RWKV-v7/train_temp/src/trainer.py's schedule, written out in plain Python: a cosine from lr_init that
    reaches lr_final at total (my_exit_tokens), from the end of warmup, times 0.01 + 0.99 step / warmup
    during warmup."""
    progress = min(1.0, max(0.0, (step - warmup) / (total - warmup)))
    factor = lr_final / lr_init
    lr = lr_init * ((0.5 + factor / 2) + (0.5 - factor / 2) * math.cos(math.pi * progress))
    return lr * (0.01 + 0.99 * step / warmup) if step < warmup else lr


def test_cosine_schedule_is_rwkv7_train_temps():
    config = optim.default_optim_config()
    config.update(lr_init=8e-4, lr_final=3e-5, warmup_steps=10, schedule="cosine", warmup_from=0.01)
    schedule = optim.learning_rate(config, total_steps=100)
    for step in [0, 1, 5, 9, 10, 11, 40, 55, 98, 99, 100, 150]:
        assert float(schedule(step)) == pytest.approx(x070_lr(step, 8e-4, 3e-5, 10, 100), rel=1e-5), step
    assert float(schedule(0)) == pytest.approx(0.01 * 8e-4, rel=1e-6)
    assert float(schedule(55)) == pytest.approx((8e-4 + 3e-5) / 2, rel=1e-5)  # half way: the mean
    assert float(schedule(100)) == pytest.approx(3e-5, rel=1e-5)
    # the RWKV-7 paper configs use it; the default (RWKV-4's) stays v4neo's
    from rwkv_jax.train import train_config
    v7 = train_config.rwkv7_paper_config(n_layer=2, d_model=64, vocab_size=128, lr_init=8e-4, lr_final=3e-5,
                                         weight_decay=0.1)
    assert (v7.optim.schedule, v7.optim.warmup_from, v7.optim.warmup_steps) == ("cosine", 0.01, 10)
    v4 = train_config.paper_config(n_layer=2, d_model=64, lr_init=6e-4, lr_final=1e-5)
    assert (v4.optim.schedule, v4.optim.warmup_from) == ("exponential", 0.2)
    for field, value, message in [("schedule", "linear", r"optim.schedule must be one of"),
                                  ("warmup_from", 0.0, r"optim.warmup_from must be in \(0, 1\]")]:
        bad = train_config.paper_config(n_layer=2, d_model=64, lr_init=6e-4, lr_final=1e-5)
        bad.optim[field] = value
        with pytest.raises(train_config.ConfigError, match=message):
            train_config.validate(bad)


class OfficialL2Wrap(torch.autograd.Function):
    """RWKV-LM v4neo's L2Wrap, the peer for our JAX version."""

    @staticmethod
    def forward(ctx, loss, y):
        ctx.save_for_backward(y)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        y = ctx.saved_tensors[0]
        factor = 1e-4 / (y.shape[0] * y.shape[1])
        maxx, ids = torch.max(y, -1, keepdim=True)
        gy = torch.zeros_like(y)
        gy.scatter_(-1, ids, maxx * factor)
        return grad_output, gy


def test_l2wrap_matches_official_gradient():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 7, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (2, 7))

    y = torch.tensor(logits, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(y.view(-1, 11), torch.tensor(targets).view(-1))
    OfficialL2Wrap.apply(loss, y).backward()

    ours_loss, ours_grad = jax.value_and_grad(optim.cross_entropy)(jnp.asarray(logits), jnp.asarray(targets))
    assert float(ours_loss) == pytest.approx(float(loss.detach()), rel=1e-6)
    np.testing.assert_allclose(np.asarray(ours_grad), y.grad.numpy(), rtol=1e-5, atol=1e-8)
    plain = jax.grad(lambda x: optim.cross_entropy(x, jnp.asarray(targets), l2wrap_factor=0))(jnp.asarray(logits))
    assert np.abs(np.asarray(ours_grad - plain)).max() > 1e-7, "L2Wrap must change the gradient"


def _params():
    return {"blocks": {0: {"att": {"time_decay": jnp.ones(4), "time_first": jnp.ones(4),
                                   "key": {"kernel": jnp.ones((4, 4))}}}}, "ln0": {"scale": jnp.ones(4)}}


def _one_update(config, grads):
    tx = optim.make_optimizer(config, total_steps=10)
    params = _params()
    updates, state = tx.update(grads, tx.init(params), params)
    return updates, state


def test_layerwise_multipliers_scale_time_decay_2x_and_time_first_3x():
    config = optim.default_optim_config()
    config.warmup_steps = 0
    grads = jax.tree.map(jnp.ones_like, _params())
    base, _ = _one_update(config, grads)
    config.layerwise_lr = True
    scaled, _ = _one_update(config, grads)
    att, att_base = scaled["blocks"][0]["att"], base["blocks"][0]["att"]
    np.testing.assert_allclose(att["time_decay"], 2 * att_base["time_decay"], rtol=1e-6)
    np.testing.assert_allclose(att["time_first"], 3 * att_base["time_first"], rtol=1e-6)
    np.testing.assert_allclose(att["key"]["kernel"], att_base["key"]["kernel"], rtol=1e-6)


def test_weight_decay_touches_matrices_only():
    config = optim.default_optim_config()
    config.warmup_steps, config.weight_decay = 0, 0.1
    zero_grads = jax.tree.map(jnp.zeros_like, _params())
    updates, _ = _one_update(config, zero_grads)
    assert np.all(np.asarray(updates["blocks"][0]["att"]["key"]["kernel"]) < 0)  # decayed towards 0
    for vector in (updates["ln0"]["scale"], updates["blocks"][0]["att"]["time_decay"]):
        assert not np.any(np.asarray(vector))


def test_non_finite_gradient_is_not_applied_and_counted():
    config = optim.default_optim_config()
    tx = optim.make_optimizer(config, total_steps=10)
    params = _params()
    state = tx.init(params)
    bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
    for expected_count in (1, 2, 3):
        updates, state = tx.update(bad, state, params)
        assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
        assert int(optim.bad_step_count(state)) == expected_count
    good = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(good, state, params)
    assert int(optim.bad_step_count(state)) == 0 and np.all(np.isfinite(optax.global_norm(updates)))


@pytest.mark.parametrize("weight_decay,layerwise_lr", [(0.0, False), (0.1, True)])
def test_fused_update_equals_the_optax_chain(weight_decay, layerwise_lr):
    """make_optimizer's hand-fused update against reference_optimizer, the optax chain it implements, over
    steps that clip and do not clip, with a non-finite step in between; jitted, as the train step runs it.
    They differ by rounding: the fused update clips with one factor grad_clip / norm where optax divides each
    element by the norm, a float32 ulp per element that Adam's ratio can grow to a few."""
    config = optim.default_optim_config()
    config.warmup_steps, config.weight_decay, config.layerwise_lr = 2, weight_decay, layerwise_lr
    fused, reference = optim.make_optimizer(config, 10), optim.reference_optimizer(config, 10)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), _params())
    states = [tx.init(params) for tx in (fused, reference)]
    all_params = [params, params]
    for scale in (0.01, 10.0, float("nan"), 0.3, 5.0):  # the global norm below and above grad_clip = 1
        grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * scale, jnp.float32), params)
        out = [jax.jit(tx.update)(grads, s, p) for tx, s, p in zip((fused, reference), states, all_params)]
        (u_fused, s_fused), (u_ref, s_ref) = out
        for a, b in zip(jax.tree.leaves((u_fused, s_fused)), jax.tree.leaves((u_ref, s_ref))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-12)
        assert jax.tree.structure(s_fused) == jax.tree.structure(s_ref)
        states = [s_fused, s_ref]
        all_params = [optax.apply_updates(p, u) for p, u in zip(all_params, (u_fused, u_ref))]
    assert int(optim.bad_step_count(states[0])) == 0 and int(states[0].total_notfinite) == 1
    assert int(states[0].inner_state[1].count) == 4  # the non-finite step did not count


def _whole_logits_loss(normed, kernel, targets, weights, factor):
    """The plain definition: fp32 logits of the whole [B, T, V] (the matmul in the operands' dtype, as the
    head computes it), optax's cross entropy, and `optim.l2wrap` on the logits of nonzero-weight positions."""
    logits = (normed @ kernel.astype(normed.dtype)).astype(jnp.float32)
    total = (optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights).sum()
    return optim.l2wrap(total, logits * (weights > 0)[..., None], factor) if factor > 0 else total


@pytest.mark.parametrize("factor", [0.0, 0.3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_token_losses_equal_the_whole_logits_definition(dtype, factor):
    """Value and gradients (into the head's input, its fp32 kernel and the weights) of the chunked loss
    equal the whole-logits definition: with fractional and zero weights, and chunks (2 positions of 3
    rows) that leave T = 11 padded. fp32 to rounding; bf16 to its precision."""
    rng = np.random.default_rng(4)
    B, T, D, V = 3, 11, 16, 37
    normed = jnp.asarray(rng.normal(size=(B, T, D)), dtype)
    kernel = jnp.asarray(rng.normal(size=(D, V)) * 0.8, jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    weights = jnp.asarray(rng.choice([0.0, 0.5, 1.0], (B, T), p=[0.3, 0.2, 0.5]), jnp.float32)
    assert (weights == 0).any() and (weights == 0.5).any()

    def chunked(n, k, w):
        return optim.chunked_token_losses(n, k, targets, w, chunk_tokens=6, l2wrap_factor=factor)[0] / (B * T)

    def whole(n, k, w):  # divided as a mean is: the upstream gradient g of the sums is not 1
        return _whole_logits_loss(n, k, targets, w, factor) / (B * T)

    value, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))(normed, kernel, weights)
    expected, expected_grads = jax.jit(jax.value_and_grad(whole, argnums=(0, 1, 2)))(normed, kernel, weights)
    for g, e in zip(grads, expected_grads):
        assert g.dtype == e.dtype
    if dtype == "float32":
        np.testing.assert_allclose(value, expected, rtol=1e-6)
        for g, e in zip(grads, expected_grads):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)
    else:
        np.testing.assert_allclose(value, expected, rtol=2e-3)
        for g, e in zip(grads, expected_grads):
            g, e = np.asarray(g, np.float32), np.asarray(e, np.float32)
            np.testing.assert_allclose(g, e, rtol=0, atol=2e-2 * np.abs(e).max())
    if factor:  # the L2Wrap term is really in the gradients compared above
        plain = jax.grad(_whole_logits_loss, argnums=1)(normed, kernel, targets, weights, 0.0)
        assert np.abs(np.asarray(grads[1] - plain / (B * T))).max() > 1e-4


@pytest.mark.parametrize("with_argmax", [True, False])
def test_one_pass_softmax_statistics_equal_max_sum_and_first_argmax(with_argmax):
    """The chunk loss's single reduction: max, sum of exp(x - max) and the FIRST argmax (as jnp.argmax and
    torch.max pick), over rows with many ties (bf16 values of few levels) and a row of equal values."""
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.integers(-6, 7, (3, 5, 1000)) * 0.75, jnp.bfloat16).at[1, 2].set(2.0)
    top, total, first = jax.jit(lambda x: optim._softmax_statistics(x, with_argmax=with_argmax))(logits)
    x = np.asarray(logits, np.float64)
    np.testing.assert_array_equal(top, x.max(-1))
    np.testing.assert_allclose(total, np.exp(x - x.max(-1, keepdims=True)).sum(-1), rtol=1e-5)  # fp32 sums
    if with_argmax:
        np.testing.assert_array_equal(first, x.argmax(-1))
        assert int(first[1, 2]) == 0
    else:
        assert first is None
