"""rwkv-jax as an lm-evaluation-harness model (rwkv_jax/infer/lm_eval_adapter.py, rwkv_jax/cli/lm_eval.py, tasks/): on a
random official .pth with the GPT-NeoX tokenizer, checked against HF transformers (directly and through the
harness's own `hf` model), eval.py's LAMBADA and perplexity scoring, and rwkv_jax.infer.generation."""

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

# The tasks read local files: never reach for the HF hub (set before `datasets` is imported).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (requirements-dev.txt pins it: "
                              "pip install -r requirements-dev.txt)")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from rwkv_jax.data.documents import Document, documents_from_texts  # noqa: E402
from rwkv_jax.infer import evaluation as ev  # noqa: E402
from rwkv_jax.infer import generation as gen_lib  # noqa: E402
from rwkv_jax.infer.lm_eval_adapter import RWKVLM  # noqa: E402
from rwkv_jax.io import weights  # noqa: E402
from tests.conftest import SHARED_DIR  # noqa: E402
from tests.peers import hf_logits, random_hf_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = SHARED_DIR / "tokenizers" / "gpt-neox-20b.json"
VOCAB = 50277
# Every test reads contexts 4 at a time in chunks of at most 8 tokens: few shapes to compile.
MODEL_ARGS = {"batch_size": 4, "window": 16, "prefill_chunk": 8}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(HF peer, our model, tokenizer, the .pth path, the adapter on it)."""
    if not TOKENIZER.is_file():
        pytest.skip(f"the GPT-NeoX tokenizer is not at {TOKENIZER} (development material in ../shared)")
    hf = random_hf_model(vocab_size=VOCAB, d_model=32, n_layer=2, seed=5)
    tensors = {weights.hf_to_official_name(k): v.numpy() for k, v in hf.state_dict().items()}
    pth = tmp_path_factory.mktemp("ckpt") / "model.pth"
    weights.write_pth(tensors, pth)
    lm = RWKVLM(checkpoint=str(pth), tokenizer=str(TOKENIZER), **MODEL_ARGS)
    return hf, lm.model, lm.tokenizer, pth, lm


def requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def harness_split(tok, context, continuation):
    """Context and continuation ids as the harness's TemplateLM encodes a pair for a causal model."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


def hf_continuation(hf, prefix, ctx, cont):
    """log p(cont | prefix + ctx) and whether every token is HF's argmax, from one HF forward call."""
    seq = np.asarray(prefix + ctx + cont)
    logp = torch.log_softmax(torch.from_numpy(hf_logits(hf, seq[None, :-1])[0]).double(), -1).numpy()
    pos = np.arange(len(prefix + ctx) - 1, len(seq) - 1)
    return float(logp[pos, seq[pos + 1]].sum()), bool(np.all(logp[pos].argmax(-1) == seq[pos + 1]))


def hf_argmax_word(hf, tok, prefix, context):
    """HF's greedy next token after the context, when it decodes to one word after a space, else None."""
    ids = prefix + tok.encode(context)
    t = int(hf_logits(hf, np.asarray(ids)[None])[0, -1].argmax())
    word = tok.decode([t])
    return word if re.fullmatch(r" [A-Za-z]+", word) and tok.encode(word) == [t] else None


PAIRS = [("The cat sat on the", " mat."), ("The cat sat on the", " chair by the window"),
         ("The cat sat on the", " roof"), ("", "Hello world"), ("Numbers: one two ", "three four"),
         ("A longer context about the weather in the mountains, where it rains", " often.")]


