"""TFDS catalog datasets by name (`tiny_shakespeare`, `lm1b`, `pg19`, `c4/en`, ...)."""

import importlib
import os
import socket

import tensorflow_datasets as tfds
from absl import logging

# Where the dataset was named, and what to use instead offline: the training config's or eval.py's flags.
TRAINING = ("config.data.tfds_name", "If this machine is offline, use local text instead: config.data.source='text' "
            "with config.data.text_files='path/to/files' (or source='stdlib').")
EVAL = ("--tfds", "If this machine is offline, evaluate local data instead: --text_files='path/to/files' or "
        "--binidx=PREFIX, or prepare the dataset where there is a network and copy it under --data_dir/tfds.")


def build_catalog(name: str, *, data_dir: str, asked_by=TRAINING):
    """Downloads and prepares catalog dataset `name` as array_record (once), or a clear error naming the
    setting that asked for it (`asked_by`: TRAINING or EVAL) and what to use offline."""
    setting, hint = asked_by
    try:
        importlib.import_module("tensorflow_datasets.text")  # Registers c4 & co. (tfds imports it lazily).
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"Unknown TFDS dataset {name!r} ({setting}): {str(e).splitlines()[0]} "
                         "See https://www.tensorflow.org/datasets/catalog. " + hint) from e
    if builder.is_prepared():
        logging.info("Reusing TFDS dataset %s in %s.", builder.info.full_name, builder.data_dir)
        return builder
    if _offline():  # tfds's downloader would retry every URL for minutes before failing
        raise RuntimeError(f"Could not download TFDS dataset {name!r} ({setting}): it is not prepared in {data_dir} "
                           f"and this machine resolves no host name (no network?). {hint}")
    logging.info("Downloading and preparing TFDS dataset %s into %s.", name, data_dir)
    try:
        builder.download_and_prepare()
    except Exception as e:  # Downloads fail in many ways (DNS, HTTP, checksums, missing deps).
        raise RuntimeError(f"Could not download or prepare TFDS dataset {name!r} ({setting}) "
                           f"({type(e).__name__}: {str(e)[:300]}). {hint}") from e
    return builder


def _offline() -> bool:
    """No proxy configured and not one of the hosts TFDS downloads from resolves: a DNS lookup fails at
    once where the downloader backs off for minutes per URL."""
    if any(os.environ.get(key) for key in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                           "all_proxy")):
        return False
    for host in ("storage.googleapis.com", "raw.githubusercontent.com", "huggingface.co"):
        try:
            socket.getaddrinfo(host, 443)
            return False
        except OSError:
            continue
    return True


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
