"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BEVT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real videos/images of ../shared/data; tests using it skip when it is absent."""
    if not (SHARED_DATA / "videos").is_dir():
        pytest.skip(f"real test media not found at {SHARED_DATA} (set BEVT_SHARED_DATA)")
    return SHARED_DATA