def test_loglikelihood_equals_hf(setup):
    """Each (context, continuation) against HF transformers' log-probability: read after end-of-text (the
    default) or '\\n', and from the empty state (context_prefix='none') against the harness's own `hf` model."""
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedTokenizerFast
    hf, _, tok, _, lm = setup
    greedy_word = hf_argmax_word(hf, tok, [tok.eot_id], PAIRS[0][0])
    assert greedy_word is not None  # so that a True greedy flag is checked too
    pairs = PAIRS + [(PAIRS[0][0], greedy_word)]
    for prefix, prefix_ids in (("eot", [tok.eot_id]), ("newline", tok.encode("\n"))):
        lm.context_prefix = prefix
        try:
            got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
        finally:
            lm.context_prefix = "eot"
        for (context, continuation), (logp, greedy) in zip(pairs, got):
            # an empty context is the end-of-text token whatever the prefix, as in the harness
            ctx, cont = harness_split(tok, context, continuation) if context else ([], tok.encode(continuation))
            want, want_greedy = hf_continuation(hf, prefix_ids if context else [tok.eot_id], ctx, cont)
            assert abs(logp - want) < 1e-4 and greedy == want_greedy, (prefix, context, continuation)
        if prefix == "eot":
            assert got[-1][1] and not got[0][1]

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER), eos_token="<|endoftext|>")
    hflm = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=4, device="cpu")
    want = hflm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    lm.context_prefix = "none"
    try:
        got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    finally:
        lm.context_prefix = "eot"
    for pair, (logp, greedy), (want_logp, want_greedy) in zip(pairs, got, want):
        assert abs(logp - want_logp) < 1e-4 and greedy == want_greedy, pair


@pytest.mark.parametrize("layout", ["default", pytest.param("small", marks=pytest.mark.slow)])
def test_state_branching_equals_scoring_from_scratch(setup, layout):
    """Groups of 1 to 4 continuations of contexts of many lengths, scored 8 positions per call: the same
    as each pair scored alone by eval.py's scorer (which applies the head at every position). 'default':
    batches of 4 contexts (one of them short of rows) read in chunks of up to 8 tokens, three of a batch's
    rows left-padded, rows of 6 batches sorted together. 'small': batches of 2 read 2 tokens per chunk, so
    that a padded row's reset falls in a later chunk, at its first position or inside it; a context 30
    words long (a batch of its own: the padding would be long), one batch's rows per block."""
    _, model, tok, pth, _ = setup
    small = layout == "small"
    args = {**MODEL_ARGS, "max_positions": 8, **({"batch_size": 2, "prefill_chunk": 2} if small else {})}
    lm = RWKVLM(checkpoint=model, tokenizer=tok, **args)
    if small:
        lm.BLOCK_BATCHES = 1
    rng = np.random.default_rng(0)
    words = "the a river stone house light quiet green old runs falls sings over under near far".split()
    pairs = []
    for n_ctx in (1, 2, 5, 9, 13, 3) + ((30, 12) if small else (12, 11, 10)):
        context = " ".join(rng.choice(words, n_ctx))
        for _ in range(rng.integers(1, 5)):
            pairs.append((context, " " + " ".join(rng.choice(words, rng.integers(1, 7)))))
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    docs = []
    for context, continuation in pairs:
        ctx, cont = harness_split(tok, context, continuation)
        docs.append(Document(np.asarray(ctx + cont, np.int32), score_from=len(ctx)))
    scored = {s.index: s for s in ev.score_documents(model, docs, batch_size=2, window=8, start_token=tok.eot_id)}
    for i, (logp, greedy) in enumerate(got):
        k = docs[i].score_from
        assert logp == pytest.approx(-float(np.sum(scored[i].loss["parallel"][k:], dtype=np.float64)), abs=1e-5)
        assert greedy == bool(np.all(scored[i].hit["parallel"][k:]))
    assert len({p[0] for p in pairs}) >= 8 and len(pairs) > 8


