"""Token cache and batches.

The token cache is one flat file of token ids (uint16, or uint32 for vocabularies over 65536)
holding every document followed by the end-of-text id, memory-mapped for reading. Training
and eval batches are cut from such a flat stream (a cache, or a binidx `.bin`).
"""

import itertools
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator

import grain
import numpy as np
from absl import logging

from rwkv_jax.data.tokenizer import Tokenizer
from rwkv_jax.model import check_token_ids


def split_texts(builder, split: str, key: str = "text") -> Iterable[str]:
    """Documents of a TFDS array_record split, in stored order, read through grain."""
    ds = grain.MapDataset.source(builder.as_data_source(split)).map(lambda r: r[key].decode("utf-8"))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=256))


def token_cache(texts: Iterable[str], tokenizer: Tokenizer, path: str, *,
                num_docs: int | None = None, chunk: int = 256) -> np.ndarray:
    """Tokenizes `texts` once into `path` (doc, eot, doc, eot, ...) and memory-maps it.

    A cache whose metadata file exists is complete and reused; it is written under a temp
    name and renamed, metadata last, so an interrupted build leaves nothing half-written.
    """
    if os.path.isfile(path + ".json"):
        logging.info("Reusing token cache %s.", path)
        return open_token_cache(path)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    start, last_log, docs, tokens = time.time(), time.time(), 0, 0
    with open(tmp, "wb") as f:
        it = iter(texts)
        while batch := list(itertools.islice(it, chunk)):
            for ids in tokenizer.encode_batch(batch):
                f.write(np.asarray(ids + [tokenizer.eot_id], dtype).tobytes())
                tokens += len(ids) + 1
            docs += len(batch)
            if time.time() - last_log > 5:
                last_log = time.time()
                logging.info("Tokenizing into %s: %d/%s documents, %d tokens.", path, docs, num_docs or "?", tokens)
    os.replace(tmp, path)
    meta = {"dtype": dtype.name, "num_tokens": tokens, "num_docs": docs, "tokenizer": tokenizer.path}
    with open(tmp + ".json", "w") as f:
        json.dump(meta, f)
    os.replace(tmp + ".json", path + ".json")
    logging.info("Token cache %s: %d documents, %d tokens in %.1fs.", path, docs, tokens, time.time() - start)
    return open_token_cache(path)


