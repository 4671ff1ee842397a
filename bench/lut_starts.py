"""Lookup tables from one start or four (quantize/lut.py `weighted_kmeans`): GPTQ's loss with the tables of 2, 3
and 4 bits on every decoder linear of SmolLM2-135M blocks 5 and 20, the tables fitted by Lloyd's steps from the
equal-mass quantiles alone (the start before) or from all four starts, best per row. Hessians from the
measurement's 64 calibration windows of the quality protocol; act-order as the measurement runs GPTQ.

    python bench/lut_starts.py          # one thread; writes bench/results/lut-starts.{json,md}
"""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import cpu_label
from protocol import calibrated_smollm2

from bitsmith.measure import MEASURE_WINDOWS
from bitsmith.pipeline import collect_hessians
from bitsmith.quantize import lut

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
BLOCKS = (5, 20)
BITS = (2, 3, 4)


def equal_mass_tables(W: torch.Tensor, H: torch.Tensor, bits: int) -> torch.Tensor:
    """The tables of Lloyd's steps from the equal-mass quantiles alone (the first of `lut.starts`)."""
    W = W.to(torch.float32)
    weight = torch.diag(H).to(torch.float32).clamp(min=0).expand_as(W) + 1e-12
    order = torch.argsort(W, dim=1)
    sorted_w = W.gather(1, order)
    start = lut.starts(sorted_w, weight.gather(1, order), 1 << bits)[0]
    return lut.lloyd(W, weight, sorted_w, order, start, lut.KMEANS_ITERS).to(torch.float16)


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    cal = calibrated_smollm2(with_fisher=False)
    runner, family = cal.runner, cal.runner.family
    hidden = F.embedding(cal.windows[:MEASURE_WINDOWS], cal.source.get(family.embed).to(torch.float32))
    rows, four_starts = [], lut.lut_tables
    for i in range(max(BLOCKS) + 1):
        block = runner.build_block(i, {n: cal.source.get(n) for n in runner.block_names(i)})
        hessians = collect_hessians(runner, block, hidden, runner.position_embeddings(hidden[:1]), cal.opts,
                                    family.siblings, in_place=True)
        if i not in BLOCKS:
            continue
        for group in family.siblings:
            for name in group:
                W, H = block.get_submodule(name).weight.data.to(torch.float32), hessians[group].H
                row = {"block": i, "linear": name}
                for label, tables in (("one", equal_mass_tables), ("four", four_starts)):
                    lut.lut_tables = tables
                    start = time.process_time()
                    _, losses = lut.gptq_lut_configs(W, H, list(BITS), act_order=True, damp=cal.opts.damp,
                                                     keep=False)
                    row[f"{label}_cpu_s"] = time.process_time() - start
                    row[label] = losses.sum(dim=1).tolist()
                lut.lut_tables = four_starts
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"date": datetime.date.today().isoformat(), "cpu": cpu_label(), "bits": list(BITS), "rows": rows}
    (RESULTS / "lut-starts.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "lut-starts.md").write_text(report(result))


def report(r: dict) -> str:
    lines = ["# Lookup tables from one start or four: SmolLM2-135M", "",
             (f"Measured {r['date']} on {r['cpu']}, one torch thread (`python bench/lut_starts.py`): GPTQ's loss "
              "(act-order, Hessians from the protocol's first 64 windows) with per-row tables of each bit width, "
              "fitted by weighted k-means from the equal-mass quantiles alone (one) or from the four starts of "
              "quantize/lut.py, best per row (four); the change in loss, and the CPU seconds of the three widths "
              "together."), "",
             "| block | linear | " + " | ".join(f"{b} bits" for b in r["bits"]) + " | CPU s, one / four |",
             "|---|---|" + "---|" * len(r["bits"]) + "---|"]
    for row in r["rows"]:
        change = [f"{100 * (f / o - 1):+.1f} %" for o, f in zip(row["one"], row["four"])]
        lines.append(f"| {row['block']} | {row['linear']} | " + " | ".join(change)
                     + f" | {row['one_cpu_s']:.2f} / {row['four_cpu_s']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
