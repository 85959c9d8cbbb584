"""Generation: prefill in parallel mode, decode as an RNN; checked against HF transformers' greedy decoding
on the same random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rwkv_jax.data.tokenizer import HFJsonTokenizer
from rwkv_jax.infer import generation as gen_lib
from rwkv_jax.io import weights
from tests.helpers import write_byte_tokenizer
from tests.peers import random_hf_model

VOCAB = 260


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    hf = random_hf_model(vocab_size=VOCAB, d_model=32, n_layer=2, seed=3)
    tensors = {weights.hf_to_official_name(k): v.numpy() for k, v in hf.state_dict().items()}
    model = weights.model_from_official(tensors)
    tok = HFJsonTokenizer(write_byte_tokenizer(tmp_path_factory.mktemp("tok") / "bytes.json"))
    return hf, model, tok


def hf_greedy(hf, prompt, n):
    """Greedy decoding with HF's own RNN state: the prompt in one call, then one token per call."""
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        tokens = []
        for _ in range(n):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            out = hf(torch.tensor([[token]]), state=out.state, use_cache=True)
    return tokens


def test_greedy_matches_hf_batch_of_different_lengths(peers):
    hf, model, _ = peers
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, VOCAB, n).tolist() for n in (37, 5, 1)]
    got = gen_lib.generate_tokens(model, prompts, max_new_tokens=20, temperature=0, stop_at_eot=False,
                                  prefill_chunk=8)  # 37 = 4 chunks of 8 + 4 + 1
    for prompt, completion in zip(prompts, got):
        assert completion.tokens == hf_greedy(hf, prompt, 20)
        assert completion.stop_reason == "length"


def test_prefill_pieces_and_state_equal_one_call(peers):
    _, model, _ = peers
    assert gen_lib._pieces(37, 8) == [8, 8, 8, 8, 4, 1]
    assert gen_lib._pieces(7, 8) == [4, 2, 1] and gen_lib._pieces(16, 8) == [8, 8] and gen_lib._pieces(0, 8) == []
    tokens = np.random.default_rng(1).integers(0, VOCAB, 29).tolist()
    state, logits = gen_lib.prefill(model, [tokens], chunk=8)
    full_logits, full_state = model(jnp.asarray([tokens]))
    np.testing.assert_allclose(logits[0], full_logits[0, -1], atol=2e-5, rtol=0)
    for a, b in zip(state, full_state):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_sampling_filters():
    key = jax.random.key(0)
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
    draws = lambda **kw: np.asarray(gen_lib.sample_logits(key, logits, **kw))  # noqa: E731
    assert set(draws(top_k=2, use_top_p=False).tolist()) == {0, 1}
    assert set(draws(top_p=0.75).tolist()) == {0, 1}          # 0.5 < 0.75 <= 0.8
    assert set(draws(top_p=0.5).tolist()) == {0}              # the top token alone reaches 0.5
    assert set(draws(top_p=0.81).tolist()) == {0, 1, 2}
    plain = draws(use_top_p=False)
    np.testing.assert_allclose(np.bincount(plain, minlength=4) / len(plain), [0.5, 0.3, 0.15, 0.05], atol=0.035)
    hot = draws(temperature=100.0, use_top_p=False)           # nearly uniform
    assert np.bincount(hot, minlength=4).min() > 350
    assert (draws(greedy=True) == 0).all()


def test_seed_top_k_1_and_reproducibility(peers):
    _, model, _ = peers
    prompts = [[5, 6, 7], [9]]
    greedy = gen_lib.generate_tokens(model, prompts, max_new_tokens=12, temperature=0, stop_at_eot=False)
    top1 = gen_lib.generate_tokens(model, prompts, max_new_tokens=12, temperature=1.5, top_k=1, seed=4,
                                   stop_at_eot=False)
    assert [c.tokens for c in top1] == [c.tokens for c in greedy]
    sample = lambda seed: gen_lib.generate_tokens(model, prompts, max_new_tokens=12, temperature=1.0,  # noqa: E731
                                                  top_p=0.9, seed=seed, stop_at_eot=False)
    a, b, c = sample(7), sample(7), sample(8)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def test_top_k_at_or_above_the_vocabulary_keeps_every_token(peers):
    _, model, _ = peers
    sample = lambda k: gen_lib.generate_tokens(model, [[5, 6]], max_new_tokens=6, top_k=k, seed=2,  # noqa: E731
                                               stop_at_eot=False)[0].tokens
    assert sample(VOCAB) == sample(VOCAB + 1) == sample(10 ** 6) == sample(0)


