"""RWKV-7 model parity with the official `rwkv` package (RWKV_x070, RWKV_V7_ON=1, 'cpu fp32').

Random weights with shapes no paper config uses (vocab 97, D = 192 = 3 heads of 64, 2 layers, LoRA widths
that are not multiples of 32, d_ffn = 448) and magnitudes like a trained model's are saved as an official
.pth, loaded by both implementations, and compared on T = 37 tokens (not a multiple of any chunk length).
"""

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rwkv_jax.infer import generation as gen_lib
from rwkv_jax.io import weights
from rwkv_jax.model import ModelConfig
from rwkv_jax.model import rwkv7 as m
from rwkv_jax.ops import wkv7 as wkv7_ops
from tests.conftest import SHARED_DIR

torch = pytest.importorskip("torch")

V, D, L, H, N, F = 97, 192, 2, 3, 64, 448
LORA = {"w": 40, "a": 24, "v": 16, "g": 48}
T = 37
TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]


def random_official_state_dict(seed=0, vocab_size=V) -> dict[str, np.ndarray]:
    """An x070 state dict as the official trainer saves it, with a trained model's magnitudes: decays
    over their whole range (w0 in -6..2), k_k ~ 0.85, k_a ~ 1, small r_k and LoRA matrices."""
    rng = np.random.default_rng(seed)
    normal = lambda scale, *shape: rng.normal(0, scale, shape)
    vec = lambda low, high: rng.uniform(low, high, (1, 1, D))
    sd = {"emb.weight": normal(1.0, vocab_size, D), "blocks.0.ln0.weight": 1 + normal(0.1, D),
          "blocks.0.ln0.bias": normal(0.05, D), "ln_out.weight": 1 + normal(0.1, D),
          "ln_out.bias": normal(0.05, D), "head.weight": normal(2 / D ** 0.5, vocab_size, D)}
    for i in range(L):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + normal(0.1, D), normal(0.05, D)
        att = {f"x_{n}": vec(0, 1) for n in "rwkvag"}
        att.update(w0=vec(-6, 2), a0=vec(-1, 1), v0=vec(-0.5, 1.5), k_k=vec(0.75, 0.95), k_a=vec(0.9, 1.1),
                   r_k=normal(0.1, H, N))
        for name, width in LORA.items():
            att[f"{name}1"] = normal(0.3 / D ** 0.5, D, width)
            att[f"{name}2"] = normal(0.3 / width ** 0.5, width, D)
        for proj in ("receptance", "key", "value", "output"):
            att[f"{proj}.weight"] = normal(1 / D ** 0.5, D, D)
        att["ln_x.weight"], att["ln_x.bias"] = 1 + normal(0.1, D), normal(0.05, D)
        sd.update({p + "att." + k: v for k, v in att.items()})
        sd[p + "ffn.x_k"] = vec(0, 1)
        sd[p + "ffn.key.weight"] = normal(1 / D ** 0.5, F, D)
        sd[p + "ffn.value.weight"] = normal(1 / F ** 0.5, D, F)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


@pytest.fixture(scope="module")
def official_model(tmp_path_factory):
    """(state dict, the official package's RWKV_x070 loaded from the state dict saved as a .pth)."""
    sd = random_official_state_dict()
    path = tmp_path_factory.mktemp("rwkv7") / "model"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, f"{path}.pth")
    return sd, official_x070_module().RWKV_x070(model=str(path), strategy="cpu fp32")


