"""Model structure: v4neo initialisation, Table 2 parameter counts, causality, state splitting, bf16, and
token ids outside the vocabulary refused."""

import dataclasses
import importlib.util
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rwkv_jax.model import RWKV, ModelConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

PAPER_PARAMS = {"169m": 169_342_464, "430m": 430_397_440, "1b5": 1_515_106_304, "3b": 2_984_627_200,
                "7b": 7_392_649_216, "14b": 14_148_597_760}


# Jitted forward: eager NNX calls would recompile each scan on every call.
forward = nnx.jit(lambda model, tokens, state=None: model(tokens, state))


def load_config_file(name):
    spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def count_params(model) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_config_has_paper_parameter_count(name):
    config = ModelConfig.from_dict(load_config_file(name).model)
    V, D, L = config.vocab_size, config.d_model, config.n_layer
    abstract = nnx.eval_shape(lambda: RWKV(config, rngs=nnx.Rngs(0)))  # no weights allocated
    assert count_params(abstract) == 2 * V * D + 13 * D * D * L + D * (11 * L + 4) == PAPER_PARAMS[name]
    assert (V, config.ffn_width, load_config_file(name).train.seq_len) == (50277, 4 * D, 1024)


def test_tiny_config_builds_a_model():
    config = ModelConfig.from_dict(load_config_file("tiny").model)
    model = RWKV(config, rngs=nnx.Rngs(0))
    logits, _ = forward(model, jnp.zeros((1, 5), jnp.int32))
    assert logits.shape == (1, 5, config.vocab_size)


def test_unknown_model_config_key_is_named():
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['n_layers'\]"):
        ModelConfig.from_dict({"n_layers": 3})


# --- Initialisation (official RWKV-LM v4neo) -------------------------------------------------------

def _v4neo_reference(layer_id, n_layer, C):
    """The v4neo init formulas written out as that code's loops, independently of rwkv_jax.model.initializers."""
    r01 = layer_id / (n_layer - 1)
    r10 = 1.0 - layer_id / n_layer
    ddd = np.array([i / C for i in range(C)])
    decay = np.array([-5 + 8 * (h / (C - 1)) ** (0.7 + 1.3 * r01) for h in range(C)])
    zigzag = np.array([(i + 1) % 3 - 1 for i in range(C)]) * 0.5
    return {
        "att.time_decay": decay, "att.time_first": np.ones(C) * math.log(0.3) + zigzag,
        "att.time_mix_k": ddd ** r10, "att.time_mix_v": ddd ** r10 + 0.3 * r01,
        "att.time_mix_r": ddd ** (0.5 * r10), "ffn.time_mix_k": ddd ** r10, "ffn.time_mix_r": ddd ** r10,
    }


@pytest.fixture(scope="module")
def small_model():
    return RWKV(ModelConfig(vocab_size=300, d_model=24, n_layer=3), rngs=nnx.Rngs(7))


@pytest.mark.parametrize("layer_id", [0, 1, 2])
def test_time_parameters_follow_v4neo(small_model, layer_id):
    block = small_model.blocks[layer_id]
    for name, expected in _v4neo_reference(layer_id, 3, 24).items():
        sub, param = name.split(".")
        np.testing.assert_allclose(getattr(getattr(block, sub), param)[...], expected, rtol=1e-6, atol=1e-6,
                                   err_msg=name)


def test_matrices_follow_v4neo(small_model):
    D, V = 24, 300
    for block in small_model.blocks:
        for linear in (block.att.key, block.att.receptance, block.att.output, block.ffn.value,
                       block.ffn.receptance):
            assert not np.any(linear.kernel[...]), "v4neo zero-initialises this matrix"
        value = np.asarray(block.att.value.kernel[...])  # square, gain 1
        np.testing.assert_allclose(value.T @ value, np.eye(D), atol=1e-5)
        ffn_key = np.asarray(block.ffn.key.kernel[...])  # torch [4D, D]: gain sqrt(4D / D) = 2
        np.testing.assert_allclose(ffn_key @ ffn_key.T, 4 * np.eye(D), atol=1e-4)
    head = np.asarray(small_model.head.kernel[...])  # torch [V, D]: gain 0.5 * sqrt(V / D)
    np.testing.assert_allclose(head @ head.T, 0.25 * V / D * np.eye(D), atol=1e-4)
    emb = np.asarray(small_model.emb.embedding[...])
    assert np.abs(emb).max() <= 1e-4 and emb.std() == pytest.approx(1e-4 / math.sqrt(3), rel=0.05)
    for ln in [small_model.ln0, small_model.ln_out] + [b.ln1 for b in small_model.blocks]:
        assert np.all(ln.scale[...] == 1) and not np.any(ln.bias[...])


