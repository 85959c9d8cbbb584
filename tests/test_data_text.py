"""Text sources: the stdlib corpus builder, local text files, the split rule, TFDS catalog errors."""

import importlib
import json
import logging
import os
import socket
import textwrap

import pytest
import tensorflow_datasets as tfds

from rwkv_jax.data import catalog, pipeline, text_dataset, text_files

REAL_TEXT = [open(m.__file__, encoding="utf-8").read() for m in (json, textwrap, logging)]


def write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = content if isinstance(content, bytes) else content.encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)


def fake_stdlib(root):
    """Eight real modules, plus folders and files the corpus must leave out."""
    for i, name in enumerate(["a.py", "b.py", "pkg/c.py", "pkg/d.py", "pkg/sub/e.py", "f.py", "g.py", "h.py"]):
        write(os.path.join(root, name), REAL_TEXT[i % 3])
    for excluded in ["test/t.py", "tests/u.py", "pkg/tests/v.py", "site-packages/x/y.py", "notes.txt"]:
        write(os.path.join(root, excluded), "EXCLUDED = True\n")
    return root


def split_keys(builder, split):
    return sorted(r["key"].decode() for r in builder.as_data_source(split))


def test_stdlib_builder_excludes_tests_and_site_packages(tmp_path):
    root = fake_stdlib(str(tmp_path / "lib"))
    b = text_dataset.build_stdlib(data_dir=str(tmp_path / "d"), validation_fraction=0.5, root=root)
    keys = split_keys(b, "train") + split_keys(b, "validation")
    assert sorted(keys) == ["a.py", "b.py", "f.py", "g.py", "h.py", "pkg/c.py", "pkg/d.py", "pkg/sub/e.py"]
    texts = [r["text"].decode() for r in b.as_data_source("train")]
    assert all(t in REAL_TEXT for t in texts) and "EXCLUDED" not in "".join(texts)


def test_stdlib_split_is_a_pure_function_of_the_relative_path(tmp_path):
    root = fake_stdlib(str(tmp_path / "lib"))
    b1 = text_dataset.build_stdlib(data_dir=str(tmp_path / "d1"), validation_fraction=0.5, root=root)
    b2 = text_dataset.build_stdlib(data_dir=str(tmp_path / "d2"), validation_fraction=0.5, root=root)
    val = split_keys(b1, "validation")
    assert val == split_keys(b2, "validation") and split_keys(b1, "train") == split_keys(b2, "train")
    assert val == sorted(k for k in split_keys(b1, "train") + val if text_files.split_of(k, 0.5) == "validation")
    assert 0 < len(val) < 8
    # Pinned: the rule must never change, or old runs' validation files would leak into training.
    assert [text_files.split_of(k, 0.5) for k in ["os.py", "pkg/b.py", "c.txt", "d.md"]] == [
        "train", "validation", "validation", "train"]


def test_stdlib_dataset_is_built_once_and_reused(tmp_path):
    root = fake_stdlib(str(tmp_path / "lib"))
    b = text_dataset.build_stdlib(data_dir=str(tmp_path / "d"), validation_fraction=0.5, root=root)
    info = os.path.join(b.data_dir, "dataset_info.json")
    mtime = os.stat(info).st_mtime_ns
    b2 = text_dataset.build_stdlib(data_dir=str(tmp_path / "d"), validation_fraction=0.5, root=root)
    assert b2.data_dir == b.data_dir and os.stat(info).st_mtime_ns == mtime


def test_default_stdlib_root_is_the_running_interpreter():
    files = text_files.stdlib_files()
    rels = {f.rel for f in files}
    assert "os.py" in rels and "json/decoder.py" in rels
    assert not any(set(r.split(os.sep)[:-1]) & {"test", "tests", "site-packages"} for r in rels)


