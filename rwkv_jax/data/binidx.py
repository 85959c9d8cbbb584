"""Megatron / GPT-NeoX `.bin` + `.idx` token files (the format of RWKV-LM's Pile data).

`.idx` (little endian): magic b'MMIDIDX\\x00\\x00', <Q version 1, <B dtype code,
<Q number of sequences n, <Q length of doc_idx d, int32 sizes[n] (tokens per sequence),
int64 pointers[n] (byte offset of each sequence in `.bin`), int64 doc_idx[d] (first
sequence of each document, then n). `.bin` is the token ids of all sequences back to back.
Both are memory-mapped: nothing is loaded into RAM.
"""

import os
import struct

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_HEADER = struct.Struct("<9sQBQQ")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest token dtype that holds ids < `vocab_size` (uint16 up to 65536)."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)


class MMapIndexedDataset:
    """Read-only view of a `.bin`/`.idx` pair; `tokens` is the flat memmapped token stream."""

    def __init__(self, prefix: str, what: str = "config.data.binidx_prefix"):
        """`what`: the config field or flag that gave `prefix`, for the error of a missing file."""
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                stem, suffix = os.path.splitext(prefix)
                fix = (f"give {what}={stem}, the path without .bin/.idx" if suffix in (".bin", ".idx")
                       else "the path without .bin/.idx")
                raise FileNotFoundError(f"{what}={prefix}: binidx file {p!r} not found ({fix}).")
        self._idx = np.memmap(idx_path, np.uint8, mode="r")
        if self._idx.size < _HEADER.size:
            raise ValueError(f"{idx_path!r} is too short to be a binidx index.")
        magic, version, code, n, d = _HEADER.unpack(self._idx[:_HEADER.size].tobytes())
        if magic != MAGIC or version != 1:
            raise ValueError(f"{idx_path!r} is not a version 1 MMIDIDX index (magic {magic!r}, version {version}).")
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx_path!r}: unsupported token dtype code {code}; known {sorted(DTYPE_CODES)}.")
        self.dtype = np.dtype(DTYPE_CODES[code])
        offset = _HEADER.size
        if self._idx.size != offset + 12 * n + 8 * d:
            raise ValueError(f"{idx_path!r} is {self._idx.size} bytes; its header implies {offset + 12 * n + 8 * d}.")
        self.sizes = np.frombuffer(self._idx, np.int32, n, offset)
        self.pointers = np.frombuffer(self._idx, np.int64, n, offset + 4 * n)
        self.doc_idx = np.frombuffer(self._idx, np.int64, d, offset + 12 * n)
        nbytes = os.path.getsize(bin_path)
        end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        if end > nbytes:
            raise ValueError(f"{bin_path!r} is {nbytes} bytes but {idx_path!r} points up to byte {end}.")
        self.tokens = (np.memmap(bin_path, self.dtype, mode="r", shape=(nbytes // self.dtype.itemsize,))
                       if nbytes else np.zeros(0, self.dtype))

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]

    def offset_of(self, i: int) -> int:
        """Token offset of sequence `i` in `tokens` (`len(tokens)` for i == len(self))."""
        return len(self.tokens) if i >= len(self) else int(self.pointers[i]) // self.dtype.itemsize


class BinIdxWriter:
    """Writes one document per `add` to `prefix.bin/.idx` via temp files renamed on `close`."""

    def __init__(self, prefix: str, dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        code = [c for c, t in DTYPE_CODES.items() if np.dtype(t) == self.dtype]
        if not code:
            raise ValueError(f"binidx cannot store dtype {self.dtype}.")
        self._code = code[0]
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._tmp = f"{prefix}.tmp-{os.getpid()}"
        self._bin = open(self._tmp + ".bin", "wb")
        self._sizes: list[int] = []

    def add(self, ids) -> None:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < np.iinfo(self.dtype).min or ids.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"Token ids {ids.min()}..{ids.max()} do not fit {self.dtype}.")
        self._bin.write(ids.astype(self.dtype).tobytes())
        self._sizes.append(int(ids.size))

    def close(self) -> None:
        self._bin.close()
        n = len(self._sizes)
        sizes = np.asarray(self._sizes, np.int32)
        pointers = np.zeros(n, np.int64)
        np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(n + 1, dtype=np.int64)
        with open(self._tmp + ".idx", "wb") as f:
            f.write(_HEADER.pack(MAGIC, 1, self._code, n, n + 1))
            f.write(sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes())
        os.replace(self._tmp + ".bin", self.prefix + ".bin")
        os.replace(self._tmp + ".idx", self.prefix + ".idx")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._bin.close()
            for ext in (".bin", ".idx"):
                if os.path.exists(self._tmp + ext):
                    os.remove(self._tmp + ext)
