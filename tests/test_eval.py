"""Evaluation (rwkv_jax/infer/evaluation.py, eval.py): perplexity reports checked against HF transformers on the
same weights and tokens, the parallel-vs-RNN mode check, LAMBADA scoring, training-workdir checkpoints,
and clear errors for bad inputs."""

import importlib
import json
import math

import jax
import numpy as np
import pytest
import torch
from absl import flags

from rwkv_jax.data import documents as docs_lib
from rwkv_jax.data.tokenizer import HFJsonTokenizer, check_fits
from rwkv_jax.infer import evaluation as ev
from rwkv_jax.io import weights
from tests.helpers import write_byte_tokenizer
from tests.peers import hf_logits, random_hf_model

VOCAB = 260  # the byte tokenizer's 257 tokens fit


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    hf = random_hf_model(vocab_size=VOCAB, d_model=32, n_layer=2, seed=1)
    tensors = {weights.hf_to_official_name(k): v.numpy() for k, v in hf.state_dict().items()}
    return hf, tensors, weights.model_from_official(tensors)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return write_byte_tokenizer(tmp_path_factory.mktemp("tok") / "bytes.json")


def hf_token_losses(hf, tokens, start_token=0):
    """Per-token loss of `tokens` after `start_token`, by HF transformers in one call."""
    seq = np.concatenate([[start_token], tokens])
    logp = torch.log_softmax(torch.from_numpy(hf_logits(hf, seq[None, :-1])[0]).double(), -1).numpy()
    return -logp[np.arange(len(tokens)), tokens], logp


def run_eval_script(*args):
    """eval.py in-process: parse the flags, run, return the report."""
    script = importlib.import_module("eval")
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["eval.py", *args])
    try:
        return script.run()
    finally:
        flags.FLAGS.unparse_flags()


