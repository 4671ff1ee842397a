"""Shared fixtures: the real model and texts beside the repository (skipped with a reason when absent)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
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


@pytest.fixture(scope="session")
def stories_split(tmp_path_factory, text_dir):
    """TinyStories text cut in two: calibrate on the first 70 %, evaluate on the rest (never on the same text)."""
    text = (text_dir / "tinystories_calib.txt").read_text()
    cut = text.index("\n", int(len(text) * 0.7))
    d = tmp_path_factory.mktemp("text")
    (d / "calib.txt").write_text(text[:cut])
    (d / "eval.txt").write_text(text[cut:])
    return d / "calib.txt", d / "eval.txt"


@pytest.fixture
def stories_bf16(tmp_path, stories_path):
    """stories260K with its weights cast to BF16 (the asset is fp32), config and tokenizer alongside."""
    folder = tmp_path / "stories-bf16"
    shutil.copytree(stories_path, folder)
    (folder / "model.safetensors").chmod(0o644)
    tensors = load_file(str(stories_path / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()},
              str(folder / "model.safetensors"))
    return folder
