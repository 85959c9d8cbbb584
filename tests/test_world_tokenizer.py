"""WorldTokenizer against the official `rwkv` TRIE_TOKENIZER built from the same vocabulary file.

No expected ids are written here: every encoding is compared with the official tokenizer's.
"""

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest

from rwkv_jax.data import tokenizer as tokenizer_lib
from rwkv_jax.data.world_tokenizer import WorldTokenizer

VOCAB = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers" / "rwkv_vocab_v20230424.txt"

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it?  Two  spaces, 'quotes'.",
    "chinese": "我们今天去公园散步，天气很好。人工智能正在改变世界，语言模型可以理解和生成文本。",
    "japanese": "日本語のテキストです。カタカナ、ひらがな、漢字を含みます。東京は雨でした。",
    "arabic": "مرحبا بالعالم، هذا نص عربي للاختبار. اللغة العربية تكتب من اليمين إلى اليسار.",
    "russian": "Привет, мир! Это русский текст для проверки токенизатора. Ёжик в тумане.",
    "code": "def f(x):\n\tif x:\n\t\treturn {'a': [1, 2]}\n\treturn None\r\n\n\n    # comment\n\tx\t=\t1  \n",
    "mixed": "Hello 你好 こんにちは مرحبا Привет 안녕하세요 γειά σου שלום नमस्ते ",
    "whitespace": " " * 300 + "\n" * 40 + "\t" * 33 + "-" * 170 + "#" * 81,
}
EMOJI = {
    "plain": "🙂😀🎉🔥❤️👍",
    "skin_tones": "👍🏻👍🏼👍🏽👍🏾👍🏿 👋🏽 🧑🏿‍💻",
    "zwj": "👨‍👩‍👧‍👦 👩‍❤️‍💋‍👨 🏳️‍🌈 🧑‍🤝‍🧑 👁️‍🗨️",
    "flags_keycaps": "🇯🇵🇫🇷🇺🇸 1️⃣ #️⃣ ©️ text🙂text",
}


@pytest.fixture(scope="module")
def vocab_path() -> str:
    if not VOCAB.is_file():
        pytest.skip(f"the RWKV World vocabulary is not at {VOCAB} (development material only)")
    return str(VOCAB)


@pytest.fixture(scope="module")
def ours(vocab_path) -> WorldTokenizer:
    return WorldTokenizer.from_file(vocab_path)


@pytest.fixture(scope="module")
def official(vocab_path):
    rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer", reason="the official `rwkv` package is needed")
    return rwkv_tokenizer.TRIE_TOKENIZER(vocab_path)


@pytest.mark.parametrize("text", [*TEXTS.values(), *EMOJI.values()], ids=[*TEXTS, *EMOJI])
def test_text_matches_official_and_round_trips(ours, official, text):
    ids = ours.encode(text)
    assert ids == official.encode(text)
    assert ours.decode(ids) == text
    assert ours.encode(ours.decode(ids)) == ids


def test_long_multilingual_text_matches_official(ours, official):
    """All the samples shuffled together, so that tokens meet across the sample boundaries."""
    pieces = [*TEXTS.values(), *EMOJI.values()] * 20
    random.Random(0).shuffle(pieces)
    text = "".join(pieces)
    ids = ours.encode(text)
    assert ids == official.encode(text)
    assert ours.decode(ids) == text
    assert ours.encode_batch([text, "", "x"]) == [ids, [], ours.encode("x")]


def test_random_bytes_match_official(ours, official):
    """Arbitrary bytes (mostly not valid UTF-8) encode as the official does and decode to the same bytes."""
    rng = random.Random(1)
    blobs = [rng.randbytes(rng.randrange(0, 200)) for _ in range(300)]
    blobs += [rng.randbytes(50_000), b"\xff\xfe\x00\x80", "é".encode()[:1], "你好".encode()[:4], b"\x00" * 200]
    for blob in blobs:
        ids = ours.encode_bytes(blob)
        assert ids == official.encodeBytes(blob), blob
        assert ours.decode_bytes(ids) == blob


def test_concatenated_vocabulary_tokens_match_official(ours, official):
    """Random runs of vocabulary tokens: where greedy longest match is tested hardest, at token joins."""
    rng = random.Random(2)
    tokens = [official.idx2token[i] for i in range(1, ours.vocab_size)]
    for _ in range(200):
        blob = b"".join(rng.choice(tokens) for _ in range(rng.randrange(1, 40)))
        assert ours.encode_bytes(blob) == official.encodeBytes(blob)
    mixed = b"".join(rng.choice(tokens) + rng.randbytes(rng.randrange(0, 3)) for _ in range(5000))
    assert ours.encode_bytes(mixed) == official.encodeBytes(mixed)


def test_invalid_utf8_decodes_with_replacement(ours):
    ids = ours.encode_bytes(b"ok \xff\xfe end")
    assert ours.decode(ids) == "ok \ufffd\ufffd end"
    cut = ours.encode_bytes("你".encode()[:2])  # a character cut short
    assert ours.decode(cut) == "\ufffd" and ours.decode_bytes(cut) == "你".encode()[:2]


def test_empty(ours, official):
    assert ours.encode("") == official.encode("") == []
    assert ours.encode_bytes(b"") == []
    assert ours.decode([]) == "" and ours.decode_bytes([]) == b""