def test_uniform_logits_give_perplexity_vocab_size(peers):
    _, tensors, _ = peers
    model = weights.model_from_official({**tensors, "head.weight": np.zeros_like(tensors["head.weight"])})
    rng = np.random.default_rng(0)
    docs = [docs_lib.Document(rng.integers(0, VOCAB, n).astype(np.int32), n) for n in (5, 40, 13)]
    report = ev.evaluate_documents(model, docs, batch_size=2, window=16)
    assert report["tokens"] == 58 and report["documents"] == 3
    assert report["perplexity"] == pytest.approx(VOCAB, rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(math.log2(VOCAB), rel=1e-5)  # one byte per token here
    assert all(b["loss"] == pytest.approx(math.log(VOCAB), rel=1e-6) for b in report["loss_by_position"])


@pytest.mark.parametrize("window", [8, 128])  # 2 x 128 positions: the logits made as [V, N] (token_logprobs)
def test_windows_carry_state_and_modes_agree(peers, window):
    """Documents longer than the window, batch rows refilled as documents end: every per-token loss equals
    HF's on the whole document in one call, in both modes."""
    hf, _, model = peers
    rng = np.random.default_rng(1)
    lengths = [3, 30, 1, 17, 8, 9, 25]
    docs = [docs_lib.Document(rng.integers(0, VOCAB, n).astype(np.int32), n) for n in lengths]
    scored = {s.index: s for s in ev.score_documents(model, docs, modes=("parallel", "rnn"), batch_size=2,
                                                     window=window, start_token=7)}
    assert sorted(scored) == list(range(len(docs)))
    for i, doc in enumerate(docs):
        want, logp = hf_token_losses(hf, doc.tokens, start_token=7)
        for mode in ("parallel", "rnn"):
            np.testing.assert_allclose(scored[i].loss[mode], want, atol=2e-5, rtol=0)
            np.testing.assert_array_equal(scored[i].hit[mode], logp.argmax(-1) == doc.tokens)
    report = ev.evaluate_documents(model, docs, mode="both", batch_size=2, window=window, start_token=7)
    check = report["mode_check"]
    assert check["max_abs_token_loss_diff"] < 1e-4 and check["max_abs_logit_diff"] < 1e-4
    assert check["max_abs_logit_diff"] > 0  # measured, not skipped
    assert check["rnn_loss"] == pytest.approx(check["parallel_loss"], abs=1e-6)
    all_losses = np.concatenate([hf_token_losses(hf, d.tokens, 7)[0] for d in docs])
    assert report["loss"] == pytest.approx(all_losses.mean(), abs=1e-5)
    # loss by position: bucket 2-3 holds positions 2 and 3 of every document that long
    per_pos = [hf_token_losses(hf, d.tokens, 7)[0] for d in docs]
    bucket = [b for b in report["loss_by_position"] if b["positions"] == "2-3"][0]
    values = [losses[p] for losses in per_pos for p in (2, 3) if p < len(losses)]
    assert bucket["tokens"] == len(values) and bucket["loss"] == pytest.approx(np.mean(values), abs=1e-5)
    assert report["tokens_per_position"][0] == 7 and report["tokens_per_position"][29] == 1


def test_position_buckets():
    sums, counts = np.arange(20, dtype=float), np.ones(20, int)
    buckets = ev.position_buckets(sums, counts)
    assert [b["positions"] for b in buckets] == ["0", "1", "2-3", "4-7", "8-15", "16-31"]
    assert buckets[-1]["tokens"] == 4 and buckets[-1]["loss"] == pytest.approx(np.mean([16, 17, 18, 19]))


def test_official_pth_end_to_end_equals_hf_loss(peers, tokenizer_path, tmp_path):
    hf, tensors, _ = peers
    pth = tmp_path / "model.pth"
    weights.write_pth(tensors, pth)
    texts = ["The quick brown fox jumps over the lazy dog. " * 3,
             "Zwölf Boxkämpfer jagen Viktor quer über den Sylter Deich.\n"]
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(text, encoding="utf-8")
    report = run_eval_script(f"--checkpoint={pth}", f"--tokenizer={tokenizer_path}",
                             f"--text_files={tmp_path}/doc*.txt", "--window=32", "--batch_size=2",
                             f"--report={tmp_path}/out/report")
    tok = HFJsonTokenizer(tokenizer_path)
    losses = np.concatenate([hf_token_losses(hf, np.asarray(tok.encode(t)), tok.eot_id)[0] for t in texts])
    assert report["tokens"] == len(losses) == sum(len(t.encode()) for t in texts)  # byte-level: one per byte
    with torch.no_grad():  # HF's own loss (labels = the tokens), token-weighted over the documents
        seqs = [torch.tensor([[tok.eot_id] + tok.encode(t)]) for t in texts]
        hf_loss = sum(float(hf(s, labels=s).loss) * (s.shape[1] - 1) for s in seqs) / len(losses)
    assert abs(report["loss"] - hf_loss) < 1e-4
    assert abs(report["loss"] - losses.mean()) < 1e-4
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    assert report["bits_per_byte"] == pytest.approx(losses.sum() / math.log(2) / nbytes, abs=1e-4)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    saved = json.loads((tmp_path / "out/report.json").read_text())
    assert saved["loss"] == report["loss"] and saved["format"] == "pth"
    assert "| perplexity |" in (tmp_path / "out/report.md").read_text()
    assert (tmp_path / "out/report.png").read_bytes()[:4] == b"\x89PNG"


def test_lambada_matches_hf(peers, tokenizer_path, tmp_path):
    hf, _, model = peers
    lines = ["the cat sat on the mat", "a b", "Once upon a time there was a princess"]
    path = tmp_path / "lambada.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in lines) + "\n")
    tok = HFJsonTokenizer(tokenizer_path)
    report = ev.evaluate_lambada(model, ev.lambada_examples(path), tok, mode="both", batch_size=2, window=8)
    logp_sum, correct = 0.0, 0
    for text in lines:
        context, last = text.rsplit(" ", 1)
        ctx, tgt = tok.encode(context), tok.encode(" " + last)
        losses, logp = hf_token_losses(hf, np.asarray(ctx + tgt), tok.eot_id)
        logp_sum -= losses[len(ctx):].sum()
        correct += int(all(logp[len(ctx) + i].argmax() == t for i, t in enumerate(tgt)))
    assert report["examples"] == 3
    assert report["accuracy"] == correct / 3
    assert report["perplexity"] == pytest.approx(math.exp(-logp_sum / 3), rel=1e-4)
    assert report["mode_check"]["max_abs_token_loss_diff"] < 1e-4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line"}\n{"txt": "x y"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object"):
        ev.lambada_examples(bad)


