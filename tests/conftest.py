"""Shared pytest setup: CPU-only JAX, and the ../shared material beside the checkout."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"development material not found at {SHARED_DIR} (only present in the dev checkout)")
    return SHARED_DIR


@pytest.fixture(scope="module")
def train_env(tmp_path_factory) -> dict:
    """A corpus (this package's source, ~200 KB) and a data dir for the tokenizer and token caches: the
    setup of the tiny training runs (tests.helpers.tiny_overrides), one per test module."""
    from tests.helpers import copy_package_source
    root = tmp_path_factory.mktemp("train")
    return {"root": root, "corpus": copy_package_source(root / "corpus"), "data_dir": root / "data"}