def test_every_id_decodes_to_its_bytes(ours, official, vocab_path):
    """Ids 1..65529 are the file's lines; id 0 is <|endoftext|>: not in the file, no bytes, eot_id."""
    file_ids = sorted(official.idx2token)
    assert file_ids == list(range(1, len(file_ids) + 1))
    assert 0 not in official.idx2token
    assert (ours.vocab_size, ours.eot_id) == (file_ids[-1] + 1, 0)
    assert ours.vocab_size <= 65536  # World models' embedding tables have 65536 rows
    for i in file_ids:
        assert ours.token_bytes(i) == official.idx2token[i], i
    assert ours.decode_bytes(np.array(file_ids)) == b"".join(official.idx2token[i] for i in file_ids)
    assert ours.decode([ours.eot_id]) == "" and ours.decode_bytes([0, 1, 0]) == official.idx2token[1]


def test_unknown_id_is_a_value_error(ours):
    for bad in (-1, ours.vocab_size, 10**9):
        with pytest.raises(ValueError, match=f"token id {bad} is not in the RWKV World vocabulary"):
            ours.decode([1, bad])


def test_tokenizer_interface(ours, vocab_path):
    """The attributes and methods the data pipeline and trainer use on any tokenizer."""
    assert isinstance(ours, tokenizer_lib.Tokenizer)
    assert ours.path == vocab_path
    assert ours.fingerprint == hashlib.sha256(Path(vocab_path).read_bytes()).hexdigest()[:12]
    tokenizer_lib.check_fits(ours, 65536)
    with pytest.raises(ValueError, match="65530 tokens"):
        tokenizer_lib.check_fits(ours, 65529)


def _malformed(tmp_path, vocab_path, line_no: int, line: str | None) -> Path:
    """A copy of the real vocabulary with line `line_no` replaced (None: removed)."""
    lines = Path(vocab_path).read_text(encoding="utf-8").split("\n")
    lines[line_no - 1:line_no] = [] if line is None else [line]
    path = tmp_path / f"bad_{line_no}.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("line_no, line, reason", [
    (300, "300 'abc' 4", "the token has 3 bytes, but the line says 4"),
    (301, "301 'abc 3", "not a Python str or bytes literal"),
    (302, "302 __import__('os') 2", "not a Python str or bytes literal"),
    (303, "303 ('a', 'b') 2", "is a tuple, not a str or bytes literal"),
    (304, "x304 'ab' 2", "not three space-separated fields"),
    (305, "0 'zz' 2", "reserved for <|endoftext|>"),
    (306, "305 'qq' 2", "id 305 is given twice"),
    (307, "307 '\\t\\t' 2", "is already on line 257"),
    (308, "308 '' 0", "the token is empty"),
])
def test_malformed_line_is_one_clear_value_error(tmp_path, vocab_path, line_no, line, reason):
    path = _malformed(tmp_path, vocab_path, line_no, line)
    with pytest.raises(ValueError) as info:
        WorldTokenizer(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert f"{str(path)!r} line {line_no} " in message and reason in message
    assert "RWKV World vocabulary" in message


def test_not_a_world_vocabulary(tmp_path, vocab_path):
    """Other files: each a one-line ValueError naming the file and what was expected."""
    cases = {
        "tokenizer.json": b'{\n  "version": "1.0",\n  "model": {}\n}\n',
        "binary.model": b"\x0a\x0b\xff\xfe\x00sentencepiece\x80",
        "empty.txt": b"",
        "few.txt": b"1 'a' 1\n2 b'\\xff' 1\n",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError) as info:
            WorldTokenizer(str(path))
        assert "\n" not in str(info.value) and repr(str(path)) in str(info.value), name
        assert "expected an RWKV World vocabulary" in str(info.value), name
    missing = _malformed(tmp_path, vocab_path, 66, None)  # b'A' (id 66) removed
    with pytest.raises(ValueError, match="lacks 1 of the 256 single-byte tokens .* b'A'"):
        WorldTokenizer(str(missing))
    with pytest.raises(FileNotFoundError):
        WorldTokenizer(str(tmp_path / "absent.txt"))


def test_crlf_and_lf_files_read_the_same(tmp_path, vocab_path, ours):
    """The shared copy has CRLF line ends, the upstream file LF: both give the same tokenizer."""
    text = Path(vocab_path).read_bytes().replace(b"\r\n", b"\n")
    path = tmp_path / "lf.txt"
    path.write_bytes(text)
    other = WorldTokenizer(str(path))
    sample = TEXTS["code"] + EMOJI["zwj"]
    assert other.encode(sample) == ours.encode(sample) and other.vocab_size == ours.vocab_size


def test_the_package_reads_a_world_vocabulary_by_its_suffix_and_by_name(vocab_path):
    """data.tokenizer='rwkv_world' and a .txt --tokenizer both give the World tokenizer."""
    by_file = tokenizer_lib.load_tokenizer_file(vocab_path)
    by_kind = tokenizer_lib.load_tokenizer("rwkv_world", vocab_path)
    assert isinstance(by_file, WorldTokenizer) and isinstance(by_kind, WorldTokenizer)
    assert by_file.encode("Hello 你好 🙂") == by_kind.encode("Hello 你好 🙂")


def test_a_world_tokenizer_config_needs_its_file():
    from rwkv_jax.train import train_config
    config = train_config.base_config(model=train_config.model_config(), batch_size=2, seq_len=8, num_steps=1,
                                      lr_init=1e-3, lr_final=1e-4)
    config.data.tokenizer = "rwkv_world"
    with pytest.raises(train_config.ConfigError, match=r"data.tokenizer_path is required for tokenizer='rwkv_world'"):
        train_config.validate(config)