def _write_workdir(workdir, tensors_step5, tokenizer_path, data=None):
    """A training workdir as train.py leaves it: config.json, rwkv_config.json, the tokenizer copy and
    checkpoints of steps 1 and 5 (step 5 holding `tensors_step5`)."""
    import dataclasses
    import shutil

    from flax import nnx

    from rwkv_jax.io.checkpoint import Checkpointer
    from rwkv_jax.train import optim, sharding, train_step
    from rwkv_jax.train.train_config import base_config, model_config
    config = base_config(model=model_config(vocab_size=VOCAB, d_model=32, n_layer=2), batch_size=2, seq_len=8,
                         num_steps=10, lr_init=1e-3, lr_final=1e-4)
    config.data.update(data or {})
    model_cfg = weights.ModelConfig.from_dict(config.model)
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    (workdir / "rwkv_config.json").write_text(json.dumps(dataclasses.asdict(model_cfg)))
    shutil.copyfile(tokenizer_path, workdir / "tokenizer.json")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
    _, init, _, _ = train_step.train_state_factory(model_cfg, optimizer, mesh, 0)
    state = init()
    trained = nnx.state(weights.model_from_official(tensors_step5), nnx.Param)
    with Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
        ckpt.save(1, state, {"step": 1})
        ckpt.save(5, state._replace(params=trained, step=state.step + 5), {"step": 5})


def test_training_workdir_latest_checkpoint(peers, tokenizer_path, tmp_path):
    hf, tensors, _ = peers
    from rwkv_jax.data import text_files
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = {f"doc{i}.txt": f"document {i}: " + "hello workdir, " * (i + 1) for i in range(8)}
    for name, text in texts.items():
        (corpus / name).write_text(text)
    validation = [t for name, t in texts.items() if text_files.split_of(name, 0.5) == "validation"]
    assert 0 < len(validation) < len(texts)
    workdir = tmp_path / "run"
    _write_workdir(workdir, tensors, tokenizer_path, data={
        "source": "text", "text_files": str(corpus), "validation_fraction": 0.5, "tokenizer": "hf_json",
        "tokenizer_path": tokenizer_path, "data_dir": str(tmp_path / "data")})
    assert weights.detect_format(workdir) == "workdir"
    loaded = weights.load(workdir)
    model = loaded.model
    assert loaded.step == 5
    loaded = weights.model_to_official(model)
    for name, value in tensors.items():
        np.testing.assert_array_equal(loaded[name], value)
    other = weights.load_model(workdir, wkv_form="sequential")  # numerics overridden, same parameters
    assert other.config.wkv_form == "sequential"
    np.testing.assert_array_equal(weights.model_to_official(other)["blocks.1.att.key.weight"],
                                  tensors["blocks.1.att.key.weight"])
    # no data flags: the validation split of the run's own dataset, with the run's tokenizer copy
    report = run_eval_script(f"--checkpoint={workdir}", "--mode=both", "--window=16", "--batch_size=3")
    assert (workdir / "eval" / "validation-both.json").is_file()          # the default report place
    assert report["checkpoint_step"] == 5 and report["tokenizer"] == str(workdir / "tokenizer.json")
    assert report["documents"] == len(validation) and report["tokens"] == sum(map(len, validation))
    assert report["mode_check"]["max_abs_token_loss_diff"] < 1e-4
    tok = HFJsonTokenizer(tokenizer_path)
    losses = np.concatenate([hf_token_losses(hf, np.asarray(tok.encode(t)))[0] for t in validation])
    assert abs(report["loss"] - losses.mean()) < 1e-4
    own = tmp_path / "own"
    weights.save_model(model, own)
    assert weights.detect_format(own) == "rwkv_jax"  # rwkv_config.json + params/ is still our format
    (workdir / "rwkv_config.json").unlink()  # a workdir of an older trainer: the model from config.json
    assert weights.detect_format(workdir) == "workdir"
    old = weights.model_to_official(weights.load_model(workdir))
    np.testing.assert_array_equal(old["head.weight"], tensors["head.weight"])