def test_lambada_task_equals_eval_lambada(setup, tmp_path, monkeypatch):
    """The harness's accuracy and perplexity on the shipped tasks/lambada_local and on a copy whose last
    words are partly the model's own greedy words (accuracy > 0) equal eval.py's LAMBADA evaluation."""
    hf, model, tok, _, lm = setup
    shipped = REPO / "tasks" / "data" / "lambada_local.jsonl"
    texts = [json.loads(line)["text"] for line in shipped.read_text().splitlines()]
    mixed = []
    for i, text in enumerate(texts):
        context = text.rsplit(" ", 1)[0]
        word = hf_argmax_word(hf, tok, [tok.eot_id], context) if i % 2 else None
        mixed.append(context + word if word else text)
    greedy_file = tmp_path / "lambada_greedy.jsonl"
    greedy_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in mixed))
    config = (REPO / "tasks" / "lambada_local.yaml").read_text()
    (tmp_path / "lambada_greedy.yaml").write_text(
        config.replace("task: lambada_local", "task: lambada_greedy").replace("tasks/data/lambada_local.jsonl",
                                                                              str(greedy_file)))
    monkeypatch.chdir(REPO)  # the shipped task reads its data relative to the repository root
    out = lm_eval.simple_evaluate(model=lm, tasks=["lambada_local", "lambada_greedy"], bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=[str(REPO / "tasks"), str(tmp_path)],
                                                           include_defaults=False))
    for task, path in (("lambada_local", shipped), ("lambada_greedy", greedy_file)):
        examples = ev.lambada_examples(path)
        for context, target in examples:  # the harness's one-string split is eval.py's separate encoding
            assert harness_split(tok, context, target) == (tok.encode(context), tok.encode(target))
        want = ev.evaluate_lambada(model, examples, tok, batch_size=4, window=64)
        got = out["results"][task]
        assert got["acc,none"] == want["accuracy"]
        assert math.log(got["perplexity,none"]) == pytest.approx(math.log(want["perplexity"]), abs=1e-4)
    assert out["results"]["lambada_greedy"]["acc,none"] >= 0.25


def test_loglikelihood_rolling_equals_eval_documents(setup):
    """Whole documents (longer than the 16-token window: state carried) against eval.py's summed loss, and
    each one against HF transformers in one call."""
    hf, model, tok, _, lm = setup
    texts = ["Short one.", "The river runs past the old mill, under the stone bridge, and on through the "
             "fields where the farmers grow wheat and barley every summer. " * 2, "",
             "Zwölf Boxkämpfer jagen Viktor."]
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    assert got[2] == 0.0
    report = ev.evaluate_documents(model, documents_from_texts(texts, tok), start_token=tok.eot_id, window=64)
    assert report["documents"] == 3 and report["tokens"] > 3 * lm.window
    assert -sum(got) == pytest.approx(report["loss"] * report["tokens"], abs=1e-4)
    for text, logp in zip(texts, got):
        if text:
            want, _ = hf_continuation(hf, [tok.eot_id], [], tok.encode(text))
            assert logp == pytest.approx(want, abs=1e-4)


def test_generate_until_stops_and_equals_greedy_generate(setup):
    _, model, tok, _, lm = setup
    eot = tok.decode([tok.eot_id])

    def greedy(prompt, n, stop=()):  # rwkv_jax's greedy decoding of the prompt read after end-of-text
        return gen_lib.generate_tokens(model, [[tok.eot_id] + tok.encode(prompt)], max_new_tokens=n, temperature=0,
                                       eot_id=tok.eot_id, decode=tok.decode, stop=[*stop, eot])[0]

    prompts = ["Once upon a time", "The weather today is"]
    free = [greedy(p, 12) for p in prompts]
    text = free[0].text
    stop = text[4:7]
    assert stop.strip() and text.index(stop) >= 1
    got = lm.generate_until(requests("generate_until", [(prompts[0], {"until": [stop], "max_gen_toks": 12}),
                                                        (prompts[1], {"until": ["\n\n\n"], "max_gen_toks": 5})]),
                            disable_tqdm=True)
    assert got[0] == text[:text.index(stop)]
    assert greedy(prompts[0], 12, [stop]).stop_reason == "stop"
    five = greedy(prompts[1], 5)
    assert got[1] == five.text and five.stop_reason == "length" and free[1].text.startswith(five.text)
    lm.context_prefix = "none"  # prompts read from the empty state: exactly rwkv_jax.infer.generation.generate
    try:
        got = lm.generate_until(requests("generate_until", [(prompts[0], {"until": [stop], "max_gen_toks": 12})]),
                                disable_tqdm=True)
    finally:
        lm.context_prefix = "eot"
    want = gen_lib.generate(model, tok, prompts[0], max_new_tokens=12, temperature=0, stop=[stop, eot])[0]
    assert got[0] == want.text