def official_x070_module():
    """The official package's model module as RWKV_V7_ON=1 builds it, under a name of its own: the
    package reads the variable when rwkv.model is imported, and with it on, rwkv.model.RWKV is the x070
    class, which would break the RWKV-4 parity tests run later in this process. rwkv.model itself and
    the environment are left as they were."""
    os.environ.setdefault("RWKV_JIT_ON", "0")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    origin = importlib.util.find_spec("rwkv.model").origin
    spec = importlib.util.spec_from_file_location("rwkv.model_x070_for_tests", origin)
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.get("RWKV_V7_ON")
    os.environ["RWKV_V7_ON"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["RWKV_V7_ON"]
        else:
            os.environ["RWKV_V7_ON"] = saved
    return module


@nnx.jit
def forward(model, tokens_BT, state=None, reset_BT=None):
    """model(tokens, state, reset_BT) compiled once per shape (eager calls would retrace the scans)."""
    return model(tokens_BT, state, reset_BT)


def load(sd, **overrides):
    """Our model of an official state dict, by the package's own loader (format detection included)."""
    model = weights.model_from_official(sd, **overrides)
    assert model.config.version == 7
    return model.config, model


def tokens(seed=1):
    return np.random.default_rng(seed).integers(0, V, T)


def official_sequence(official, toks, state=None):
    """Official parallel mode: logits for every position [T, V] and the state (copied: it is mutated)."""
    state = None if state is None else [s.clone() for s in state]
    logits, state = official.forward([int(t) for t in toks], state, full_output=True)
    return logits.numpy(), [s.clone() for s in state]


def assert_state_matches(ours: m.RWKV7State, official_state, batch_index=0):
    for i in range(L):
        for part, theirs in zip(("att_x", "wkv", "ffn_x"), official_state[3 * i:3 * i + 3]):
            np.testing.assert_allclose(np.asarray(getattr(ours, part)[i, batch_index]), theirs.numpy(),
                                       rtol=0, atol=TOL, err_msg=f"layer {i} {part}")


def test_official_round_trip_is_bit_exact(official_model, tmp_path):
    sd, _ = official_model
    config, model = load(sd)
    shape = (config.vocab_size, config.d_model, config.n_layer, config.head_size, config.ffn_width)
    assert shape == (V, D, L, N, F)
    assert m.lora_dims(config) == LORA
    back = weights.model_to_official(model)
    assert set(back) == set(sd)
    for key in sd:
        assert back[key].dtype == sd[key].dtype and back[key].shape == sd[key].shape, key
        assert np.array_equal(back[key], sd[key]), key
    # and through a .pth written from our model, as torch reads it
    torch.save({k: torch.from_numpy(v) for k, v in back.items()}, tmp_path / "again.pth")
    loaded = torch.load(tmp_path / "again.pth")
    assert all(np.array_equal(loaded[k].numpy(), sd[k]) for k in sd)


def test_official_sizing_rule():
    assert m.lora_dims(ModelConfig(version=7, d_model=768)) == {"w": 64, "a": 64, "v": 32, "g": 128}
    # 2.5 * sqrt(2048) / 32 = 3.5 rounds to 4 (checkpoints may differ: loading reads widths from shapes)
    assert m.lora_dims(ModelConfig(version=7, d_model=2048)) == {"w": 128, "a": 128, "v": 64, "g": 224}


@pytest.mark.parametrize("form", [*wkv7_ops.FORMS, pytest.param("pallas", marks=pytest.mark.slow)])
def test_parallel_mode_matches_official(official_model, form):
    sd, official = official_model
    _, model = load(sd, wkv_form=form)
    toks = tokens()
    expected, expected_state = official_sequence(official, toks)
    assert expected.std() > 1.0                       # sane weights: logits are not degenerate
    logits, state = forward(model, jnp.asarray(toks)[None])
    np.testing.assert_allclose(np.asarray(logits[0]), expected, rtol=0, atol=TOL)
    assert_state_matches(state, expected_state)


@pytest.mark.parametrize("form", wkv7_ops.FORMS)
@pytest.mark.parametrize("split", [1, 16, 30])
def test_split_anywhere_matches_official(official_model, form, split):
    """First `split` tokens, then the rest from the returned state (ours); the official package over the
    whole sequence, and over the same two parts (its own state carry)."""
    sd, official = official_model
    _, model = load(sd, wkv_form=form)
    toks = tokens(2)
    expected, expected_state = official_sequence(official, toks)
    if split > 1:
        first, official_state = official_sequence(official, toks[:split])
        second, official_state = official_sequence(official, toks[split:], official_state)
        np.testing.assert_allclose(np.concatenate([first, second]), expected, rtol=0, atol=TOL)
    logits1, state = forward(model, jnp.asarray(toks[:split])[None])
    logits2, state = forward(model, jnp.asarray(toks[split:])[None], state)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([logits1, logits2], axis=1)[0]), expected,
                               rtol=0, atol=TOL)
    assert_state_matches(state, expected_state)


def test_rnn_mode_matches_official(official_model):
    """Official one-token forward, token by token, against `model.step` (batch of 2 identical rows)."""
    sd, official = official_model
    _, model = load(sd)
    step = nnx.jit(lambda model, tok, state: model.step(tok, state))
    state, official_state = model.init_state(2), None
    for t in tokens(3)[:12]:
        expected, official_state = official.forward([int(t)], official_state)
        official_state = [s.clone() for s in official_state]
        logits, state = step(model, jnp.full((2,), t), state)
        np.testing.assert_allclose(np.asarray(logits), np.broadcast_to(expected.numpy(), (2, V)), rtol=0,
                                   atol=TOL)
    assert_state_matches(state, official_state, batch_index=1)