def test_bad_inputs(peers, tokenizer_path, tmp_path):
    _, tensors, model = peers
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        run_eval_script(f"--checkpoint={tmp_path}/missing.pth", f"--tokenizer={tokenizer_path}",
                        f"--text_files={tokenizer_path}")
    small = weights.model_from_official({**tensors, "emb.weight": tensors["emb.weight"][:100],
                                         "head.weight": tensors["head.weight"][:100]})
    with pytest.raises(ValueError, match="has 257 tokens but the model's vocabulary has 100"):
        check_fits(HFJsonTokenizer(tokenizer_path), small.config.vocab_size, fix="it is not this model's tokenizer")
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 100\)"):
        ev.evaluate_documents(small, [docs_lib.Document(np.array([5, 150], np.int32), 2)])
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\n")
    pth = tmp_path / "m.pth"
    weights.write_pth(tensors, pth)
    with pytest.raises(ValueError, match="no tokens to evaluate"):
        run_eval_script(f"--checkpoint={pth}", f"--tokenizer={tokenizer_path}", f"--text_files={blank}")
    with pytest.raises(ValueError, match="no tokens to evaluate"):
        ev.evaluate_documents(model, docs_lib.documents_from_texts(["", ""], HFJsonTokenizer(tokenizer_path)))
    with pytest.raises(ValueError, match="pass --tokenizer"):
        weights.find_tokenizer(pth)
    with pytest.raises(FileNotFoundError, match=r"^--text_files: .*missing.txt' does not exist"):  # the flag, not
        run_eval_script(f"--checkpoint={pth}", f"--tokenizer={tokenizer_path}",  # config.data.text_files
                        f"--text_files={tmp_path}/missing.txt")
    # A window no device could hold: a clear error, not an out-of-memory abort or the process killed (the
    # arrays are sized from the flags); nothing is written.
    text = tmp_path / "one.txt"
    text.write_text("a short document")
    for flag in ("--window=100000000", "--batch_size=100000000"):
        with pytest.raises(ValueError, match=r"batch_size x window = .* tokens per scored window needs about .* GiB"
                                             r".*more than this device's .* GiB: lower --batch_size or --window"):
            run_eval_script(f"--checkpoint={pth}", f"--tokenizer={tokenizer_path}", f"--text_files={text}", flag,
                            f"--report={tmp_path}/huge")
    assert not list(tmp_path.glob("huge*"))


def test_eval_len_max_docs_and_binidx(peers, tokenizer_path, tmp_path):
    _, _, model = peers
    tok = HFJsonTokenizer(tokenizer_path)
    docs = list(docs_lib.documents_from_texts(["abcdef", "", "ü-xyz", "q"], tok, eval_len=3, max_docs=2))
    assert [d.tokens.tolist() for d in docs] == [tok.encode("abc"), tok.encode("ü-")[:3]]
    assert [d.num_bytes for d in docs] == [3, 3]  # 'ü' is 2 bytes: 'ü-' is the first 3
    from rwkv_jax.data.binidx import BinIdxWriter
    rng = np.random.default_rng(2)
    seqs = [rng.integers(1, 257, n) for n in (40, 7, 21)]
    with BinIdxWriter(str(tmp_path / "corpus"), np.uint16) as w:
        for s in seqs:
            w.add(s)
    pth = tmp_path / "m.pth"
    weights.write_pth(weights.model_to_official(model), pth)
    report = run_eval_script(f"--checkpoint={pth}", f"--tokenizer={tokenizer_path}", f"--binidx={tmp_path}/corpus",
                             "--eval_len=20", "--window=8", "--max_docs=2", f"--report={tmp_path}/r")
    direct = ev.evaluate_documents(model, [docs_lib.Document(s[:20].astype(np.int32), 1) for s in seqs[:2]], window=8)
    assert report["tokens"] == 27 and report["documents"] == 2
    assert report["loss"] == pytest.approx(direct["loss"], abs=1e-6)
    nbytes = [len(tok.decode(s[:20].tolist()).encode()) for s in seqs[:2]]
    assert report["bytes"] == sum(nbytes)
    # a path with its suffix: the error names the flag (not config.data.binidx_prefix) and the prefix to give
    with pytest.raises(FileNotFoundError, match=r"--binidx=.*corpus.bin: .*corpus.bin.idx' not found.*give "
                                                r"--binidx=.*corpus,"):
        run_eval_script(f"--checkpoint={pth}", f"--tokenizer={tokenizer_path}", f"--binidx={tmp_path}/corpus.bin")


