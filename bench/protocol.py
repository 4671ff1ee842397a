"""The quality protocol's calibration of SmolLM2-135M (c4_calib.txt, 128 windows of 512 tokens, seed 0) and the
diagonal Fisher of its linears' outputs from the first 16 windows, drawn as the measurement draws them: where the
benchmarks that look inside the measurement start."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from bitsmith.calibration.adapter import BlockRunner
from bitsmith.calibration.fisher import output_fisher
from bitsmith.formats.source import ModelSource, open_source
from bitsmith.pipeline import calibration_windows, compute, linear_shapes
from bitsmith.plan import QuantizeOptions

TEXT = Path(__file__).resolve().parents[2] / "shared" / "assets" / "text"


@dataclass
class Calibrated:
    source: ModelSource
    opts: QuantizeOptions
    runner: BlockRunner
    windows: torch.Tensor               # [128, 512] token ids
    fisher: dict[str, torch.Tensor]     # F_o of every decoder linear


def calibrated_smollm2(with_fisher: bool = True, as_measured: bool = False) -> Calibrated:
    """The protocol's windows and Fisher (none, an empty dict, without `with_fisher`), its passes in fp32 or, with
    `as_measured`, in the measurement's precision (pipeline.compute: bf16 autocast)."""
    source = open_source("smollm2-135m")
    opts = QuantizeOptions(calib=[str(TEXT / "c4_calib.txt")], nsamples=128, seqlen=512, seed=0)
    opts.validate()
    runner = BlockRunner(source.config)
    windows, _ = calibration_windows(source, source.tokenizer(), opts, progress=False)
    fisher = {}
    if with_fisher:
        fisher, _ = output_fisher(runner, source, windows[:opts.fisher_samples], list(linear_shapes(runner)),
                                  autocast=(lambda: compute(opts)) if as_measured else contextlib.nullcontext)
    return Calibrated(source, opts, runner, windows, fisher)
