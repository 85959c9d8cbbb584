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
