"""Documents to evaluate: token ids after an implicit start token, with the UTF-8 size of their text
(for bits per byte). `rwkv_jax.data.eval_documents` builds them for a spec; the scoring is in
rwkv_jax.infer.evaluation."""

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np

from rwkv_jax.model import check_token_ids


@dataclasses.dataclass
class Document:
    """Tokens to score, after an implicit start token. `score_from` > 0 marks the first tokens as
    context only (LAMBADA); `num_bytes` is the UTF-8 size of the scored text (for bits per byte)."""
    tokens: np.ndarray
    num_bytes: int = 0
    score_from: int = 0


def documents_from_texts(texts: Iterable[str], tokenizer, *, eval_len: int = 0, max_docs: int = 0
                         ) -> Iterator[Document]:
    """Tokenized documents (the first `eval_len` tokens of each when > 0); empty ones are skipped."""
    _check_limits(eval_len, max_docs)
    n = 0
    for text in texts:
        if max_docs and n >= max_docs:
            return
        ids = tokenizer.encode(text)
        if eval_len:
            ids = ids[:eval_len]
        if not ids:
            continue
        n += 1
        yield Document(np.asarray(ids, np.int32), len(tokenizer.decode(ids).encode("utf-8")))


def documents_from_tokens(seqs: Iterable[np.ndarray], tokenizer=None, *, eval_len: int = 0, max_docs: int = 0,
                          vocab_size: int = 0, source: str = "a token sequence") -> Iterator[Document]:
    """Documents from token sequences (binidx); bytes from the tokenizer's decoding when given. With
    `vocab_size`, an id outside it raises a ValueError naming `source` and the sequence."""
    _check_limits(eval_len, max_docs)
    n = 0
    for i, seq in enumerate(seqs):
        if max_docs and n >= max_docs:
            return
        ids = np.asarray(seq[:eval_len] if eval_len else seq)
        if not len(ids):
            continue
        if vocab_size:
            check_token_ids(ids, vocab_size, f"{source}, sequence {i}",
                            fix="it was not written with this model's tokenizer")
        ids = ids.astype(np.int32)
        n += 1
        num_bytes = len(tokenizer.decode(ids.tolist()).encode("utf-8")) if tokenizer is not None else 0
        yield Document(ids, num_bytes)


def _check_limits(eval_len: int, max_docs: int) -> None:
    if eval_len < 0 or max_docs < 0:
        raise ValueError(f"eval_len and max_docs must be >= 0 (0: no limit), got {eval_len} and {max_docs}")
