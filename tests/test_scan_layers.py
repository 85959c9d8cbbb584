"""Layers scanned (`ModelConfig.scan_layers`) and the chunked head + cross entropy of training."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rwkv_jax.io import weights
from rwkv_jax.model import RWKV, ModelConfig, resolve_scan_layers, with_scan_layers
from rwkv_jax.train import optim
from rwkv_jax.train import train_config as config_lib

CONFIG = ModelConfig(vocab_size=97, d_model=32, n_layer=3, d_ffn=64)


def randomized(config, seed=0):
    """A model whose every parameter is random (the v4neo init zeroes several matrices)."""
    model = RWKV(config, rngs=nnx.Rngs(seed))
    state = nnx.state(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
                                                   for x, k in zip(leaves, keys)]))
    return model


forward = nnx.jit(lambda model, tokens, state=None: model(tokens, state))


def test_scan_layers_auto_is_a_list_on_cpu_and_stacked_on_gpu_and_tpu():
    assert [resolve_scan_layers("auto", p) for p in ("cpu", "gpu", "tpu")] == [False, True, True]
    # the command line gives strings when the config's field is one ('auto' in the paper configs)
    assert [resolve_scan_layers(v, "tpu") for v in ("True", "false", " AUTO ", True, False)] == [
        True, False, True, True, False]
    with pytest.raises(ValueError, match=r"model.scan_layers must be one of True, False, 'auto', got 'yes'"):
        resolve_scan_layers("yes", "cpu")
    config = config_lib.paper_config(n_layer=2, d_model=32, lr_init=1e-3, lr_final=1e-4)
    assert config.model.scan_layers == "auto"
    assert ModelConfig.from_dict(config.model).scan_layers is (jax.default_backend() != "cpu")
    config.model.scan_layers = "maybe"
    with pytest.raises(config_lib.ConfigError, match=r"model.scan_layers must be one of True, False, 'auto'"):
        config_lib.validate(config)


def test_scanned_layers_compile_unrolled_on_cpu():
    """On CPU the scan over layers is unrolled when compiled (model.RWKV._scan_blocks): the compiled forward
    has the unstacked model's loops (each layer's WKV loop over time), not one loop over the layers around
    one layer's."""
    tokens = jnp.zeros((2, 5), jnp.int32)

    def loops(model):
        graphdef, state = nnx.split(model)
        hlo = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0]).lower(state, tokens)
        return hlo.compile().as_text().count(" while(")

    unrolled = RWKV(CONFIG, rngs=nnx.Rngs(0))
    assert loops(with_scan_layers(unrolled, True)) == loops(unrolled)
    # The loop itself is in the program, for the platforms that keep it.
    graphdef, state = nnx.split(with_scan_layers(unrolled, True))
    jaxpr = jax.make_jaxpr(lambda state: nnx.merge(graphdef, state)(tokens)[0])(state)
    assert "scan[" in str(jaxpr) and "platform_index" in str(jaxpr)


def test_scanned_model_equals_the_unrolled_one():
    unrolled = randomized(CONFIG)
    scanned = with_scan_layers(unrolled, True)
    assert scanned.config.scan_layers and nnx.state(scanned)["blocks"]["att"]["key"]["kernel"].shape == (3, 32, 32)
    assert nnx.state(scanned)["blocks"]["att"]["time_decay"].get_metadata()["logical_axes"] == ("layers", "attn")
    tokens = jax.random.randint(jax.random.key(3), (2, 19), 0, CONFIG.vocab_size)
    (l1, s1), (l2, s2) = forward(unrolled, tokens), forward(scanned, tokens)
    # Equal to 1e-6 of the logits' scale: XLA fuses the scan body differently from the unrolled layers, so
    # fp32 roundings differ by a few ulps (one layer alone is bit-identical, checked below).
    assert float(jnp.abs(l2 - l1).max()) <= 1e-6 * float(jnp.abs(l1).max())
    for a, b in zip(s1, s2):
        assert float(jnp.abs(b - a).max()) <= 1e-6 * max(1.0, float(jnp.abs(a).max()))
    one = randomized(dataclasses.replace(CONFIG, n_layer=1))
    np.testing.assert_array_equal(forward(with_scan_layers(one, True), tokens)[0], forward(one, tokens)[0])
    # RNN mode and state carry through the scanned blocks
    step = nnx.jit(lambda m, t, s: m.step(t, s))
    state = scanned.init_state(2)
    for t in range(tokens.shape[1]):
        logits, state = step(scanned, tokens[:, t], state)
    np.testing.assert_allclose(logits, l1[:, -1], atol=1e-5, rtol=0)