@pytest.fixture
def no_catalog(monkeypatch):
    """Task managers that index only --include_path, not the harness's catalog of ~14k YAML files (10 s)."""
    init = lm_eval.tasks.TaskManager.__init__
    monkeypatch.setattr(lm_eval.tasks.TaskManager, "__init__",
                        lambda self, *args, **kwargs: init(self, *args, **{**kwargs, "include_defaults": False}))


def test_command_line_multiple_choice(setup, tmp_path, monkeypatch, capsys, no_catalog):
    """python -m rwkv_jax.cli.lm_eval on the shipped multiple-choice task: its accuracy is the argmax over each
    question's endings of the adapter's log-probabilities; a missing checkpoint is one error line."""
    from rwkv_jax.cli import lm_eval as entry
    _, _, _, pth, lm = setup
    monkeypatch.chdir(REPO)
    entry.main(["--model_args", f"checkpoint={pth},tokenizer={TOKENIZER},prefill_chunk=8", "--tasks", "choice_local",
                "--include_path", "tasks/", "--batch_size", "4", "--output_path",
                str(tmp_path / "out")])
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["choice_local"]
    docs = [json.loads(line) for line in (REPO / "tasks" / "data" / "choice_local.jsonl").read_text().splitlines()]
    pairs = [(d["context"], " " + e) for d in docs for e in d["endings"]]
    scores = iter(lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True))
    hits = [int(np.argmax([next(scores)[0] for _ in d["endings"]])) == d["label"] for d in docs]
    assert results["acc,none"] == pytest.approx(np.mean(hits))
    assert "choice_local" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        entry.main(["--model_args", f"checkpoint={tmp_path}/missing.pth,tokenizer={TOKENIZER}", "--tasks",
                    "choice_local", "--include_path", "tasks/"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2].startswith("rwkv_jax.cli.lm_eval: error: ") and "missing.pth" in err[-2]


def test_harness_argv_and_bad_model_args(setup):
    from rwkv_jax.cli.lm_eval import harness_argv
    assert harness_argv(["--tasks", "x"]) == ["lm-eval", "--tasks", "x", "--model", "rwkv_jax"]
    assert harness_argv(["run", "--model", "hf"]) == ["lm-eval", "run", "--model", "hf"]
    assert harness_argv(["ls", "tasks"]) == ["lm-eval", "ls", "tasks"]
    _, model, tok, _, _ = setup
    with pytest.raises(ValueError, match="unknown model args \\['windw'\\]"):
        RWKVLM(checkpoint=model, tokenizer=tok, windw=3)
    with pytest.raises(ValueError, match="context_prefix must be one of"):
        RWKVLM(checkpoint=model, tokenizer=tok, context_prefix="bos")
    with pytest.raises(ValueError, match="batch_size must be"):
        RWKVLM(checkpoint=model, tokenizer=tok, batch_size="many")
    _, _, _, pth, _ = setup  # numerics overrides and sizes are checked when the model is made, naming the arg
    with pytest.raises(ValueError, match="wkv_form must be one of .*'bogus'"):  # was an error at the first request
        RWKVLM(checkpoint=str(pth), tokenizer=tok, wkv_form="bogus")
    with pytest.raises(ValueError, match="dtype must be one of .*'float64'"):  # was accepted
        RWKVLM(checkpoint=str(pth), tokenizer=tok, dtype="float64")
    with pytest.raises(ValueError, match="max_gen_toks must be an integer, not 'abc'"):
        RWKVLM(checkpoint=model, tokenizer=tok, max_gen_toks="abc")


def test_batch_size_as_a_model_arg_beside_the_harness_batch_size(setup):
    """README lists batch_size among the model args; the harness also passes its own --batch_size (1 unless
    given) to the constructor: the model arg wins over that default, and two different sizes are an error."""
    _, model, tok, pth, _ = setup
    harness = {"batch_size": 1, "max_batch_size": None, "device": None}
    assert RWKVLM.create_from_arg_obj({"checkpoint": model, "tokenizer": tok, "batch_size": 3}, harness).batch_size == 3
    lm = RWKVLM.create_from_arg_string(f"checkpoint={pth},tokenizer={TOKENIZER},batch_size=5", harness)
    assert lm.batch_size == 5
    with pytest.raises(ValueError, match="batch_size given twice"):
        RWKVLM.create_from_arg_obj({"checkpoint": model, "tokenizer": tok, "batch_size": 3},
                                   {**harness, "batch_size": 8})


def test_empty_contexts_alone_in_a_batch(setup):
    """Contexts of one token (an empty context: the end-of-text token) batched alone have nothing to read
    before their continuation rows (this was an IndexError); the score is that of the rolling scorer."""
    _, model, tok, _, _ = setup
    lm = RWKVLM(checkpoint=model, tokenizer=tok, batch_size=1, window=16, prefill_chunk=8)
    got = lm.loglikelihood(requests("loglikelihood", [("", "hello world"), ("", "the end")]), disable_tqdm=True)
    rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [("hello world",), ("the end",)]),
                                       disable_tqdm=True)
    np.testing.assert_allclose([g[0] for g in got], rolling, rtol=1e-5)


