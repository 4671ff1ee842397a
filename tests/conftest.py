"""Shared fixtures: the real model and texts beside the repository (skipped with a reason when absent)."""
from __future__ import annotations

from pathlib import Path

import pytest
from tests_support import ASSETS

STORIES = ASSETS / "models" / "stories260K"
TEXT = ASSETS / "text"


@pytest.fixture(scope="session")
def stories_path() -> Path:
    if not STORIES.exists():
        pytest.skip(f"stories260K not found at {STORIES}")
    return STORIES


@pytest.fixture(scope="session")
def text_dir() -> Path:
    if not TEXT.exists():
        pytest.skip(f"calibration texts not found at {TEXT}")
    return TEXT
