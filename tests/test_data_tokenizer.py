"""Tokenizers: GPT-NeoX ids, sentencepiece training/reuse/multi-host wait, the vocab check, damaged
tokenizer files and corpora sentencepiece cannot train on."""

import json
import os
import re
import shutil
import textwrap
import threading
import time

import pytest

from rwkv_jax.data import tokenizer as tokenizer_lib

TEXTS = [open(m.__file__, encoding="utf-8").read() for m in (json, textwrap, threading)]


def train(path, **kwargs):
    return tokenizer_lib.train_sentencepiece(TEXTS, str(path), vocab_size=kwargs.pop("vocab_size", 400), **kwargs)


def test_gpt_neox_tokenizer_ids(shared_dir):
    path = shared_dir / "tokenizers" / "gpt-neox-20b.json"
    if not path.is_file():
        pytest.skip(f"{path} not found (development material only)")
    tok = tokenizer_lib.HFJsonTokenizer(str(path))
    assert tok.encode("Hello my name is") == [12092, 619, 1416, 310]
    assert (tok.vocab_size, tok.eot_id) == (50277, 0)
    assert tok.encode_batch(["Hello my name is", "x"])[0] == [12092, 619, 1416, 310]
    assert tok.decode(tok.encode(TEXTS[0][:500])) == TEXTS[0][:500]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_trains_losslessly_and_is_reused(tmp_path, model_type):
    path = tmp_path / "sp.model"
    tok = train(path, model_type=model_type)
    assert tok.eot_id == 0 and 259 < tok.vocab_size <= 400
    for text in ["    def f(x):\n        return x  # comment\n\n", "caf\u00e9 \u6f22\u5b57 \U0001F600\t!"]:
        assert tok.decode(tok.encode(text)) == text  # Whitespace kept, unseen characters via bytes.
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]
    mtime = os.stat(path).st_mtime_ns
    again = tokenizer_lib.train_sentencepiece(iter(()), str(path), vocab_size=400)  # No text needed: reused.
    assert again.vocab_size == tok.vocab_size and os.stat(path).st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["sp.model"]  # No temp files left.


def test_other_processes_wait_for_process_0(tmp_path):
    path = tmp_path / "sp.model"
    waited = {}
    waiter = threading.Thread(target=lambda: waited.setdefault("tok", train(path, process_index=1, wait_timeout_s=60)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and not path.exists()
    tok = train(path, process_index=0)
    waiter.join(10)
    assert waited["tok"].vocab_size == tok.vocab_size and waited["tok"].encode("x = 1") == tok.encode("x = 1")


def test_waiting_process_times_out_with_a_clear_error(tmp_path):
    with pytest.raises(TimeoutError, match="Process 2 waited .* shared by all hosts"):
        train(tmp_path / "sp.model", process_index=2, wait_timeout_s=0.2)


def test_vocab_larger_than_model_is_a_clear_error(tmp_path):
    tok = train(tmp_path / "sp.model")
    tokenizer_lib.check_fits(tok, tok.vocab_size)
    with pytest.raises(ValueError, match=f"{tok.vocab_size} tokens but the model vocab size is 300"):
        tokenizer_lib.check_fits(tok, 300)


def test_missing_tokenizer_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        tokenizer_lib.load_tokenizer("hf_json", str(tmp_path / "none.json"))
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        tokenizer_lib.load_tokenizer("sentencepiece", str(tmp_path / "none.model"))
    with pytest.raises(ValueError, match=r"must be one of \['sentencepiece', 'hf_json', 'rwkv_world'\]"):
        tokenizer_lib.load_tokenizer("bytes", str(tmp_path / "x"))
    (tmp_path / "hf_dir").mkdir()  # an HF model directory as --tokenizer: it said "tokenizer DIR not found"
    with pytest.raises(IsADirectoryError, match=r"hf_dir is a directory: give the tokenizer file in it"):
        tokenizer_lib.load_tokenizer_file(str(tmp_path / "hf_dir"))


def test_fingerprint_follows_the_file(tmp_path):
    tok = train(tmp_path / "a.model")
    shutil.copy(tmp_path / "a.model", tmp_path / "b.model")
    assert tokenizer_lib.SentencePieceTokenizer(str(tmp_path / "b.model")).fingerprint == tok.fingerprint
    assert train(tmp_path / "c.model", vocab_size=380).fingerprint != tok.fingerprint


# --- Damaged tokenizer files and corpora that sentencepiece cannot train on -------------------------------

def test_damaged_tokenizer_files_are_errors_naming_the_file(tmp_path):
    bad_json, bad_model = tmp_path / "tok.json", tmp_path / "tok.model"
    bad_json.write_text('{"version": "1.0", "model": ')
    bad_model.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=rf"Tokenizer JSON '{re.escape(str(bad_json))}' cannot be read"):
        tokenizer_lib.load_tokenizer("hf_json", str(bad_json))
    with pytest.raises(ValueError, match=rf"SentencePiece model '{re.escape(str(bad_model))}' cannot be read"):
        tokenizer_lib.load_tokenizer("sentencepiece", str(bad_model))


def test_sentencepiece_failures_name_the_model_and_leave_no_temporary_files(tmp_path):
    path = tmp_path / "sp.model"
    with pytest.raises(ValueError, match=rf"sentencepiece could not train a tokenizer for '{re.escape(str(path))}' "
                                         r"on the training text \(0 lines"):
        tokenizer_lib.train_sentencepiece(["  \n\n"], str(path), vocab_size=300)
    assert list(tmp_path.iterdir()) == []


def test_one_huge_line_trains_a_tokenizer(tmp_path):
    """sentencepiece skips lines over 4192 bytes: a corpus of one long line (16 MB in the issue) left it
    nothing to train on."""
    text = "".join(f"word{i % 97} " for i in range(30_000))  # ~200 KB, no newline
    tok = tokenizer_lib.train_sentencepiece([text], str(tmp_path / "sp.model"), vocab_size=300)
    assert tok.decode(tok.encode("word1 word2 ")) == "word1 word2 "
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sp.model"]