def test_local_text_reads_all_four_file_types(tmp_path):
    write(str(tmp_path / "in/a.txt"), "plain text\n")
    write(str(tmp_path / "in/b.md"), "# markdown\n")
    write(str(tmp_path / "in/sub/c.py"), "x = 1\n")
    write(str(tmp_path / "in/d.jsonl"), '{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    write(str(tmp_path / "in/ignored.csv"), "a,b\n")
    b = text_dataset.build_local_text(spec=str(tmp_path / "in"), data_dir=str(tmp_path / "d"), text_split="all",
                                      validation_fraction=0.05)
    assert sorted(b.info.splits) == ["train"]
    docs = {r["key"].decode(): r["text"].decode() for r in b.as_data_source("train")}
    assert docs == {"a.txt": "plain text\n", "b.md": "# markdown\n", os.path.join("sub", "c.py"): "x = 1\n",
                    "d.jsonl#1": "first", "d.jsonl#3": "second"}


def test_local_text_files_globs_and_hash_split(tmp_path):
    for i in range(12):
        write(str(tmp_path / f"g/doc{i}.txt"), f"document {i}\n")
    write(str(tmp_path / "one.md"), "single file\n")
    spec = f"{tmp_path}/g/doc*.txt, {tmp_path}/one.md"
    b = text_dataset.build_local_text(spec=spec, data_dir=str(tmp_path / "d"), text_split="hash",
                                      validation_fraction=0.3)
    train, val = split_keys(b, "train"), split_keys(b, "validation")
    assert sorted(train + val) == sorted([f"doc{i}.txt" for i in range(12)] + ["one.md"])
    assert val == sorted(k for k in train + val if text_files.split_of(k, 0.3) == "validation") and val


def test_invalid_utf8_is_replaced_and_counted(tmp_path, caplog):
    stats = text_files.ReadStats()
    assert text_files.decode_utf8(b"ok \xff\xfe end \xc3", stats) == "ok \ufffd\ufffd end \ufffd"
    assert (stats.invalid_bytes, stats.files_with_invalid_bytes) == (3, 1)

    write(str(tmp_path / "in/bad.txt"), b"caf\xe9 au lait\n")
    write(str(tmp_path / "in/good.txt"), "caf\u00e9\n")
    caplog.set_level(logging.INFO)
    # absl's logger too: a command parsed earlier in this process (absl's --verbosity) may have raised its level
    caplog.set_level(logging.INFO, logger="absl")
    b = text_dataset.build_local_text(spec=str(tmp_path / "in"), data_dir=str(tmp_path / "d"), text_split="all",
                                      validation_fraction=0.0)
    docs = {r["key"].decode(): r["text"].decode() for r in b.as_data_source("train")}
    assert docs["bad.txt"] == "caf\ufffd au lait\n" and docs["good.txt"] == "caf\u00e9\n"
    assert "1 non-UTF-8 bytes replaced by U+FFFD in 1 files" in caplog.text


@pytest.mark.parametrize("spec, error, match", [
    ("", ValueError, "text_files is empty"),
    ("{tmp}/missing.txt", FileNotFoundError, "does not exist"),
    ("{tmp}/nothing*.txt", FileNotFoundError, "matches no file"),
    ("{tmp}/emptydir", ValueError, "no .txt/.md/.py/.jsonl files"),
])
def test_missing_or_empty_inputs_are_clear_errors(tmp_path, spec, error, match):
    os.makedirs(tmp_path / "emptydir")
    with pytest.raises(error, match=match):
        text_dataset.build_local_text(spec=spec.format(tmp=tmp_path), data_dir=str(tmp_path / "d"),
                                      text_split="all", validation_fraction=0.0)


def test_bad_jsonl_names_file_and_line(tmp_path):
    write(str(tmp_path / "x.jsonl"), '{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: .*\"text\" field"):
        text_dataset.build_local_text(spec=str(tmp_path / "x.jsonl"), data_dir=str(tmp_path / "d"),
                                      text_split="all", validation_fraction=0.0)


def test_grain_reads_documents_in_stored_order(tmp_path):
    root = fake_stdlib(str(tmp_path / "lib"))
    b = text_dataset.build_stdlib(data_dir=str(tmp_path / "d"), validation_fraction=0.5, root=root)
    assert list(pipeline.split_texts(b, "train")) == [r["text"].decode() for r in b.as_data_source("train")]


def test_offline_tfds_download_fails_at_once_pointing_to_local_text(tmp_path, monkeypatch):
    """Offline, tfds's downloader retried each URL with backoff for minutes (eval.py --tfds looked hung);
    the download is now not attempted, and the error names the setting and what to use instead."""
    from tensorflow_datasets.core.download import downloader

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (offline test)")

    for key in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # Offline, even on a machine that is not.
    monkeypatch.setattr(downloader, "_open_url", lambda *a, **k: pytest.fail("a download was tried offline"))
    with pytest.raises(RuntimeError, match=r"'tiny_shakespeare' \(config.data.tfds_name\): it is not prepared in .* "
                                           r"resolves no host name.*source='text'"):
        catalog.build_catalog("tiny_shakespeare", data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"'tiny_shakespeare' \(--tfds\).*--text_files=.*--binidx"):
        catalog.build_catalog("tiny_shakespeare", data_dir=str(tmp_path), asked_by=catalog.EVAL)


def test_unknown_tfds_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Unknown TFDS dataset 'no_such_corpus_xyz'.*source='text'"):
        catalog.build_catalog("no_such_corpus_xyz", data_dir=str(tmp_path))


@pytest.mark.parametrize("name, key", [("tiny_shakespeare", "text"), ("lm1b", "text"), ("pg19", "book_text"),
                                       ("c4/en", "text")])
def test_catalog_names_resolve_to_their_text_feature(tmp_path, name, key):
    importlib.import_module("tensorflow_datasets.text")
    builder = tfds.builder(name, data_dir=str(tmp_path), file_format="array_record")  # No download.
    assert catalog.text_key(builder) == key
    with pytest.raises(ValueError, match="not a text feature"):
        catalog.text_key(builder, "no_such_feature")