def test_stop_strings_streaming_and_eot(peers):
    _, model, tok = peers
    free = gen_lib.generate(model, tok, ["ab"], max_new_tokens=24, temperature=0, stop_at_eot=False)[0]
    text = free.text
    assert len(free.tokens) == 24 and tok.decode(free.tokens) == text
    stop = text[6:8]  # a stop string that occurs: generation must end there
    pieces = []
    got = gen_lib.generate(model, tok, ["ab"], max_new_tokens=24, temperature=0, stop=[stop], stop_at_eot=False,
                           on_token=lambda row, token, piece: pieces.append((row, token, piece)))[0]
    cut = text.find(stop)
    assert got.stop_reason == "stop" and got.text == text[:cut]
    assert got.tokens == free.tokens[:len(got.tokens)] and len(got.tokens) < 24  # the loop stopped early
    assert "".join(p for _, _, p in pieces) == got.text                          # streamed = returned
    assert [t for _, t, _ in pieces if t is not None] == got.tokens               # in order, as they came
    # end-of-text: with the first greedy token as the eot id, generation stops after one token
    first = free.tokens[0]
    ended = gen_lib.generate_tokens(model, [tok.encode("ab")], max_new_tokens=10, temperature=0, eot_id=first)[0]
    assert ended.tokens == [first] and ended.stop_reason == "eot"


def test_state_save_load_continues_exactly(peers, tmp_path):
    _, model, tok = peers
    whole = gen_lib.generate(model, tok, ["hello", "x"], max_new_tokens=16, temperature=0, stop_at_eot=False)
    half = gen_lib.generate(model, tok, ["hello", "x"], max_new_tokens=8, temperature=0, stop_at_eot=False)
    path = tmp_path / "state.npz"
    gen_lib.save_state(path, half.state, half.logits)
    state, logits = gen_lib.load_state(path)
    rest = gen_lib.generate(model, tok, ["", ""], max_new_tokens=8, temperature=0, stop_at_eot=False,
                            state=state, logits=logits)
    for w, h, r in zip(whole, half, rest):
        assert h.tokens + r.tokens == w.tokens
    # a new prompt after the saved state equals one prompt holding both
    joined = gen_lib.generate_tokens(model, [tok.encode("hello") + half[0].tokens + tok.encode(" ok")],
                                     max_new_tokens=6, temperature=0, stop_at_eot=False)
    one_row = jax.tree.map(lambda x: x[:, :1], state)
    cont = gen_lib.generate(model, tok, [" ok"], max_new_tokens=6, temperature=0, stop_at_eot=False, state=one_row)
    assert cont[0].tokens == joined[0].tokens


def test_bad_inputs(peers, tmp_path):
    _, model, tok = peers
    with pytest.raises(ValueError, match="empty and there are no saved logits"):
        gen_lib.generate_tokens(model, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        gen_lib.generate_tokens(model, [[VOCAB + 3]], max_new_tokens=2)
    with pytest.raises(ValueError, match="does not fit this model"):
        one_layer = jax.tree.map(lambda x: x[:1], model.init_state(1))
        gen_lib.generate_tokens(model, [[1]], max_new_tokens=2, state=one_layer)
    with pytest.raises(ValueError, match=r"holds 2 rows .* but 3 prompts were given: give 2 prompts"):
        gen_lib.generate_tokens(model, [[1], [2], [3]], max_new_tokens=2, state=model.init_state(2))
    np.savez(tmp_path / "junk.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not an RWKV state file"):
        gen_lib.load_state(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match="top_p"):
        gen_lib.generate_tokens(model, [[1]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0 and < 2\\*\\*31"):  # was an OverflowError in jit
        gen_lib.generate_tokens(model, [[1]], max_new_tokens=3_000_000_000)
    with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*63\)"):  # was an OverflowError
        gen_lib.generate_tokens(model, [[1]], max_new_tokens=2, seed=2 ** 64)
    with pytest.raises(ValueError, match="temperature >= 0"):  # NaN logits sampled end-of-text at once
        gen_lib.generate_tokens(model, [[1]], max_new_tokens=2, temperature=float("nan"))


def test_command_line_streams_and_saves_state(peers, tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    _, model, tok = peers
    pth = tmp_path / "m.pth"
    weights.write_pth(weights.model_to_official(model), pth)
    state_file = tmp_path / "s.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "rwkv_jax.cli.generate", f"--checkpoint={pth}", f"--tokenizer={tok.path}",
         "--prompt=Hello", "--max_new_tokens=12", "--temperature=0", "--nostop_at_eot",
         f"--save_state={state_file}"], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[1], env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = gen_lib.generate(model, tok, ["Hello"], max_new_tokens=12, temperature=0, stop_at_eot=False)
    assert proc.stdout.startswith("Hello" + want[0].text) and "[length: 12 tokens]" in proc.stdout
    state, logits = gen_lib.load_state(state_file)
    np.testing.assert_allclose(state.wkv_b, want.state.wkv_b, rtol=1e-6)
    np.testing.assert_allclose(logits, want.logits, rtol=1e-5, atol=1e-5)
