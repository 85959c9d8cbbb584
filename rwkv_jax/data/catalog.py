"""TFDS catalog datasets by name (`tiny_shakespeare`, `lm1b`, `pg19`, `c4/en`, ...)."""

import importlib

from absl import logging

import tensorflow_datasets as tfds

_OFFLINE_HINT = ("If this machine is offline, use local text instead: config.data.source='text' "
                 "with config.data.text_files='path/to/files' (or source='stdlib').")


def build_catalog(name: str, *, data_dir: str):
    """Downloads and prepares catalog dataset `name` as array_record (once), or a clear error."""
    try:
        importlib.import_module("tensorflow_datasets.text")  # Registers c4 & co. (tfds imports it lazily).
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"Unknown TFDS dataset {name!r} (config.data.tfds_name): {str(e).splitlines()[0]} "
                         "See https://www.tensorflow.org/datasets/catalog. " + _OFFLINE_HINT) from e
    if builder.is_prepared():
        logging.info("Reusing TFDS dataset %s in %s.", builder.info.full_name, builder.data_dir)
        return builder
    logging.info("Downloading and preparing TFDS dataset %s into %s.", name, data_dir)
    try:
        builder.download_and_prepare()
    except Exception as e:  # Downloads fail in many ways (DNS, HTTP, checksums, missing deps).
        raise RuntimeError(f"Could not download or prepare TFDS dataset {name!r} "
                           f"({type(e).__name__}: {str(e)[:300]}). {_OFFLINE_HINT}") from e
    return builder


_TEXT_KEYS = ("text", "book_text", "content")  # lm1b, c4, tiny_shakespeare; pg19; others.


def text_key(builder, key: str = "") -> str:
    """The feature holding the document text: `key`, else a usual name, else the only Text feature."""
    features = builder.info.features
    names = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
    if key:
        if key not in names:
            raise ValueError(f"config.data.tfds_text_key={key!r} is not a text feature of "
                             f"{builder.info.full_name}; text features: {names}.")
        return key
    for usual in _TEXT_KEYS:
        if usual in names:
            return usual
    if len(names) == 1:
        return names[0]
    raise ValueError(f"{builder.info.full_name} has text features {names}: choose one with "
                     "config.data.tfds_text_key.")


def num_examples(builder, split: str) -> int:
    """Documents in `split` (TFDS slicing like 'train[:90%]' allowed), or a clear error."""
    try:
        return builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
        raise ValueError(f"{builder.info.full_name} has no split {split!r}; its splits are "
                         f"{sorted(builder.info.splits)} (config.data.train_split / eval_split).") from e
