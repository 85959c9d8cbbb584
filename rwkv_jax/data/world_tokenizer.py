"""The RWKV "World" tokenizer: greedy longest match over bytes, as the official `rwkv` package.

The vocabulary file (`rwkv_vocab_v20230424.txt`) has one token a line, `ID LITERAL BYTE_LENGTH`,
where LITERAL is a Python str literal (its UTF-8 bytes are the token) or bytes literal (tokens
that are not valid UTF-8 on their own), e.g. `257 '\\t\\t' 2` or `256 b'\\xff' 1`. The released
file holds 65,529 tokens with ids 1..65529: ids 1..256 are the 256 single bytes, so any byte
string can be encoded. Id 0 is not in the file: it is the end-of-text token `<|endoftext|>` that
RWKV World models are trained with between documents (the official code stops generating at it),
so `eot_id` is 0, it decodes to no bytes, and `vocab_size` is 65,530 (the largest id + 1). World
models pad their embedding table to 65,536 rows, so `check_fits` passes with
`model.vocab_size = 65536`.

Encoding is the official `rwkv.rwkv_tokenizer.TRIE_TOKENIZER`'s: from the start of the bytes,
take the longest vocabulary token that is a prefix of what is left, and repeat. This module is a
separate implementation (a trie of dicts whose walk is a tight loop); the tests compare its ids
with the official tokenizer's on multilingual text, emoji and random bytes.
"""

import ast
import os
import re

from rwkv_jax.data.tokenizer_base import Tokenizer

EOT_ID = 0
EOT_TOKEN = "<|endoftext|>"

_EXPECTED = ("expected an RWKV World vocabulary such as rwkv_vocab_v20230424.txt: UTF-8 lines "
             "'ID LITERAL BYTE_LENGTH', e.g. \"257 '\\t\\t' 2\" or \"256 b'\\xff' 1\"")
_LINE = re.compile(r"(\d+) (.+) (\d+)", re.ASCII)
# A byte that is never a key of a trie node: appended to the input so that the walk needs no bounds test.
_END = 256


class WorldTokenizer(Tokenizer):
    """Text <-> RWKV World token ids, exactly as the official trie tokenizer encodes them.

    The same interface as the other tokenizers of `rwkv_jax.data.tokenizer` (encode, encode_batch,
    decode, vocab_size, eot_id, path, fingerprint), plus byte-level `encode_bytes`/`decode_bytes`:
    a World token can be part of a UTF-8 character, so bytes are the lossless form.
    """

    def __init__(self, path: str):
        """Reads the vocabulary file `path`; raises ValueError naming the file (and line) if it is not one."""
        path = os.fspath(path)
        if os.path.isdir(path):
            raise IsADirectoryError(f"RWKV World vocabulary {path!r} is a directory: give the .txt file in it")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"RWKV World vocabulary {path!r} not found (config.data.tokenizer_path)")
        self.path = path
        self._id_to_bytes = _read_vocab(path)
        self.vocab_size = max(self._id_to_bytes) + 1
        self.eot_id = EOT_ID
        self._id_to_bytes[EOT_ID] = b""
        self._trie = _build_trie(self._id_to_bytes)

    @classmethod
    def from_file(cls, path: str) -> "WorldTokenizer":
        """The tokenizer of the vocabulary file `path` (the same as `WorldTokenizer(path)`)."""
        return cls(path)

    def encode(self, text: str) -> list[int]:
        """Token ids of the UTF-8 bytes of `text` (no end-of-text token added).

        A lone surrogate in `text` raises UnicodeEncodeError, as in the official tokenizer: such a
        string has no UTF-8 bytes (`encode_bytes` takes any bytes).
        """
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of any bytes, valid UTF-8 or not: greedy longest match from the left.

        The walk down the trie goes on past the last token seen while a longer one may still match,
        then restarts after the longest token found, as the official tokenizer does.
        """
        trie = self._trie
        seq = list(data)
        seq.append(_END)
        n = len(data)
        out = []
        append = out.append
        i = 0
        while i < n:
            node, best = trie[seq[i]]  # every single byte is a token (checked on reading)
            j = i + 1
            end = j
            while True:
                entry = node.get(seq[j])
                if entry is None:
                    break
                node, token = entry
                j += 1
                if token:
                    best = token
                    end = j
            append(best)
            i = end
        return out

    def decode_bytes(self, ids) -> bytes:
        """The bytes of token ids (any iterable of ints, numpy ints included); `eot_id` gives no bytes.

        Raises ValueError on an id that is not in the vocabulary (negative, too large, or a gap).
        """
        table = self._id_to_bytes
        try:
            return b"".join([table[i] for i in ids])
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]!r} is not in the RWKV World vocabulary {self.path!r} "
                             f"(ids 0..{self.vocab_size - 1})") from None

    def decode(self, ids) -> str:
        """Text of token ids; bytes that are not valid UTF-8 (a character cut between tokens) become U+FFFD.

        The official tokenizer returns a lone '\\ufffd' for the whole text in that case; use
        `decode_bytes` where the exact bytes matter.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token id (b'' for `eot_id`)."""
        return self.decode_bytes([token_id])


def _read_vocab(path: str) -> dict[int, bytes]:
    """Id -> token bytes of the vocabulary file; one ValueError naming the file, line and problem if malformed.

    The file must be UTF-8 text (CRLF or LF line ends), ids >= 1 and unique, tokens non-empty and
    unique, and every single byte a token (so that any input can be encoded).
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path!r} is not UTF-8 text (byte {e.start} is {raw[e.start:e.start + 1]!r}): "
                         f"{_EXPECTED}") from None
    lines = text.split("\n")  # not splitlines(): that would also split at \x1c, \x85, \u2028...
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{path!r} is empty: {_EXPECTED}")
    id_to_bytes: dict[int, bytes] = {}
    bytes_to_line: dict[bytes, int] = {}
    for number, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        try:
            token_id, token = _parse_line(line)
            if token_id in id_to_bytes:
                raise _Malformed(f"id {token_id} is given twice")
            if token in bytes_to_line:
                raise _Malformed(f"token {token!r} is already on line {bytes_to_line[token]}")
        except _Malformed as e:
            shown = line if len(line) <= 60 else line[:60] + "..."
            raise ValueError(f"{path!r} line {number} ({shown!r}): {e}; {_EXPECTED}") from None
        id_to_bytes[token_id] = token
        bytes_to_line[token] = number
    missing = [b for b in range(256) if bytes([b]) not in bytes_to_line]
    if missing:
        raise ValueError(f"{path!r} lacks {len(missing)} of the 256 single-byte tokens (the first: "
                         f"{bytes([missing[0]])!r}), so not every input could be encoded: {_EXPECTED}")
    return id_to_bytes


