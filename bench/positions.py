"""Where in its evaluation windows a quantized model loses: the loss increase over the unquantized model (nats per
token) by position in windows of 2048 tokens of WikiText-2 test (the quality protocol's windows; the first N of
them). Calibration windows are 512 tokens long: positions past 512 are ones no calibration window reaches.

    python bench/positions.py OUT [OUT ...] [--windows 8] [--json FILE]

OUT: quantized model folders (bitsmith quantize -o OUT); one torch thread is enough (8 windows: ~2 minutes a model).
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from plan import TEXT

from bitsmith.api import load
from bitsmith.calibration import data
from bitsmith.formats.source import open_source
from bitsmith.kernels.linear import cache_dequantized

BASE = "smollm2-135m"
SEQLEN = 2048
EDGES = (0, 128, 512, 1024, SEQLEN - 1)      # position ranges of the predicted tokens


@torch.no_grad()
def token_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """Summed NLL of each predicted position over `windows` [n, seqlen]: [seqlen - 1]."""
    total = torch.zeros(windows.shape[1] - 1)
    for ids in windows:
        logp = F.log_softmax(model(input_ids=ids[None]).logits[0, :-1].float(), -1)
        total -= logp.gather(1, ids[1:, None])[:, 0]
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    ids = data.tokenize(open_source(BASE).tokenizer(), data.read_text([str(TEXT / "wikitext2_test.txt")]))
    windows = data.eval_windows(ids, SEQLEN, args.windows * SEQLEN)
    base = token_nll(load(BASE), windows) / len(windows)
    ranges = list(itertools.pairwise(EDGES))
    results = {"windows": len(windows), "seqlen": SEQLEN,
               "base_nll": {f"{a}-{b}": base[a:b].mean().item() for a, b in ranges}, "models": {}}
    print("| model | " + " | ".join(f"positions {a}-{b}" for a, b in ranges) + " | all |")
    print("|---|" + "---|" * (len(ranges) + 1))
    for path in args.models:
        net = load(str(path))
        cache_dequantized(net)
        increase = token_nll(net, windows) / len(windows) - base
        row = {f"{a}-{b}": increase[a:b].mean().item() for a, b in ranges} | {"all": increase.mean().item()}
        results["models"][str(path)] = row
        print(f"| {path.name} | " + " | ".join(f"{v:.4f}" for v in row.values()) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
