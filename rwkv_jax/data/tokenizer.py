"""Tokenizers behind one interface (`Tokenizer`, tokenizer_base.py): sentencepiece (trained here), HF
`tokenizers` JSON and the RWKV World vocabulary (world_tokenizer.py)."""

import io
import os
import time
from collections.abc import Iterable

import sentencepiece as spm
import tokenizers
from absl import logging

from rwkv_jax.data.tokenizer_base import Tokenizer
from rwkv_jax.data.world_tokenizer import WorldTokenizer

TOKENIZERS = ("sentencepiece", "hf_json", "rwkv_world")  # data.tokenizer: the kinds of tokenizer file
SP_MODEL_TYPES = ("bpe", "unigram")       # data.sp_model_type

_EOT_TOKENS = ("<|endoftext|>", "</s>", "<eos>")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model; `eot_id` is its `</s>` (id 0 for models trained here)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece model {path!r} not found (config.data.tokenizer_path).")
        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:  # sentencepiece: "Internal: ... ParseFromArray" and the like
            raise ValueError(f"SentencePiece model {path!r} cannot be read ({_first_line(e)}): it is not a "
                             "sentencepiece .model file, or it is damaged") from e
        self.vocab_size = self._sp.get_piece_size()
        self.eot_id = self._sp.eos_id()
        if self.eot_id < 0:
            raise ValueError(f"SentencePiece model {path!r} has no end-of-text (eos) piece.")
        self._threads = os.cpu_count() or 1

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=self._threads)