def test_compare_draws_both_curves_on_one_png_and_tables_them(peers, tokenizer_path, tmp_path, monkeypatch):
    _, tensors, _ = peers
    text = tmp_path / "doc.txt"
    text.write_text("a longer document, to have a few windows of positions. " * 6)
    for name, scale in (("a", 1.0), ("b", 0.5)):  # two models: b's head is a's, halved
        weights.write_pth({**tensors, "head.weight": tensors["head.weight"] * scale}, tmp_path / f"{name}.pth")
    common = (f"--tokenizer={tokenizer_path}", f"--text_files={text}", "--window=64")
    first = run_eval_script(f"--checkpoint={tmp_path / 'a.pth'}", "--label=streams", f"--report={tmp_path / 'a'}",
                            *common)
    import matplotlib.figure
    drawn = {}
    save = matplotlib.figure.Figure.savefig

    def spy(fig, path, **kwargs):
        drawn[str(path)] = {line.get_label(): line.get_ydata() for line in fig.axes[0].get_lines()}
        return save(fig, path, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    second = run_eval_script(f"--checkpoint={tmp_path / 'b.pth'}", "--label=random", f"--compare={tmp_path / 'a.json'}",
                             f"--report={tmp_path / 'b'}", *common)
    assert (tmp_path / "b.png").stat().st_size > 0
    lines = drawn[str(tmp_path / "b.png")]
    assert sorted(lines) == sorted(f"{who}: {what}" for who in ("streams", "random")
                                   for what in ("per position, smoothed (+-10%)", "log-spaced buckets"))
    np.testing.assert_allclose(lines["streams: log-spaced buckets"], [b["loss"] for b in first["loss_by_position"]])
    np.testing.assert_allclose(lines["random: log-spaced buckets"], [b["loss"] for b in second["loss_by_position"]])
    assert first["loss"] != second["loss"]
    assert second["compare"][0]["label"] == "streams" and second["compare"][0]["report"] == str(tmp_path / "a.json")
    assert json.loads((tmp_path / "b.json").read_text())["compare"][0]["loss"] == first["loss"]
    bucket = first["loss_by_position"][-1]
    assert f"| {bucket['loss']:.4f} |" in (tmp_path / "b.md").read_text()  # a's bucket losses, beside b's
    assert "| loss (nats), random | loss (nats), streams |" in (tmp_path / "b.md").read_text()
    # a third curve: --compare takes a list
    third = run_eval_script(f"--checkpoint={tmp_path / 'b.pth'}", "--label=again",
                            f"--compare={tmp_path / 'a.json'},{tmp_path / 'b.json'}", f"--report={tmp_path / 'c'}",
                            *common)
    assert [c["label"] for c in third["compare"]] == ["streams", "random"]
    assert sorted({name.split(":")[0] for name in drawn[str(tmp_path / "c.png")]}) == ["again", "random", "streams"]
    assert "| loss (nats), again | loss (nats), streams | loss (nats), random |" in (tmp_path / "c.md").read_text()


def test_compare_with_a_report_without_positions_is_one_error(peers, tokenizer_path, tmp_path):
    _, tensors, _ = peers
    weights.write_pth(tensors, tmp_path / "m.pth")
    lambada = tmp_path / "lambada.json"
    lambada.write_text(json.dumps({"mode": "parallel", "accuracy": 0.5}))
    with pytest.raises(ValueError, match=r"--compare .*lambada.json: not an eval.py report with loss by position"):
        run_eval_script(f"--checkpoint={tmp_path / 'm.pth'}", f"--tokenizer={tokenizer_path}",
                        f"--text_files={tokenizer_path}", f"--compare={lambada}")
    from rwkv_jax.cli import runner as cli
    with pytest.raises(cli.UsageError, match=r"--compare=.*missing.json: no such file"):
        run_eval_script(f"--checkpoint={tmp_path / 'm.pth'}", f"--tokenizer={tokenizer_path}",
                        f"--text_files={tokenizer_path}", f"--compare={tmp_path / 'missing.json'}")
