"""binidx: a pair written byte by byte from the format's specification, and our converter."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import tokenizers

from rwkv_jax.data import binidx
from rwkv_jax.data import corpus_binidx as make_binidx
from rwkv_jax.data import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_spec_pair(prefix, sequences, dtype_code=8, dtype="<u2"):
    """The Megatron MMIDIDX layout, field by field, without our writer."""
    sizes = [len(s) for s in sequences]
    itemsize = np.dtype(dtype).itemsize
    pointers = [sum(sizes[:i]) * itemsize for i in range(len(sizes))]
    with open(prefix + ".bin", "wb") as f:
        for s in sequences:
            for t in s:
                f.write(np.array(t, dtype).tobytes())
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))  # version
        f.write(struct.pack("<B", dtype_code))
        f.write(struct.pack("<Q", len(sizes)))  # number of sequences
        f.write(struct.pack("<Q", len(sizes) + 1))  # length of doc_idx
        f.write(b"".join(struct.pack("<i", s) for s in sizes))
        f.write(b"".join(struct.pack("<q", p) for p in pointers))
        f.write(b"".join(struct.pack("<q", d) for d in range(len(sizes) + 1)))


@pytest.mark.parametrize("dtype_code, dtype", [(8, "<u2"), (4, "<i4")])
def test_reads_a_pair_written_from_the_spec(tmp_path, dtype_code, dtype):
    prefix = str(tmp_path / "spec")
    seqs = [[5, 6], [7, 8, 9], [60000 if dtype_code == 8 else 70000], [1, 2, 3, 4]]
    write_spec_pair(prefix, seqs, dtype_code, dtype)
    ds = binidx.MMapIndexedDataset(prefix)
    assert len(ds) == 4 and ds.dtype == np.dtype(dtype)
    assert [ds[i].tolist() for i in range(4)] == seqs
    assert ds.doc_idx.tolist() == [0, 1, 2, 3, 4] and ds.sizes.tolist() == [2, 3, 1, 4]
    assert isinstance(ds.tokens, np.memmap) and ds.tokens.tolist() == sum(seqs, [])
    assert ds.offset_of(2) == 5 and ds.offset_of(4) == 10


def test_our_writer_matches_the_spec_byte_for_byte(tmp_path):
    seqs = [[5, 6], [7, 8, 9], [], [1]]
    write_spec_pair(str(tmp_path / "spec"), seqs)
    with binidx.BinIdxWriter(str(tmp_path / "ours"), np.uint16) as w:
        for s in seqs:
            w.add(s)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"spec{ext}").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.bin", "ours.idx", "spec.bin", "spec.idx"]


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="binidx_prefix"):
        binidx.MMapIndexedDataset(str(tmp_path / "none"))
    prefix = str(tmp_path / "x")
    write_spec_pair(prefix, [[1, 2]])
    data = bytearray((tmp_path / "x.idx").read_bytes())
    (tmp_path / "x.idx").write_bytes(b"NOTANIDX\x00" + data[9:])
    with pytest.raises(ValueError, match="not a version 1 MMIDIDX"):
        binidx.MMapIndexedDataset(prefix)
    (tmp_path / "x.idx").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="header implies"):
        binidx.MMapIndexedDataset(prefix)
    with pytest.raises(ValueError, match="do not fit uint16"):
        binidx.BinIdxWriter(str(tmp_path / "y"), np.uint16).add([70000])


def test_make_binidx_converts_text_and_jsonl(tmp_path):
    texts = [open(m.__file__, encoding="utf-8").read() for m in (json, struct)]
    (tmp_path / "a.py").write_text(texts[0])
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [texts[1], "short doc"]))
    model = str(tmp_path / "sp.model")
    prefix = str(tmp_path / "out" / "corpus")
    make_binidx.make_binidx(f"{tmp_path}/a.py,{tmp_path}/b.jsonl", prefix, model, sp_vocab_size=400)
    tok = tokenizer_lib.SentencePieceTokenizer(model)
    ds = binidx.MMapIndexedDataset(prefix)
    assert ds.dtype == np.uint16 and len(ds) == 3
    docs = [ds[i].tolist() for i in range(3)]
    assert all(d[-1] == tok.eot_id for d in docs)
    assert [tok.decode(d[:-1]) for d in docs] == [texts[0], texts[1], "short doc"]


def test_make_binidx_runs_as_a_module(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    result = subprocess.run([sys.executable, "-m", "rwkv_jax.cli.make_binidx", "--input", str(tmp_path / "a.txt"),
                             "--output_prefix", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "sp.model"),
                             "--sp_vocab_size", "300"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Wrote 1 documents" in result.stdout
    assert len(binidx.MMapIndexedDataset(str(tmp_path / "o"))) == 1


def word_level_json(path):
    """A tiny HF `tokenizers` JSON file (word level, `<|endoftext|>` = 0)."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "world": 3},
                                                           unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def test_make_binidx_with_a_hf_json_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("hello world hello\n")
    make_binidx.make_binidx(str(tmp_path / "a.txt"), str(tmp_path / "o"), word_level_json(tmp_path / "tok.json"))
    assert binidx.MMapIndexedDataset(str(tmp_path / "o"))[0].tolist() == [2, 3, 2, 0]


def test_make_binidx_empty_input_writes_nothing(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="No non-empty documents"):
        make_binidx.make_binidx(str(tmp_path / "empty.txt"), str(tmp_path / "o"),
                                word_level_json(tmp_path / "tok.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "tok.json"]


def test_make_binidx_keeps_an_existing_pair_unless_overwrite(tmp_path):
    (tmp_path / "a.txt").write_text("hello world hello\n")
    (tmp_path / "b.txt").write_text("world\n")
    tok = word_level_json(tmp_path / "tok.json")
    make_binidx.make_binidx(str(tmp_path / "a.txt"), str(tmp_path / "o"), tok)
    with pytest.raises(FileExistsError, match="o.bin already exists.*--overwrite"):
        make_binidx.make_binidx(str(tmp_path / "b.txt"), str(tmp_path / "o"), tok)
    assert binidx.MMapIndexedDataset(str(tmp_path / "o"))[0].tolist() == [2, 3, 2, 0]  # the first corpus, intact
    make_binidx.make_binidx(str(tmp_path / "b.txt"), str(tmp_path / "o"), tok, overwrite=True)
    assert binidx.MMapIndexedDataset(str(tmp_path / "o"))[0].tolist() == [3, 0]


def test_make_binidx_refuses_a_directory_as_the_output_prefix(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="names a directory.*e.g. .*out/corpus"):  # it wrote hidden out/.bin, out/.idx
        make_binidx.make_binidx(str(tmp_path / "a.txt"), f"{tmp_path}/out/", word_level_json(tmp_path / "tok.json"))
    assert not list((tmp_path / "out").iterdir())


def test_make_binidx_names_its_flag_for_a_missing_input(tmp_path):
    tok = word_level_json(tmp_path / "t.json")
    with pytest.raises(FileNotFoundError, match=r"^--input: .*missing.txt' does not exist"):  # not config.data...
        make_binidx.make_binidx(str(tmp_path / "missing.txt"), str(tmp_path / "o"), tok)