def test_batch_rows_are_independent_and_forms_agree_in_gradients(official_model):
    """Rows of a batch equal the same sequences run alone; the two WKV forms give the same loss gradient."""
    sd, _ = official_model
    toks = jnp.asarray(np.stack([tokens(4), tokens(5), tokens(6)]))
    grads = {}
    for form in wkv7_ops.FORMS:
        _, model = load(sd, wkv_form=form)
        logits, _ = forward(model, toks)
        alone, _ = forward(model, toks[1:2])
        np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(alone[0]), rtol=0, atol=TOL)

        def loss(model):
            logits, _ = model(toks[:, :-1])
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1).mean()
        grad_state = nnx.jit(nnx.grad(loss))(model)
        grads[form] = weights.model_to_official(nnx.merge(nnx.graphdef(model), grad_state))
    for key, g in grads["sequential"].items():
        scale = max(np.abs(g).max(), 1e-30)
        assert np.abs(grads["chunked"][key] - g).max() <= 1e-4 * scale, key


@pytest.mark.parametrize("form", [*wkv7_ops.FORMS, pytest.param("pallas", marks=pytest.mark.slow)])
def test_resets_equal_documents_run_alone(official_model, form):
    """Row 0 packs three documents (resets at 10 and 25), row 1 has none: each document's logits equal it
    run alone from the empty state, and the final state equals the last document's; one token with a
    reset (RNN mode) equals a fresh start."""
    sd, _ = official_model
    _, model = load(sd, wkv_form=form)
    toks = jnp.asarray(np.stack([tokens(7), tokens(8)]))
    reset_BT = np.zeros((2, T), bool)
    reset_BT[0, [10, 25]] = True
    warm = forward(model, toks[:, :5])[1]            # a non-empty incoming state, dropped by row 0's reset
    logits, state = forward(model, toks, warm, reset_BT=reset_BT)
    row1_alone = forward(model, toks[1:], jax.tree.map(lambda s: s[:, 1:], warm))[0][0]
    np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(row1_alone), rtol=0, atol=TOL)
    for start, stop in [(10, 25), (25, T)]:
        alone, alone_state = forward(model, toks[:1, start:stop])
        np.testing.assert_allclose(np.asarray(logits[0, start:stop]), np.asarray(alone[0]), rtol=0, atol=TOL)
    for ours, theirs in zip(state, alone_state):
        np.testing.assert_allclose(np.asarray(ours[:, 0]), np.asarray(theirs[:, 0]), rtol=0, atol=TOL)
    one, _ = forward(model, toks[:, :1], warm, reset_BT=np.ones((2, 1), bool))
    fresh, _ = forward(model, toks[:, :1])
    np.testing.assert_allclose(np.asarray(one), np.asarray(fresh), rtol=0, atol=TOL)


@pytest.mark.parametrize("form", wkv7_ops.FORMS)
def test_bf16_compute_keeps_fp32_state(official_model, form):
    """dtype='bfloat16': projections in bf16, the residual stream, norms and WKV state in fp32; the
    logits stay near the fp32 model's (bf16 keeps 8 significant bits: a few percent of their range)."""
    sd, _ = official_model
    toks = jnp.asarray(tokens(9))[None]
    logits32, _ = forward(load(sd, wkv_form=form)[1], toks)
    logits, state = forward(load(sd, wkv_form=form, dtype="bfloat16")[1], toks)
    assert logits.dtype == state.wkv.dtype == state.att_x.dtype == state.ffn_x.dtype == jnp.float32
    assert np.abs(np.asarray(logits - logits32)).max() < 0.03 * np.abs(np.asarray(logits32)).max()


# --- The package's programs on an x070 .pth -------------------------------------------------------------

def _run(*args, timeout_s=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                          env=env)


def test_the_loader_refuses_a_damaged_x070_state_dict_naming_the_tensors(official_model):
    sd, _ = official_model
    damaged = {k: v for k, v in sd.items() if k != "blocks.1.att.k_a"}
    damaged["blocks.0.att.extra"] = np.zeros(3, np.float32)
    refused = r"(?s)RWKV-7 model .*unknown \(1\): blocks.0.att.extra.*missing \(1\): blocks.1.att.k_a"
    with pytest.raises(weights.WeightsMismatchError, match=refused):
        weights.model_from_official(damaged)
    with pytest.raises(ValueError, match=r"the HF format holds RWKV-4 models only .* RWKV-7"):
        weights.write_hf_dir(sd, REPO / "never-written")
    assert not (REPO / "never-written").exists()


def test_rwkv_convert_round_trips_an_x070_pth_bit_for_bit(official_model, tmp_path):
    sd, _ = official_model
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "x070.pth")
    for src, dst in (("x070.pth", "ours"), ("ours", "back.pth")):
        result = _run("-m", "rwkv_jax.cli.convert", str(tmp_path / src), str(tmp_path / dst))
        assert result.returncode == 0, result.stderr[-3000:]
    back = torch.load(tmp_path / "back.pth")
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        assert np.array_equal(back[key].numpy(), value), key