def test_token_ids_outside_the_vocabulary_are_refused(setup, monkeypatch):
    """A continuation (or context) token the model has no row for fails with the cause named, before
    anything is read: the first token is looked up in the head's output, where an index past the end
    would be clamped silently."""
    from rwkv_jax.infer import lm_eval_adapter
    _, _, _, _, lm = setup
    good = [(("a", " b"), [5 + k] * (8 - k), [7]) for k in range(5)]  # a first batch of 4 and more
    reads = []
    monkeypatch.setattr(lm_eval_adapter, "_prefill_last", lambda *a: reads.append(a))
    for ctx, cont in (([5, 6], [VOCAB + 3]), ([5, 6], [7, VOCAB]), ([VOCAB + 1], [7])):
        refused = rf"token id {max(ctx + cont)} at token \d+ is outside the model's vocabulary"
        with pytest.raises(ValueError, match=refused):
            lm._loglikelihood_tokens([*good, (("a", " b"), ctx, cont)])  # the bad one read last (shortest)
    assert not reads


def test_shape_buckets():
    """Padded sizes: at least n, under 25% padding past 8, few per octave. Prefill chunks of those sizes,
    none longer than the longest allowed: one per whole `longest` and one for the rest, padded (the
    padding read once, left of the context) rather than split into more calls."""
    from rwkv_jax.infer.lm_eval_adapter import _bucket, _chunks
    sizes = {_bucket(n) for n in range(1, 4097)}
    assert all(n <= _bucket(n) < max(n * 1.25, n + 1) for n in range(1, 4097))
    assert len(sizes) == 8 + 4 * 9 and sorted(sizes)[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16]
    for n in range(0, 600):
        chunks = _chunks(n, 256)
        assert len(chunks) == -(-n // 256) and all(c in sizes and c <= 256 for c in chunks)
        assert n <= sum(chunks) == n // 256 * 256 + _bucket(n % 256)
    assert _chunks(1000, 256) == [256, 256, 256, 256] and _chunks(11, 8) == [3, 8] and _chunks(13, 256) == [14]
