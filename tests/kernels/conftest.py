"""Kernel tests run Triton through its CPU interpreter: the variable must be set before triton is imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every torch.empty during the test comes back filled with NaN (floats) or the most negative value
    (integers), so an output element a kernel forgets to write is caught."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).min)

    monkeypatch.setattr(torch, "empty", poisoned)