def open_token_cache(path: str) -> np.ndarray:
    """The memory-mapped token stream of a complete cache; ValueError naming the file if it is damaged."""
    try:
        with open(path + ".json") as f:
            meta = json.load(f)
        dtype, count = np.dtype(meta["dtype"]), int(meta["num_tokens"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"token cache metadata {path + '.json'!r} is damaged ({type(e).__name__}: {e}): delete "
                         f"it and {path!r} to rebuild the cache") from e
    if not count:
        return np.zeros(0, dtype)
    size = os.path.getsize(path) if os.path.isfile(path) else -1
    if size != count * dtype.itemsize:
        raise ValueError(f"token cache {path!r} is {size} bytes but its metadata says {count} {dtype.name} tokens "
                         f"({count * dtype.itemsize} bytes): it is truncated or damaged; delete it and "
                         f"{path + '.json'!r} to rebuild it")
    return np.memmap(path, dtype, mode="r", shape=(count,))


DAMAGED_FILE_FIX = ("the file was written with another tokenizer, or is damaged; rebuild it with the configured "
                    "tokenizer (or set config.model.vocab_size)")
# Streams up to this many tokens are scanned whole for out-of-vocabulary ids when opened (~1 s per 2**30
# uint16 tokens); every batch is checked anyway, so larger ones (the Pile) fail at their first bad batch.
FULL_SCAN_LIMIT = 2**30


def _check_length(tokens_N: np.ndarray, seq_len: int, name: str) -> None:
    if len(tokens_N) < seq_len + 1:
        raise ValueError(
            f"The {name} split has {len(tokens_N)} tokens but a window needs seq_len + 1 = {seq_len + 1}: "
            "lower config.train.seq_len or use a larger corpus (or a larger validation_fraction).")


def _resets(inputs_BT: np.ndarray, reset_id: int | None, valid_BT: np.ndarray | None = None) -> dict:
    """{'reset': bool [B, T], True where the input is `reset_id`} (only real inputs where `valid_BT` is
    given), or {} when `reset_id` is None."""
    if reset_id is None:
        return {}
    reset_BT = inputs_BT == reset_id
    return {"reset": reset_BT if valid_BT is None else reset_BT & (valid_BT == 1)}


def _process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    if batch_size % process_count or not 0 <= process_index < process_count:
        raise ValueError(f"The global batch size {batch_size} must split evenly over {process_count} "
                         f"processes (process_index {process_index}).")
    rows = batch_size // process_count
    return slice(process_index * rows, (process_index + 1) * rows)


SAMPLINGS = ("random", "streams")


def stream_starts(num_tokens: int, batch_size: int, seed: int) -> np.ndarray:
    """Where each row's stream starts (sampling='streams'): evenly spaced over the corpus, N/B tokens
    apart, all shifted by one phase drawn from `seed`, so that rows read disjoint stretches for the
    first N/B tokens of training."""
    phase = int(np.random.default_rng((int(seed), 0x5EA)).integers(0, num_tokens))
    return (np.arange(batch_size, dtype=np.int64) * num_tokens // batch_size + phase) % num_tokens


def cyclic_window(tokens_N: np.ndarray, start: int, length: int) -> np.ndarray:
    """tokens[start : start + length] of the stream read as a cycle (past the end it continues at 0)."""
    n = len(tokens_N)
    start %= n
    if start + length <= n:
        return np.asarray(tokens_N[start:start + length])
    head = np.asarray(tokens_N[start:])
    return np.concatenate([head, cyclic_window(tokens_N, 0, length - len(head))])


class Batches:
    """Training batches; batch `step` is a pure function of (seed, step, process_index, process_count).

    Sampling 'random' (RWKV-LM's): row r of global batch `step` is the window tokens[o : o + seq_len
    + 1] at an offset o drawn uniformly from [0, N - seq_len - 1] by a generator seeded with (seed,
    step) (windows cross document boundaries, documents are joined by eot).

    Sampling 'streams' (long-context training with a carried state): row r of the global batch is a
    stream that reads the corpus in order from `stream_starts(...)[r]`, one window per step: batch n
    holds, in row r, tokens[s_r + n*T : s_r + n*T + T + 1], so the window of step n+1 continues
    exactly where that of step n stopped and the trainer carries the row's recurrent state across.
    The corpus is read as a cycle: a stream that reaches the end continues at token 0. The corpus is
    documents each followed by eot, so the wrap is one more document boundary (the state carried
    over it has just read an eot, as at every other boundary) and needs no special handling; the
    carried state is not reset there (nor at other boundaries: resets are data.reset_at_eot's). A
    binidx file written without eot has none at the wrap either, as between its other documents.

    With `reset_id` (the eot id, config.data.reset_at_eot) batches also carry 'reset': the inputs
    equal to it, where the model resets its state (cut from the same windows in either mode).

    Either way nothing depends on earlier batches, so a run resumed at step n sees exactly the
    batches an uninterrupted run sees. Each process builds only its own rows of the global batch.
    """

    def __init__(self, tokens_N: np.ndarray, *, seq_len: int, batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, vocab_size: int | None = None,
                 source: str = "the training tokens", reset_id: int | None = None, sampling: str = "random"):
        _check_length(tokens_N, seq_len, "training")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {list(SAMPLINGS)}, got {sampling!r}")
        self.tokens_N = tokens_N
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.sampling = sampling
        self.vocab_size = vocab_size  # when set, every batch's ids are checked against it (cheap)
        self.source = source
        self.reset_id = reset_id
        self._rows = _process_rows(batch_size, process_index, process_count)

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """{'inputs', 'targets'}: int32 [batch_size // process_count, seq_len], targets shifted by one;
        and 'reset' (bool, same shape) with a `reset_id`."""
        T = self.seq_len
        if self.sampling == "streams":
            starts_B = stream_starts(len(self.tokens_N), self.batch_size, self.seed)[self._rows]
            offsets_B = (starts_B + int(step) * T) % len(self.tokens_N)
            window_BT1 = np.stack([cyclic_window(self.tokens_N, int(o), T + 1) for o in offsets_B])
        else:
            rng = np.random.default_rng((int(self.seed), int(step)))
            offsets_B = rng.integers(0, len(self.tokens_N) - T, size=self.batch_size)[self._rows]
            window_BT1 = np.stack([self.tokens_N[o:o + T + 1] for o in offsets_B])
        if self.vocab_size is not None and (window_BT1.min() < 0 or window_BT1.max() >= self.vocab_size):
            row = int(np.flatnonzero(((window_BT1 < 0) | (window_BT1 >= self.vocab_size)).any(1))[0])
            check_token_ids(window_BT1[row], self.vocab_size, self.source, offset=int(offsets_B[row]),
                            fix=DAMAGED_FILE_FIX)
        window_BT1 = window_BT1.astype(np.int32)
        inputs_BT = np.ascontiguousarray(window_BT1[:, :-1])
        return {"inputs": inputs_BT, "targets": np.ascontiguousarray(window_BT1[:, 1:]),
                **_resets(inputs_BT, self.reset_id)}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Batches 0, 1, ... (a resumed run calls `batch_at` from its checkpoint's step)."""
        return map(self.batch_at, itertools.count())


class EvalBatches:
    """The eval split in order, each target token exactly once; iterate it again for a new pass.

    Window i holds inputs tokens[i*T : i*T+T] and targets tokens[i*T+1 : i*T+T+1]; global batch
    k holds windows k*B .. k*B+B-1. 'mask' (int32, 1 = real target) zeroes the padding of the
    last window and of missing windows in the last batch, so shapes never change. With `reset_id`,
    'reset' marks the real inputs equal to it (as `Batches`).
    """

    def __init__(self, tokens_N: np.ndarray, *, seq_len: int, batch_size: int,
                 process_index: int = 0, process_count: int = 1, vocab_size: int | None = None,
                 source: str = "the eval tokens", reset_id: int | None = None):
        _check_length(tokens_N, seq_len, "eval")
        self.tokens_N = tokens_N
        self.vocab_size = vocab_size
        self.source = source
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.reset_id = reset_id
        self._rows = _process_rows(batch_size, process_index, process_count)
        self.num_windows = -(-(len(tokens_N) - 1) // seq_len)

    def __len__(self) -> int:
        return -(-self.num_windows // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        T, n = self.seq_len, len(self.tokens_N)
        rows = range(self.batch_size)[self._rows]
        for k in range(len(self)):
            inputs_BT = np.zeros((len(rows), T), np.int32)
            targets_BT = np.zeros((len(rows), T), np.int32)
            mask_BT = np.zeros((len(rows), T), np.int32)
            for r, row in enumerate(rows):
                start = (k * self.batch_size + row) * T
                valid = min(T, n - 1 - start)
                if valid > 0:
                    if self.vocab_size is not None:
                        check_token_ids(self.tokens_N[start:start + valid + 1], self.vocab_size, self.source,
                                        offset=start, fix=DAMAGED_FILE_FIX)
                    inputs_BT[r, :valid] = self.tokens_N[start:start + valid]
                    targets_BT[r, :valid] = self.tokens_N[start + 1:start + 1 + valid]
                    mask_BT[r, :valid] = 1
            yield {"inputs": inputs_BT, "targets": targets_BT, "mask": mask_BT,
                   **_resets(inputs_BT, self.reset_id, mask_BT)}