def test_scan_init_equals_unrolled_init_and_round_trips_bit_exactly():
    config = dataclasses.replace(CONFIG, scan_layers=True)
    scanned = RWKV(config, rngs=nnx.Rngs(7))
    unrolled = RWKV(CONFIG, rngs=nnx.Rngs(7))
    for a, b in zip(jax.tree.leaves(nnx.state(with_scan_layers(scanned, False))), jax.tree.leaves(nnx.state(unrolled))):
        np.testing.assert_array_equal(a, b)
    back = with_scan_layers(with_scan_layers(scanned, False), True)
    for a, b in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(scanned))):
        np.testing.assert_array_equal(a, b)


def test_weight_formats_are_per_layer_whether_scanned_or_not(tmp_path):
    unrolled = randomized(CONFIG, seed=4)
    scanned = with_scan_layers(unrolled, True)
    official = weights.model_to_official(unrolled)
    from_scanned = weights.model_to_official(scanned)
    assert official.keys() == from_scanned.keys() and "blocks.2.att.key.weight" in official
    for name in official:
        np.testing.assert_array_equal(from_scanned[name], official[name])
    # loading into a scanned model and saving our own format from it
    reloaded = weights.model_from_official(official, scan_layers=True)
    assert reloaded.config.scan_layers
    for a, b in zip(jax.tree.leaves(nnx.state(reloaded)), jax.tree.leaves(nnx.state(scanned))):
        np.testing.assert_array_equal(a, b)
    weights.save_model(scanned, tmp_path / "own")
    plain = weights.load_model(tmp_path / "own", scan_layers=False)
    assert not plain.config.scan_layers
    for a, b in zip(jax.tree.leaves(nnx.state(plain)), jax.tree.leaves(nnx.state(unrolled))):
        np.testing.assert_array_equal(a, b)
    again = weights.load_model(tmp_path / "own")  # the saved config says scan_layers=True
    assert again.config.scan_layers


def test_param_groups_do_not_depend_on_scanning():
    unrolled = nnx.state(randomized(CONFIG), nnx.Param)
    scanned = nnx.state(with_scan_layers(randomized(CONFIG), True), nnx.Param)
    groups = lambda s: sorted(set(jax.tree.leaves(optim.param_groups(s))))
    assert groups(unrolled) == groups(scanned) == ["matrix", "time_decay", "time_first", "vector"]
    kinds = optim.param_groups(scanned)
    assert kinds["blocks"]["att"]["key"]["kernel"] == "matrix"
    assert kinds["blocks"]["att"]["time_mix_k"] == "vector" and kinds["ln0"]["scale"] == "vector"


@pytest.mark.parametrize("chunk_tokens, l2wrap_factor", [pytest.param(7, 0.3, marks=pytest.mark.slow), (16, 0.0),
                                                          (10_000, 0.3)])
def test_chunked_cross_entropy_equals_the_whole_logits_loss(chunk_tokens, l2wrap_factor):
    model = randomized(CONFIG, seed=2)
    tokens = jax.random.randint(jax.random.key(5), (3, 21), 0, CONFIG.vocab_size)
    targets = jax.random.randint(jax.random.key(6), (3, 21), 0, CONFIG.vocab_size)
    graphdef, params = nnx.split(model)

    def whole(p):
        logits, _ = nnx.merge(graphdef, p)(tokens)
        return optim.cross_entropy(logits, targets, l2wrap_factor)

    def chunked(p):
        m = nnx.merge(graphdef, p)
        hidden, _ = m.hidden(tokens)
        total, count = optim.chunked_token_losses(*m.head_operands(hidden), targets, chunk_tokens=chunk_tokens,
                                                  l2wrap_factor=l2wrap_factor)
        return total / count

    (l1, g1), (l2, g2) = jax.jit(jax.value_and_grad(whole))(params), jax.jit(jax.value_and_grad(chunked))(params)
    np.testing.assert_allclose(l2, l1, atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)


def test_chunked_losses_with_a_mask_equal_masked_token_losses():
    model = randomized(CONFIG, seed=3)
    tokens = jax.random.randint(jax.random.key(8), (2, 13), 0, CONFIG.vocab_size)
    mask = (jnp.arange(13)[None] < jnp.array([[13], [6]])).astype(jnp.int32)
    logits, _ = model(tokens)
    expected = (optax.softmax_cross_entropy_with_integer_labels(logits, tokens) * mask).sum()
    hidden, _ = model.hidden(tokens)
    total, count = optim.chunked_token_losses(*model.head_operands(hidden), tokens, mask, chunk_tokens=5)
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert float(count) == 19
