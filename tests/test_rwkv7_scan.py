"""RWKV-7 with stacked, scanned layers (`model.scan_layers=True`): layer 0 apart (`block0`, it makes the value
residual's v_first), layers 1..L-1 stacked with a leading 'layers' axis and applied by lax.scan.

  * the scanned model equals the list of layers: logits, final state and gradients, with a carried state,
    document resets to a given state, and remat (scanned) against no remat (list);
  * the parameters, their count and the official .pth key set are the same whichever the layout, and they
    convert both ways bit for bit;
  * a train step on the scanned model equals one on the list;
  * the sharding rules give each stacked parameter its list layer's spec, the layer axis unsharded;
  * scan_layers='auto' in the RWKV-7 paper configs resolves as RWKV-4's per platform.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from rwkv_jax.io import weights
from rwkv_jax.model import ModelConfig, rwkv7, with_scan_layers
from rwkv_jax.train import optim, sharding, train_step
from rwkv_jax.train import train_config as config_lib

CONFIG = ModelConfig(version=7, vocab_size=61, d_model=32, head_size=16, n_layer=3, d_ffn=64,
                     wkv_form="sequential")


def randomized(config: ModelConfig, seed: int = 0) -> rwkv7.RWKV7:
    """A list-of-layers model whose every parameter is random (the official init zeroes several)."""
    model = rwkv7.RWKV7(dataclasses.replace(config, scan_layers=False), rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
                                                   for k, x in zip(keys, leaves)]))
    return model


def random_state(config: ModelConfig, batch: int, seed: int) -> rwkv7.RWKV7State:
    empty = rwkv7.init_state(config, batch)
    keys = jax.random.split(jax.random.key(seed), len(empty))
    return rwkv7.RWKV7State(*(0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, empty)))


def as_list(tree_of_scanned, graphdef_scanned) -> list[np.ndarray]:
    """The leaves of a scanned model's parameter tree (e.g. its gradients) in the list model's order."""
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(with_scan_layers(
        nnx.merge(graphdef_scanned, tree_of_scanned), False)))]


def assert_close(a, b, scale_floor: float = 1.0):
    """Equal to 1e-6 of the larger magnitude (XLA fuses a scan body and unrolled layers differently)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert float(np.abs(a - b).max(initial=0)) <= 1e-6 * max(scale_floor, float(np.abs(a).max(initial=0)))