# --- Behaviour --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_model():
    """A model with every parameter random (the v4neo init zeroes most matrices)."""
    model = RWKV(ModelConfig(vocab_size=64, d_model=16, n_layer=2), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [
        x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    return model


def rebuild(model, **config_changes):
    """The same parameters in a model built with a changed config."""
    new = RWKV(dataclasses.replace(model.config, **config_changes), rngs=nnx.Rngs(0))
    nnx.update(new, nnx.state(model, nnx.Param))
    return new


@pytest.mark.parametrize("form", ["sequential", "parallel", "chunked"])
def test_logits_have_zero_gradient_wrt_future_tokens(random_model, form):
    model = rebuild(random_model, wkv_form=form, wkv_chunk_len=4)
    T, t = 11, 5
    tokens = jnp.asarray(np.random.default_rng(0).permutation(64)[:T][None])  # distinct ids
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def logits_at_t(params):
        logits, _ = nnx.merge(graphdef, params, rest)(tokens)
        return logits[0, t].sum()

    emb_grad = np.asarray(jax.jit(jax.grad(logits_at_t))(params)["emb"]["embedding"][...])
    row_norms = np.abs(emb_grad[np.asarray(tokens[0])]).sum(axis=1)
    assert np.all(row_norms[t + 1:] == 0), "logits depend on future tokens"
    assert np.all(row_norms[:t + 1] > 0), "logits should depend on every past token"


@pytest.mark.parametrize("split", [1, 7, 19])
def test_split_sequence_with_carried_state_equals_whole(random_model, split):
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 20)))
    whole, whole_state = forward(random_model, tokens)
    first, state = forward(random_model, tokens[:, :split])
    second, split_state = forward(random_model, tokens[:, split:], state)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, atol=2e-5, rtol=1e-5)
    for a, b in zip(split_state, whole_state):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_step_equals_parallel_mode(random_model):
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (3, 9)))
    whole, whole_state = forward(random_model, tokens)
    state = random_model.init_state(3)
    step = nnx.jit(lambda model, token, state: model.step(token, state))
    for t in range(9):
        logits, state = step(random_model, tokens[:, t], state)
        np.testing.assert_allclose(logits, whole[:, t], atol=2e-5, rtol=1e-5)
    for a, b in zip(state, whole_state):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_empty_state_exponent_is_finite(random_model):
    state = random_model.init_state(2)
    assert np.all(np.isfinite(state.wkv_p)) and np.all(state.wkv_p < -1e29)
    assert {x.dtype for x in state} == {jnp.dtype(jnp.float32)}


def test_bf16_compute_keeps_fp32_state_and_tracks_fp32(random_model):
    bf16_model = rebuild(random_model, dtype="bfloat16")
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 33)))
    ref, _ = forward(random_model, tokens)
    logits, state = forward(bf16_model, tokens)
    assert logits.dtype == jnp.float32 and {x.dtype for x in state} == {jnp.dtype(jnp.float32)}
    assert np.all(np.isfinite(logits))
    # bf16 has 8 mantissa bits: logits of O(1) agree to a few 1e-2.
    assert np.abs(np.asarray(logits) - np.asarray(ref)).max() < 0.1 * max(1.0, np.abs(ref).max())


def test_kernels_cast_once_for_bf16_inference_give_the_same_results(random_model):
    """model.with_kernels_in_compute_dtype: the linears' kernels stored in bf16 (cast once, for evaluation
    and generation) give bit-identical logits and states in both modes; vectors, embedding and LayerNorms
    stay fp32; an fp32 model is returned unchanged."""
    from rwkv_jax.model import with_kernels_in_compute_dtype
    assert with_kernels_in_compute_dtype(random_model) is random_model
    bf16_model = rebuild(random_model, dtype="bfloat16")
    cast = with_kernels_in_compute_dtype(bf16_model)
    dtypes = jax.tree_util.tree_map_with_path(lambda path, x: (getattr(path[-1], "key", None), x.dtype),
                                              nnx.to_pure_dict(nnx.state(cast)))
    pairs = jax.tree.leaves(dtypes, is_leaf=lambda x: isinstance(x, tuple))
    kinds = {(name == "kernel", dtype) for name, dtype in pairs}
    assert kinds == {(True, jnp.dtype(jnp.bfloat16)), (False, jnp.dtype(jnp.float32))}
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 17)))
    for a, b in zip(jax.tree.leaves(forward(bf16_model, tokens)), jax.tree.leaves(forward(cast, tokens))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state = bf16_model.init_state(2)
    stepped = bf16_model.step(tokens[:, 0], state), cast.step(tokens[:, 0], state)
    for a, b in zip(*map(jax.tree.leaves, stepped)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", [6, 300])  # the logits made as [N, V], and from 256 positions (fp32) as [V, N]
def test_token_logprobs_equal_log_softmax_of_the_logits(random_model, dtype, n):
    """RWKV.token_logprobs against a float64 log-softmax of `logits` and argmax, also where two tokens tie
    for the largest logit: only the first of them is the greedy one."""
    model = rebuild(random_model, dtype=dtype)
    kernel = model.head.kernel[...]
    model.head.kernel[...] = kernel.at[:, 41].set(kernel[:, 9] * 50).at[:, 9].set(kernel[:, 9] * 50)  # tied
    hidden = jax.random.normal(jax.random.key(7), (n, 16))
    targets = jnp.asarray(np.resize([9, 41, 3, 60, 0, 9], n))
    logp, greedy = nnx.jit(lambda m, h, t: m.token_logprobs(h, t))(model, hidden, targets)
    logits = np.asarray(nnx.jit(lambda m, h: m.logits(h))(model, hidden), np.float64)
    want = logits[np.arange(n), targets] - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) \
        - logits.max(1)
    assert logp.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logp), want, rtol=1e-5, atol=1e-4 if dtype == "float32" else 0.1)
    np.testing.assert_array_equal(np.asarray(greedy), logits.argmax(1) == np.asarray(targets))
    ties = (logits[:, 9] == logits[:, 41]) & (logits.argmax(1) == 9)
    assert ties.sum() >= 2 and not np.asarray(greedy)[1] and np.asarray(greedy)[0] == ties[0]