class _Malformed(Exception):
    """One vocabulary line is not `ID LITERAL BYTE_LENGTH`; the message says why."""


def _parse_line(line: str) -> tuple[int, bytes]:
    """(id, token bytes) of one vocabulary line; `_Malformed` if it is not one.

    The literal is read with `ast.literal_eval` (no code runs) and must be a str (encoded as UTF-8)
    or bytes literal whose byte length is the line's last field.
    """
    match = _LINE.fullmatch(line)
    if match is None:
        raise _Malformed("not three space-separated fields 'ID LITERAL BYTE_LENGTH'")
    token_id, literal, length = int(match[1]), match[2], int(match[3])
    if token_id == EOT_ID:
        raise _Malformed(f"id {EOT_ID} is reserved for {EOT_TOKEN}, which is not in the file")
    try:
        token = ast.literal_eval(literal)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise _Malformed(f"{literal!r} is not a Python str or bytes literal") from None
    if isinstance(token, str):
        try:
            token = token.encode("utf-8")
        except UnicodeEncodeError:
            raise _Malformed(f"{literal!r} has a lone surrogate, which UTF-8 cannot encode") from None
    elif not isinstance(token, bytes):
        raise _Malformed(f"{literal!r} is a {type(token).__name__}, not a str or bytes literal")
    if not token:
        raise _Malformed("the token is empty")
    if len(token) != length:
        raise _Malformed(f"the token has {len(token)} bytes, but the line says {length}")
    return token_id, token


def _build_trie(id_to_bytes: dict[int, bytes]) -> dict:
    """The tokens as a trie: node = {byte: (child node, id of the token ending there or 0)}.

    Tuples and plain dicts keep the encoding walk to one dict lookup and one unpacking a byte;
    0 can mean "no token ends here" because it is `eot_id`, never a token of the file.
    """
    root: dict = {}
    for token_id, token in id_to_bytes.items():
        if token_id == EOT_ID:
            continue
        node = root
        for byte in token[:-1]:
            node = node.setdefault(byte, [{}, 0])[0]
        node.setdefault(token[-1], [{}, 0])[1] = token_id
    return _freeze(root)


def _freeze(node: dict) -> dict:
    """The mutable trie of `_build_trie` with (child, id) tuples; leaves share one empty dict."""
    return {byte: (_freeze(child) if child else _LEAF, token_id) for byte, (child, token_id) in node.items()}


_LEAF: dict = {}  # never modified: the children of every leaf
