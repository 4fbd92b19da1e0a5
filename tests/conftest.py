"""Shared fixtures. Models load once per test session: loading MiniLM takes seconds, encoding a sentence ms."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from knowmap.embedder import Embedder

# No model hub is reachable here: never let a loader try (and wait on retries).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """The packaged all-MiniLM-L6-v2, loaded by local path once for the whole session."""
    from knowmap.embedder import Embedder

    return Embedder()
