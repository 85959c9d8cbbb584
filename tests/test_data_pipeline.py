"""Batches (determinism, resume, shift, multi-process rows, eval coverage, token ids outside the vocabulary)
and `make_datasets` end to end."""

import json
import logging
import os
import textwrap

import numpy as np
import pytest

from rwkv_jax import data
from rwkv_jax.data import binidx, pipeline
from rwkv_jax.data import corpus_binidx as make_binidx

TOKENS_N = np.arange(5000, dtype=np.uint16)  # Distinct ids: a token's value is its offset.


def test_batch_n_is_a_pure_function_of_seed_and_step():
    a = data.Batches(TOKENS_N, seq_len=16, batch_size=4, seed=7)
    b = data.Batches(TOKENS_N, seq_len=16, batch_size=4, seed=7)
    first = [a.batch_at(n) for n in range(6)]  # `a` draws 0..5, `b` jumps straight to 5 (a resumed run).
    resumed = b.batch_at(5)
    for k in ("inputs", "targets"):
        np.testing.assert_array_equal(resumed[k], first[5][k])
        np.testing.assert_array_equal(a.batch_at(2)[k], first[2][k])
    from_start = iter(b)
    for n in range(3):
        np.testing.assert_array_equal(next(from_start)["inputs"], first[n]["inputs"])
    assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])
    other_seed = data.Batches(TOKENS_N, seq_len=16, batch_size=4, seed=8).batch_at(5)
    assert not np.array_equal(other_seed["inputs"], first[5]["inputs"])


def test_rows_are_windows_with_targets_shifted_by_one():
    batch = data.Batches(TOKENS_N, seq_len=32, batch_size=8, seed=0).batch_at(3)
    inputs_BT, targets_BT = batch["inputs"], batch["targets"]
    assert inputs_BT.shape == targets_BT.shape == (8, 32) and inputs_BT.dtype == targets_BT.dtype == np.int32
    np.testing.assert_array_equal(targets_BT[:, :-1], inputs_BT[:, 1:])
    np.testing.assert_array_equal(targets_BT, inputs_BT + 1)  # Consecutive corpus tokens.
    assert inputs_BT.min() >= 0 and targets_BT.max() <= len(TOKENS_N) - 1


def test_two_processes_rows_equal_the_global_batch():
    full = data.Batches(TOKENS_N, seq_len=16, batch_size=6, seed=3)
    parts = [data.Batches(TOKENS_N, seq_len=16, batch_size=6, seed=3, process_index=p, process_count=2)
             for p in range(2)]
    for step in (0, 1, 99):
        local = [p.batch_at(step) for p in parts]
        assert local[0]["inputs"].shape == (3, 16)
        for k in ("inputs", "targets"):
            np.testing.assert_array_equal(np.concatenate([x[k] for x in local]), full.batch_at(step)[k])
    with pytest.raises(ValueError, match="must split evenly over 4 processes"):
        data.Batches(TOKENS_N, seq_len=16, batch_size=6, process_index=0, process_count=4)


def test_context_longer_than_the_corpus_is_a_clear_error():
    with pytest.raises(ValueError, match="training split has 100 tokens but a window needs seq_len \\+ 1 = 101"):
        data.Batches(TOKENS_N[:100], seq_len=100, batch_size=2)
    data.Batches(TOKENS_N[:101], seq_len=100, batch_size=2).batch_at(0)  # Exactly one window fits.
    with pytest.raises(ValueError, match="eval split"):
        data.EvalBatches(TOKENS_N[:5], seq_len=8, batch_size=2)


@pytest.mark.parametrize("n", [101, 97, 130])
def test_eval_batches_cover_the_split_in_order(n):
    tokens_N = TOKENS_N[:n]
    evals = data.EvalBatches(tokens_N, seq_len=8, batch_size=4)
    batches = list(evals)
    assert len(batches) == len(evals) and all(b["inputs"].shape == (4, 8) for b in batches)
    mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
    targets = np.concatenate([b["targets"] for b in batches])[mask]
    inputs = np.concatenate([b["inputs"] for b in batches])[mask]
    np.testing.assert_array_equal(targets, tokens_N[1:])  # Every target once, in order.
    np.testing.assert_array_equal(inputs, tokens_N[:-1])
    halves = [list(data.EvalBatches(tokens_N, seq_len=8, batch_size=4, process_index=p, process_count=2))
              for p in range(2)]
    for k in ("inputs", "targets", "mask"):
        for i, b in enumerate(batches):
            np.testing.assert_array_equal(np.concatenate([halves[0][i][k], halves[1][i][k]]), b[k])


def text_config(tmp_path, **overrides):
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i, module in enumerate((json, logging, textwrap, os, np), start=2):  # m6.py hashes into validation.
        (corpus / f"m{i}.py").write_text(open(module.__file__, encoding="utf-8").read())
    (corpus / "notes.jsonl").write_text("".join(json.dumps({"text": f"note {i}"}) + "\n" for i in range(20)))
    c = data.default_data_config()
    c.update(dict(source="text", text_files=str(corpus), validation_fraction=0.3, sp_vocab_size=400,
                  data_dir=str(tmp_path / "data")), **overrides)
    return c


