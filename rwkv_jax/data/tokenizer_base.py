"""The interface every tokenizer offers (encode, encode_batch, decode, vocab_size, eot_id, path,
fingerprint), in a module of its own so that each kind of tokenizer can implement it without importing
the others."""

import abc
import hashlib


class Tokenizer(abc.ABC):
    """Text <-> token ids. `eot_id` separates documents in the token stream."""

    path: str
    vocab_size: int
    eot_id: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of `ids`."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts (implementations encode them in parallel)."""
        return [self.encode(t) for t in texts]

    @property
    def fingerprint(self) -> str:
        """Short hash of the tokenizer file: keys token caches to the exact tokenizer."""
        with open(self.path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:12]
