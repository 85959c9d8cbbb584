"""TFDS datasets of local text: the embedded stdlib corpus and any user files.

Both are `GeneratorBasedBuilder`s writing array_record files (readable with grain, no
TensorFlow). The builder config name is a fingerprint of the inputs, so a dataset is built
once into the data directory and reused until its files or split options change.
"""

import tensorflow_datasets as tfds
from absl import logging

from rwkv_jax.data import text_files
from rwkv_jax.io import logs

TEXT_SPLITS = ("hash", "all")  # data.text_split: train/validation by a hash of the path, or train only

class _TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Documents {'key', 'text'} split 'hash' (train/validation by key hash) or 'all' (train)."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, files: list[text_files.SourceFile], config_name: str,
                 text_split: str, validation_fraction: float, data_dir: str):
        if text_split not in TEXT_SPLITS:
            raise ValueError(f"config.data.text_split must be one of {list(TEXT_SPLITS)}, not {text_split!r}.")
        self._files = files
        self._text_split = text_split
        self._validation_fraction = validation_fraction
        super().__init__(data_dir=data_dir, config=tfds.core.BuilderConfig(name=config_name),
                         file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Text documents: one per file, or per line of a .jsonl file.",
            features=tfds.features.FeaturesDict({"key": tfds.features.Text(), "text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        del dl_manager
        splits = ["train"] if self._text_split == "all" else ["train", "validation"]
        return {s: self._generate_examples(s) for s in splits}

    def _generate_examples(self, split: str):
        stats = text_files.ReadStats()
        for f in self._files:
            for key, text in text_files.read_documents(f, stats):
                if self._text_split == "all" or text_files.split_of(key, self._validation_fraction) == split:
                    yield key, {"key": key, "text": text}
        logging.info("%s %s: read %d files, %d documents in all splits, %d empty skipped, "
                     "%d non-UTF-8 bytes replaced by U+FFFD in %d files.", self.name, split,
                     len(self._files), stats.documents, stats.empty, stats.invalid_bytes,
                     stats.files_with_invalid_bytes)
        if stats.invalid_bytes:
            logging.warning("%s: %d bytes that are not UTF-8 were replaced (%d files).", self.name,
                            stats.invalid_bytes, stats.files_with_invalid_bytes)


class StdlibText(_TextBuilder):
    """The `.py` files of the running interpreter's standard library (no tests, no site-packages)."""


class LocalText(_TextBuilder):
    """User text files: `.txt`, `.md`, `.py` and `.jsonl` (one document per line, `text` field)."""


def build_stdlib(*, data_dir: str, validation_fraction: float, root: str = "") -> StdlibText:
    """Builds the stdlib corpus (once) and returns its prepared builder."""
    files = text_files.stdlib_files(root)
    fp = text_files.fingerprint(files, "hash", validation_fraction)
    return _prepare(lambda: StdlibText(files=files, config_name=f"hash_{fp}", text_split="hash",
                                       validation_fraction=validation_fraction, data_dir=data_dir))


def build_local_text(*, spec: str, data_dir: str, text_split: str, validation_fraction: float) -> LocalText:
    """Builds a dataset from `config.data.text_files` (once) and returns its prepared builder."""
    files = text_files.find_text_files(spec)
    fp = text_files.fingerprint(files, text_split, validation_fraction)
    return _prepare(lambda: LocalText(files=files, config_name=f"{text_split}_{fp}", text_split=text_split,
                                      validation_fraction=validation_fraction, data_dir=data_dir))


def _prepare(make_builder) -> _TextBuilder:
    """Reuses the dataset on disk, or builds it (then another process may have built it first)."""
    builder = make_builder()
    if builder.is_prepared():
        logging.info("Reusing dataset %s in %s.", builder.info.full_name, builder.data_dir)
        return builder
    print(f"building dataset {builder.info.full_name} into {builder.data_dir} (once: later runs reuse it)",
          flush=True)
    try:
        with logs.third_party_output("tensorflow_datasets"):
            builder.download_and_prepare()
    except AssertionError as e:  # tfds cannot write a split without examples.
        if "No examples were yielded" not in str(e):
            raise
        raise ValueError(f"{builder.name}: {e} The corpus or one of its splits is empty: add text, change "
                         "config.data.validation_fraction, or set config.data.text_split='all'.") from e
    except OSError:  # Renaming into place fails when a process sharing data_dir finished first.
        builder = make_builder()
        if not builder.is_prepared():
            raise
    return builder