def test_bf16_products_accumulate_in_fp32_forward_and_backward():
    """The bf16 model's matmuls (model.layers.dot_fp32_accumulate): the product and both gradients equal fp32
    products of the same bf16 inputs, rounded to bf16 once; a plain bf16 dot's backward would mix a bf16
    and an fp32 operand (XLA:CPU's slow path)."""
    from rwkv_jax.model import layers as model_lib
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 7, 48)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((48, 40)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((2, 7, 40)), jnp.bfloat16)
    y, vjp = jax.vjp(model_lib.dot_fp32_accumulate, x, w)
    dx, dw = vjp(g)
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
    for ours, exact in ((y, x64 @ w64), (dx, g64 @ w64.T), (dw, np.einsum("btk,btn->kn", x64, g64))):
        # One rounding to bf16 (8 mantissa bits) of an fp32-accurate sum: within half a bf16 ulp, 2^-9.
        np.testing.assert_allclose(np.asarray(ours, np.float64), exact, rtol=2.0 ** -8, atol=1e-6)
    # Both gradients: two products, each bf16 x bf16 -> fp32.
    jaxpr = jax.make_jaxpr(lambda x, w: jax.vjp(model_lib.dot_fp32_accumulate, x, w)[1](g))(x, w).jaxpr
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2 and e.outvars[0].aval.dtype == jnp.float32


def test_wrong_token_rank_is_a_clear_error(random_model):
    with pytest.raises(ValueError, match="model.step"):
        random_model(jnp.zeros((3,), jnp.int32))


@pytest.mark.parametrize("policy", ["nothing", "dots"])
def test_remat_gives_identical_gradients(random_model, policy):
    remat_model = rebuild(random_model, remat=True, remat_policy=policy)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 12)))

    def grads(model):
        graphdef, params = nnx.split(model)
        return jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(tokens)[0].sum()))(params)

    # Recomputation changes XLA's fusion, hence fp32 rounding: equal to ~1e-6 of each gradient's scale
    # (a wrong recomputed state would be off by O(1)).
    for a, b in zip(jax.tree.leaves(grads(random_model)), jax.tree.leaves(grads(remat_model))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))


# --- Token ids outside the vocabulary ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    return RWKV(ModelConfig(vocab_size=16, d_model=8, n_layer=1, d_ffn=16), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("bad", [16, -1, 1000])
def test_the_model_refuses_token_ids_outside_the_vocabulary(tiny_model, bad):
    refused = rf"tokens: token id {bad} at token \d is outside the model's vocabulary \[0, 16\)"
    with pytest.raises(ValueError, match=refused):
        tiny_model(jnp.array([[1, 2, bad]]))
    with pytest.raises(ValueError, match=refused):
        tiny_model.step(jnp.array([3, bad]), tiny_model.init_state(2))
    with pytest.raises(ValueError, match=r"must be integer token ids"):
        tiny_model(jnp.array([[1.0, 2.0]]))
    logits, _ = tiny_model(jnp.array([[0, 15]]))  # the edges are fine
    assert bool(jnp.isfinite(logits).all())


def test_the_check_leaves_jit_alone(tiny_model):
    """Under jit the ids are tracers: no check, no host sync (the training pipeline checks its batches)."""
    logits = nnx.jit(lambda m, t: m(t)[0])(tiny_model, jnp.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, 16)