class HFJsonTokenizer(Tokenizer):
    """A HF `tokenizers` JSON file, e.g. GPT-NeoX-20B (`<|endoftext|>` = 0, 50277 tokens)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Tokenizer JSON {path!r} not found (config.data.tokenizer_path).")
        self.path = path
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - the Rust bindings raise plain Exception
            raise ValueError(f"Tokenizer JSON {path!r} cannot be read ({_first_line(e)}): it is not a HF "
                             "`tokenizers` file, or it is damaged") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = [self._tok.token_to_id(t) for t in _EOT_TOKENS]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise ValueError(f"Tokenizer {path!r} has none of the end-of-text tokens {_EOT_TOKENS}.")
        self.eot_id = ids[0]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]


def train_sentencepiece(texts: Iterable[str], path: str, *, vocab_size: int, model_type: str = "bpe",
                        input_sentence_size: int = 300_000, process_index: int = 0,
                        wait_timeout_s: float = 1800.0) -> SentencePieceTokenizer:
    """Trains a sentencepiece model on the lines of `texts` into `path`, or reuses `path`.

    Lossless for any text: identity normalization, whitespace kept (runs of spaces become
    pieces, '\\n' is one piece) and unknown characters fall back to bytes. `vocab_size` is an
    upper bound on small corpora. Multi-host: process 0 trains and renames the file into
    place atomically; the other processes wait for it (`path` must be on a shared filesystem).
    """
    if os.path.isdir(path):
        raise IsADirectoryError(f"config.data.tokenizer_path {path!r} is a directory: give the path of the "
                                "sentencepiece .model file to write or reuse")
    if os.path.isfile(path):
        logging.info("Reusing sentencepiece model %s.", path)
        return SentencePieceTokenizer(path)
    if process_index != 0:
        return _wait_for(path, process_index, wait_timeout_s)
    if model_type not in SP_MODEL_TYPES:
        raise ValueError(f"config.data.sp_model_type must be one of {list(SP_MODEL_TYPES)}, not {model_type!r}.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_prefix = f"{path}.tmp-{os.getpid()}"
    logging.info("Training a %s sentencepiece model (vocab %d) into %s.", model_type, vocab_size, path)
    start = time.time()
    # The model is taken from memory: no .vocab file is written, and with it goes sentencepiece's warning
    # that pieces such as '\n' "break the format" of that (human-readable, unused) file.
    model = io.BytesIO()
    stats = {"lines": 0, "long": 0}
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts, cap=10 * input_sentence_size, stats=stats),
            model_writer=model, vocab_size=vocab_size, model_type=model_type, hard_vocab_limit=False,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True, character_coverage=0.9995,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, byte_fallback=True,
            max_sentence_length=_MAX_LINE_BYTES, user_defined_symbols=["\n"], eos_id=0, unk_id=1, bos_id=-1,
            pad_id=-1, num_threads=os.cpu_count() or 1, minloglevel=1)
    except RuntimeError as e:  # sentencepiece reports bad input as "Internal: ..." RuntimeErrors
        raise ValueError(
            f"sentencepiece could not train a tokenizer for {path!r} on the training text "
            f"({stats['lines']} lines, {stats['long']} of them cut to {_MAX_LINE_BYTES} bytes): "
            f"{_first_line(e)}. Check config.data.text_files: too little usable text (nearly empty, or binary "
            "files), or more distinct characters than config.data.sp_vocab_size allows") from e
    with open(f"{tmp_prefix}.model", "wb") as f:
        f.write(model.getvalue())
    os.replace(f"{tmp_prefix}.model", path)
    logging.info("Trained sentencepiece in %.1fs.", time.time() - start)
    return SentencePieceTokenizer(path)


def load_tokenizer(kind: str, path: str) -> Tokenizer:
    """An existing tokenizer file of `kind` (one of TOKENIZERS)."""
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    if kind == "hf_json":
        return HFJsonTokenizer(path)
    if kind == "rwkv_world":
        return WorldTokenizer(path)
    raise ValueError(f"config.data.tokenizer must be one of {list(TOKENIZERS)}, not {kind!r}.")


def kind_of_file(path: str) -> str:
    """'hf_json' for a .json file (HF tokenizers), 'rwkv_world' for a .txt vocabulary (the RWKV World
    tokenizer's rwkv_vocab_v20230424.txt), else 'sentencepiece' (a .model file)."""
    name = str(path)
    return "hf_json" if name.endswith(".json") else "rwkv_world" if name.endswith(".txt") else "sentencepiece"


def load_tokenizer_file(path: str) -> Tokenizer:
    """An existing tokenizer file, its kind from the name: .json (HF tokenizers) or .model (sentencepiece)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"tokenizer {path} is a directory: give the tokenizer file in it (e.g. "
                                f"{os.path.join(path, 'tokenizer.json')})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {path} not found")
    return load_tokenizer(kind_of_file(path), str(path))


def check_fits(tokenizer: Tokenizer, model_vocab_size: int, fix: str | None = None) -> None:
    """Raises when the tokenizer's ids could exceed the model's embedding table: before training (`fix`
    None: the config values to change), or with a model read from a checkpoint (`fix`: what to do)."""
    if tokenizer.vocab_size <= model_vocab_size:
        return
    if fix is None:
        raise ValueError(
            f"Tokenizer {tokenizer.path!r} has {tokenizer.vocab_size} tokens but the model vocab size is "
            f"{model_vocab_size}: set config.model.vocab_size >= {tokenizer.vocab_size}, or use a smaller "
            f"tokenizer (config.data.sp_vocab_size <= {model_vocab_size} for sentencepiece).")
    raise ValueError(f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's "
                     f"vocabulary has {model_vocab_size}: {fix}")


# sentencepiece skips longer training lines (a corpus of one huge line would leave it nothing): we cut them.
_MAX_LINE_BYTES = 4192


def _lines(texts: Iterable[str], cap: int, stats: dict | None = None):
    """Non-blank lines of `texts`, at most `cap`, each cut into pieces of at most _MAX_LINE_BYTES bytes."""
    stats = {"lines": 0, "long": 0} if stats is None else stats
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            pieces = [line]
            if len(line.encode("utf-8")) > _MAX_LINE_BYTES:
                stats["long"] += 1
                # A character is at most 4 bytes: pieces of _MAX_LINE_BYTES // 4 characters always fit.
                step = _MAX_LINE_BYTES // 4
                pieces = [line[i:i + step] for i in range(0, len(line), step)]
            for piece in pieces:
                yield piece
                stats["lines"] += 1
                if stats["lines"] >= cap:
                    return


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _wait_for(path: str, process_index: int, timeout_s: float) -> SentencePieceTokenizer:
    logging.info("Process %d waits for process 0 to train %s.", process_index, path)
    deadline = time.monotonic() + timeout_s
    while not os.path.isfile(path):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"Process {process_index} waited {timeout_s:.0f}s for process 0 to write the sentencepiece "
                f"model {path!r}. Put config.data.data_dir on a filesystem shared by all hosts, or copy "
                "a trained model there (config.data.tokenizer_path).")
        time.sleep(0.5)
    return SentencePieceTokenizer(path)