@pytest.fixture(scope="module")
def world_x070_pth(tmp_path_factory):
    """A small random x070 model with the World vocabulary's 65,536 rows, as an official .pth."""
    vocab = SHARED_DIR / "tokenizers" / "rwkv_vocab_v20230424.txt"
    if not vocab.is_file():
        pytest.skip(f"the RWKV World vocabulary is not at {vocab} (development material only)")
    config = ModelConfig(version=7, vocab_size=65536, d_model=64, n_layer=1, head_size=64)
    model = m.RWKV7(config, rngs=nnx.Rngs(0))
    path = tmp_path_factory.mktemp("world") / "RWKV-x070-test.pth"
    weights.write_model(model, path, "pth")
    return path, vocab


def test_eval_and_generate_read_an_x070_pth_with_the_world_tokenizer(world_x070_pth, tmp_path):
    pth, vocab = world_x070_pth
    (tmp_path / "doc.txt").write_text("Hello world. 你好，世界。 The quick brown fox jumps over the lazy dog.\n")
    evaluated = _run("eval.py", f"--checkpoint={pth}", f"--tokenizer={vocab}", f"--text_files={tmp_path}/doc.txt")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "bits per byte" in evaluated.stdout or "bits_per_byte" in evaluated.stdout, evaluated.stdout[-2000:]
    generated = _run("generate.py", f"--checkpoint={pth}", f"--tokenizer={vocab}", "--prompt=Hello",
                     "--max_new_tokens=4", "--temperature=0", f"--save_state={tmp_path / 'state.npz'}")
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.startswith("Hello")
    state, logits = gen_lib.load_state(tmp_path / "state.npz")   # the matrix state, saved by the command
    assert type(state).__name__ == "RWKV7State" and state.wkv.shape == (1, 1, 1, 64, 64)
    assert logits.shape == (1, 65536) and np.any(state.wkv != 0)


def test_loaded_models_run_the_inference_form(official_model):
    """A model loaded to evaluate or generate picks the form fastest without gradients (sequential on
    CPU); an explicit form is kept."""
    sd, _ = official_model
    assert load(sd)[0].wkv_form == ("sequential" if jax.default_backend() == "cpu" else
                                    ModelConfig.from_dict({"version": 7}).wkv_form)
    assert load(sd, wkv_form="chunked")[0].wkv_form == "chunked"


def test_generation_state_saved_and_loaded_continues_exactly(official_model, tmp_path):
    """generate.py --save_state / --load_state for RWKV-7: 8 tokens, the state written and read back, then 8
    more equal one run of 16 (a new prompt after a loaded state: test_generate.py, generation-independent)."""
    sd, _ = official_model
    _, model = load(sd)
    prompts = [[5, 17, 42], [88]]
    whole = gen_lib.generate_tokens(model, prompts, max_new_tokens=16, temperature=0, stop_at_eot=False)
    half = gen_lib.generate_tokens(model, prompts, max_new_tokens=8, temperature=0, stop_at_eot=False)
    gen_lib.save_state(tmp_path / "state.npz", half.state, half.logits)
    state, logits = gen_lib.load_state(tmp_path / "state.npz", model)
    rest = gen_lib.generate_tokens(model, [[], []], max_new_tokens=8, temperature=0, stop_at_eot=False,
                                   state=state, logits=logits)
    for w, h, r in zip(whole, half, rest):
        assert h.tokens + r.tokens == w.tokens


def test_lm_eval_state_branching_with_the_matrix_state(tmp_path):
    """The lm-eval adapter shares each context's state (WKV matrices included) among its continuations:
    the same log-probabilities as each pair scored alone by eval.py's scorer."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from rwkv_jax.data import tokenizer as tokenizer_lib
    from rwkv_jax.data.documents import Document
    from rwkv_jax.infer import evaluation
    from rwkv_jax.infer.lm_eval_adapter import RWKVLM
    from tests.helpers import write_byte_tokenizer
    tok = tokenizer_lib.load_tokenizer_file(write_byte_tokenizer(tmp_path / "bytes.json"))
    _, model = load(random_official_state_dict(seed=3, vocab_size=tok.vocab_size))
    lm = RWKVLM(checkpoint=model, tokenizer=tok, batch_size=2, window=8, prefill_chunk=4, max_positions=8)
    pairs = [("the river", " runs"), ("the river", " falls far"), ("a stone house", " near"),
             ("old", " green light"), ("a stone house", " sings over the")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    docs = [Document(np.asarray(tok.encode(c) + tok.encode(x), np.int32), score_from=len(tok.encode(c)))
            for c, x in pairs]
    scored = {s.index: s for s in evaluation.score_documents(model, docs, batch_size=2, window=8,
                                                              start_token=tok.eot_id)}
    for i, (logp, greedy) in enumerate(got):
        k = docs[i].score_from
        assert logp == pytest.approx(-float(np.sum(scored[i].loss["parallel"][k:], dtype=np.float64)), abs=1e-4)
        assert greedy == bool(np.all(scored[i].hit["parallel"][k:]))