def test_scanned_rwkv7_equals_the_list_in_logits_state_and_gradients():
    unrolled = randomized(CONFIG)
    scanned = with_scan_layers(unrolled, True)
    remat = dataclasses.replace(scanned.config, remat=True)   # the scanned model rematerialises each layer
    scanned = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: rwkv7.RWKV7(remat, rngs=nnx.Rngs(0)))),
                        nnx.state(scanned))
    assert scanned.config.scan_layers and scanned.config.remat and not unrolled.config.remat
    att = nnx.state(scanned)["blocks"]["att"]
    assert att["receptance"]["kernel"].shape == (2, 32, 32) and att["v1"].shape[0] == 2
    assert att["w1"].get_metadata()["logical_axes"] == ("layers", "embed", "lora")
    assert "ln0" in nnx.state(scanned)["block0"] and "ln0" not in nnx.state(scanned)["blocks"]

    tokens = jax.random.randint(jax.random.key(3), (2, 11), 0, CONFIG.vocab_size)
    reset = jnp.zeros((2, 11), bool).at[0, 5].set(True).at[1, 8].set(True)
    start, reset_to = random_state(CONFIG, 2, 4), random_state(CONFIG, 2, 5)
    targets = jnp.roll(tokens, -1, axis=1)

    def loss_and_outputs(model, state):
        graphdef, params = nnx.split(model)

        def loss(p):
            logits, final = nnx.merge(graphdef, p)(tokens, state, reset, reset_to)
            logp = jax.nn.log_softmax(logits)
            return -jnp.take_along_axis(logp, targets[..., None], -1).mean(), (logits, final)

        (value, (logits, final)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return value, logits, final, grads, graphdef

    l_loss, l_logits, l_final, l_grads, _ = loss_and_outputs(unrolled, start)
    s_loss, s_logits, s_final, s_grads, s_graphdef = loss_and_outputs(scanned, start)
    assert_close(l_loss, s_loss)
    assert_close(l_logits, s_logits)
    for a, b in zip(l_final, s_final):
        assert_close(a, b)
    list_grads = [np.asarray(x) for x in jax.tree.leaves(l_grads)]
    scan_grads = as_list(s_grads, s_graphdef)
    assert len(list_grads) == len(scan_grads) == len(jax.tree.leaves(nnx.state(unrolled)))
    for a, b in zip(list_grads, scan_grads):
        assert_close(a, b, scale_floor=float(np.abs(np.concatenate([g.ravel() for g in list_grads])).max()))
    # layer 0's value-residual parameters are unused (as in the official model): zero gradient both ways
    g0 = nnx.to_pure_dict(s_grads)["block0"]["att"]
    for name in ("v0", "v1", "v2"):
        assert not np.any(np.asarray(g0[name])) and not np.any(np.asarray(l_grads["blocks"][0]["att"][name][...]))
    assert np.any(np.asarray(s_grads["blocks"]["att"]["v1"][...]))

    # RNN mode through the scanned layers carries the same state as the parallel pass
    step = nnx.jit(lambda m, t, s: m.step(t, s))
    state = start
    for t in range(5):
        logits, state = step(scanned, tokens[:, t], state)
    full, after = nnx.jit(lambda m, t, s: m(t, s))(unrolled, tokens[:, :5], start)
    np.testing.assert_allclose(logits, full[:, -1], atol=2e-5, rtol=0)
    for a, b in zip(state, after):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def test_scanned_rwkv7_has_the_official_parameters_and_round_trips():
    config = dataclasses.replace(CONFIG, scan_layers=True)
    scanned = rwkv7.RWKV7(config, rngs=nnx.Rngs(7))
    unrolled = rwkv7.RWKV7(CONFIG, rngs=nnx.Rngs(7))
    count = lambda m: sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    layout = sum(math.prod(shape) for _, _, shape in rwkv7.weights_layout(CONFIG).values())
    assert count(scanned) == count(unrolled) == layout
    # the same init, layer for layer, and bit-exact conversions both ways
    for a, b in zip(jax.tree.leaves(nnx.state(with_scan_layers(scanned, False))), jax.tree.leaves(nnx.state(unrolled))):
        np.testing.assert_array_equal(a, b)
    back = with_scan_layers(with_scan_layers(scanned, False), True)
    for a, b in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(scanned))):
        np.testing.assert_array_equal(a, b)
    # the .pth tensors: the same names and values, and loading them into a scanned model
    model = randomized(CONFIG, seed=2)
    official = weights.model_to_official(model)
    from_scanned = weights.model_to_official(with_scan_layers(model, True))
    assert official.keys() == from_scanned.keys() == rwkv7.weights_layout(CONFIG).keys()
    assert "blocks.0.att.v1" in official and "blocks.0.ln0.weight" in official
    for name in official:
        np.testing.assert_array_equal(from_scanned[name], official[name])
    reloaded = weights.model_from_official(official, scan_layers=True, wkv_form="sequential")
    assert reloaded.config.scan_layers and reloaded.config.version == 7
    for a, b in zip(jax.tree.leaves(nnx.state(with_scan_layers(reloaded, False))), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(a, b)
    # the layers 1..L-1 run as one lax.scan (unrolled when compiled for CPU, a loop elsewhere)
    graphdef, state = nnx.split(scanned)
    jaxpr = str(jax.make_jaxpr(lambda state: nnx.merge(graphdef, state)(jnp.zeros((1, 3), jnp.int32))[0])(state))
    assert "scan[" in jaxpr and "platform_index" in jaxpr and "length=2" in jaxpr
    with pytest.raises(ValueError, match=r"needs n_layer >= 2 .* set model.scan_layers=False"):
        rwkv7.RWKV7(dataclasses.replace(config, n_layer=1), rngs=nnx.Rngs(0))


@pytest.mark.slow  # the model-level equality (logits, state, gradients) runs in CI; this adds the optimizer
def test_a_train_step_on_scanned_rwkv7_equals_one_on_the_list():
    optim_config = optim.default_optim_config()
    optim_config.update(lr_init=1e-2, lr_final=1e-3, warmup_steps=0, weight_decay=0.1, layerwise_lr=True)
    optimizer = optim.make_optimizer(optim_config, 10)
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 13)).astype(np.int32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    model = randomized(CONFIG, seed=5)
    results = {}
    for scan in (False, True):
        config = dataclasses.replace(CONFIG, scan_layers=scan, remat=scan)
        graphdef, init, _, shardings = train_step.train_state_factory(config, optimizer, mesh, 0)
        step_fn = train_step.make_train_step(graphdef, optimizer, optim.learning_rate(optim_config, 10), shardings,
                                             mesh, microbatches=1)
        state = init(jax.tree.map(jnp.copy, nnx.state(with_scan_layers(model, scan))))  # init donates
        losses = []
        for _ in range(2):
            state, out = step_fn(state, batch)
            losses.append(float(out["loss"]))
        results[scan] = losses, as_list(state.params, graphdef) if scan else [
            np.asarray(x) for x in jax.tree.leaves(state.params)]
    (list_losses, list_params), (scan_losses, scan_params) = results[False], results[True]
    np.testing.assert_allclose(scan_losses, list_losses, rtol=1e-6)
    assert list_losses[1] < list_losses[0]
    for a, b in zip(list_params, scan_params):
        assert_close(a, b)


def test_sharding_gives_stacked_params_their_layers_spec_with_the_layer_axis_unsharded():
    mesh = AbstractMesh((1, 4, 2), sharding.MESH_AXES)
    big = dataclasses.replace(CONFIG, d_model=64, n_layer=3)
    unrolled = nnx.eval_shape(lambda: rwkv7.RWKV7(big, rngs=nnx.Rngs(0)))
    scanned = nnx.eval_shape(lambda: rwkv7.RWKV7(dataclasses.replace(big, scan_layers=True), rngs=nnx.Rngs(0)))
    spec = lambda v: sharding.spec_for(v.get_metadata()["logical_axes"], v.shape, mesh)
    flat = lambda m, key: dict(nnx.to_flat_state(nnx.state(m, nnx.Param)[key]))
    layer1, stacked = flat(unrolled, "blocks"), flat(scanned, "blocks")
    layer1 = {path[1:]: v for path, v in layer1.items() if path[0] == 1}
    assert layer1.keys() == stacked.keys()
    sharded = 0
    for path, variable in stacked.items():
        assert variable.get_metadata()["logical_axes"][0] == "layers", path
        assert tuple(spec(variable)) == (None, *spec(layer1[path])), path
        sharded += any(spec(variable))
    assert sharded >= 10  # the projections and vectors are split over fsdp / tensor, not just replicated
    block0 = flat(scanned, "block0")
    for path, variable in flat(unrolled, "blocks").items():
        if path[0] == 0:
            assert spec(block0[path[1:]]) == spec(variable), path


def test_rwkv7_paper_configs_resolve_scan_layers_auto_as_rwkv4():
    v7 = config_lib.rwkv7_paper_config(n_layer=2, d_model=64, vocab_size=128, lr_init=1e-3, lr_final=1e-4,
                                       weight_decay=0.1)
    v4 = config_lib.paper_config(n_layer=2, d_model=64, lr_init=1e-3, lr_final=1e-4)
    assert v7.model.scan_layers == v4.model.scan_layers == "auto" and v7.model.remat
    for platform in ("cpu", "gpu", "tpu"):
        resolved = [ModelConfig.from_dict(c.model.to_dict(), platform).scan_layers for c in (v7, v4)]
        assert resolved == [platform != "cpu"] * 2, platform