def test_make_datasets_builds_once_then_reuses(tmp_path):
    c = text_config(tmp_path)
    tok, train, evals = data.make_datasets(c, seq_len=64, batch_size=4, model_vocab_size=512)
    assert 259 < tok.vocab_size <= 400 and tok.eot_id == 0
    batch = train.batch_at(0)
    assert batch["inputs"].shape == (4, 64) and batch["inputs"].max() < tok.vocab_size
    assert train.tokens_N.dtype == np.uint16 and isinstance(train.tokens_N, np.memmap)
    assert np.count_nonzero(np.asarray(train.tokens_N) == tok.eot_id) + np.count_nonzero(
        np.asarray(evals.tokens_N) == tok.eot_id) == 25  # One separator per document.
    assert len(list(evals)) == len(evals) > 0
    files = {p: os.stat(p).st_mtime_ns for p in map(str, (tmp_path / "data").rglob("*")) if os.path.isfile(p)}
    tok2, train2, _ = data.make_datasets(c, seq_len=64, batch_size=4, model_vocab_size=512)
    assert {p: os.stat(p).st_mtime_ns for p in files} == files  # Nothing rebuilt.
    assert tok2.fingerprint == tok.fingerprint
    np.testing.assert_array_equal(train2.batch_at(5)["inputs"], train.batch_at(5)["inputs"])
    assert not [p for p in files if ".tmp-" in p or "incomplete" in p]


def test_make_datasets_errors_before_training(tmp_path):
    with pytest.raises(ValueError, match="model vocab size is 300"):
        data.make_datasets(text_config(tmp_path), seq_len=64, batch_size=4, model_vocab_size=300)
    with pytest.raises(ValueError, match="seq_len \\+ 1 = 10000001"):
        data.make_datasets(text_config(tmp_path), seq_len=10_000_000, batch_size=4, model_vocab_size=512)
    with pytest.raises(ValueError, match="config.data.source must be"):
        data.make_datasets(text_config(tmp_path, source="web"), seq_len=8, batch_size=4, model_vocab_size=512)
    with pytest.raises(ValueError, match="text_files is empty"):
        data.make_datasets(text_config(tmp_path, text_files=""), seq_len=8, batch_size=4, model_vocab_size=512)


def test_all_split_has_no_eval_and_empty_validation_is_an_error(tmp_path):
    _, train, evals = data.make_datasets(text_config(tmp_path, text_split="all"), seq_len=64, batch_size=2,
                                         model_vocab_size=512)
    assert evals is None and len(train.tokens_N) > 1000
    with pytest.raises(ValueError, match="split \"validation\": No examples.*text_split='all'"):
        data.make_datasets(text_config(tmp_path, validation_fraction=0.0), seq_len=8, batch_size=2,
                           model_vocab_size=512)
    assert not list((tmp_path / "data").rglob("incomplete*"))


def test_make_datasets_from_binidx(tmp_path):
    c = text_config(tmp_path)
    tok, _, _ = data.make_datasets(c, seq_len=64, batch_size=4, model_vocab_size=512)
    prefix = str(tmp_path / "bi" / "corpus")
    make_binidx.make_binidx(c.text_files, prefix, tok.path)
    ds = binidx.MMapIndexedDataset(prefix)
    b = text_config(tmp_path, source="binidx", binidx_prefix=prefix, tokenizer_path=tok.path,
                    validation_fraction=0.2)
    _, train, evals = data.make_datasets(b, seq_len=32, batch_size=2, model_vocab_size=512)
    n_eval = round(0.2 * len(ds))
    assert len(train.tokens_N) == ds.offset_of(len(ds) - n_eval)
    assert len(train.tokens_N) + len(evals.tokens_N) == len(ds.tokens)
    assert isinstance(train.tokens_N, np.memmap) and train.batch_at(0)["inputs"].shape == (2, 32)
    with pytest.raises(ValueError, match="tokenizer_path is required"):
        data.make_datasets(text_config(tmp_path, source="binidx", binidx_prefix=prefix), seq_len=32, batch_size=2,
                           model_vocab_size=512)


@pytest.mark.slow
def test_real_stdlib_corpus(tmp_path):
    c = data.default_data_config()
    c.data_dir = str(tmp_path)
    tok, train, evals = data.make_datasets(c, seq_len=1024, batch_size=12, model_vocab_size=4096)
    assert tok.vocab_size == 4096 and len(train.tokens_N) > 1_000_000 and len(evals) > 0
    assert train.batch_at(0)["inputs"].shape == (12, 1024)


# --- Token ids outside the vocabulary ---------------------------------------------------------------------

def test_batches_check_every_window_they_cut(tmp_path):
    """Streams too large to scan at open are checked batch by batch, naming the source and the offset."""
    tokens = np.arange(1000, dtype=np.uint16) % 100
    tokens[500] = 100
    batches = pipeline.Batches(tokens, seq_len=999, batch_size=1, vocab_size=100, source="binidx file 'x.bin'")
    with pytest.raises(ValueError, match=r"binidx file 'x\.bin': token id 100 at token 500 is outside"):
        batches.batch_at(0)
    evals = pipeline.EvalBatches(tokens, seq_len=100, batch_size=2, vocab_size=100, source="cache 'y'")
    with pytest.raises(ValueError, match=r"cache 'y': token id 100 at token 500"):
        list(evals)
