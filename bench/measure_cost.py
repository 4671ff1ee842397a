"""Where the measurement's time goes: CPU seconds of GPTQ per technique of the menu (bitsmith/measure.py
`sampled_losses`, 128 sampled rows, as `measure` runs it) on every decoder linear of SmolLM2-135M blocks 0, 15
and 29, the block's Hessian pass over the measurement's 64 windows, and the Fisher pass with the drawing of the
windows; the uniform grids stacked as the measurement runs them, and apart the symmetric grids and the candidates
measured only without codebooks on the menu (2-bit outliers and per-input-channel grids, 4-bit tables), which the
full menu measured until 2026-12-07.
Against it, how often the plans in bench/results chose each technique (every run of bench/plan.py stored there).

    python bench/measure_cost.py          # one thread; writes bench/results/measure-cost.{json,md}
"""
from __future__ import annotations

import collections
import datetime
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import cpu_label
from protocol import calibrated_smollm2

from bitsmith import measure
from bitsmith.formats.packing import GPTQ_BITS
from bitsmith.measure import MEASURE_WINDOWS, sampled_losses
from bitsmith.pipeline import collect_hessians
from bitsmith.plan import TECHNIQUES, LayerPlan, QuantizeOptions
from bitsmith.quantize.gptq import GridConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BLOCKS = (0, 15, 29)


def families() -> dict[str, dict]:
    """sampled_losses' keyword arguments per family of the candidates the full menu measures, and apart the
    symmetric grids and the candidates measured only without codebooks (`BESIDE_CODEBOOKS`)."""
    measured = measure.measured_candidates(TECHNIQUES)
    as_grid = lambda cs: [GridConfig(c.bits, c.group_size, c.sym, c.outliers) for c in cs]
    kwargs = lambda cs: {"configs": as_grid([c for c in cs if c.technique in ("uniform", "wide", "outliers")]),
                         "lut_bits": [c.bits for c in cs if c.lut],
                         "per_ic": [GridConfig(c.bits, c.group_size, c.sym, per_ic=True) for c in cs if c.per_ic],
                         "vq": [c for c in cs if c.vq], "column_bits": [c for c in cs if c.column_bits]}
    return {
        "grids, asymmetric": kwargs([c for c in measured if c.technique in ("uniform", "wide")]),
        "grids, symmetric": kwargs([LayerPlan(b, g, True) for b in GPTQ_BITS for g in (32, 64, 128, -1)]),
        **{name: kwargs([c for c in measured if c.technique == technique])
           for name, technique in (("outliers", "outliers"), ("lut", "lut"), ("per-ic", "per-ic"), ("vq", "vq"),
                                   ("column-bits", "column-bits"))},
        "beside codebooks": kwargs(sorted(measure.BESIDE_CODEBOOKS, key=measure.CANDIDATES.index)),
    }


def picked() -> tuple[dict[str, int], int]:
    """Linears given each family over every stored plan run, and how many of the plans whose menu had codebooks of
    pairs chose a candidate measured only without them."""
    counts, beside = collections.Counter(), 0
    left_out = {(c.bits, c.group_size, c.outliers, c.lut, c.per_ic) for c in measure.BESIDE_CODEBOOKS}
    for path in RESULTS.glob("plan-smollm2*/*.json"):
        result = json.loads(path.read_text())
        for entry in (result.get("plan") or {}).values():
            key = (entry["bits"], entry["group_size"], entry.get("outliers", 0.0), entry.get("lut", False),
                   entry.get("per_ic", False))
            kind = ("vq" if entry.get("vq") else "column-bits" if entry.get("column_bits")
                    else "grids, symmetric" if entry.get("sym") else "beside codebooks" if key in left_out
                    else "per-ic" if entry.get("per_ic") else "lut" if entry.get("lut")
                    else "outliers" if entry.get("outliers") else "grids, asymmetric")
            counts[kind] += 1
            beside += kind == "beside codebooks" and "vq" in (result.get("menu") or "")
    return dict(counts), beside


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    start = time.process_time()
    cal = calibrated_smollm2(as_measured=True)
    fisher_seconds = time.process_time() - start                          # with the drawing of the windows
    source, opts, runner, windows, fisher = cal.source, cal.opts, cal.runner, cal.windows, cal.fisher
    family = runner.family
    hidden = F.embedding(windows[:MEASURE_WINDOWS], source.get(family.embed).to(torch.float32))
    seconds, hessian_seconds, kinds = collections.defaultdict(float), 0.0, families()
    for i in range(max(BLOCKS) + 1):
        block = runner.build_block(i, {n: source.get(n) for n in runner.block_names(i)})
        start = time.process_time()
        hessians = collect_hessians(runner, block, hidden, runner.position_embeddings(hidden[:1]), opts,
                                    family.siblings, in_place=True)
        if i not in BLOCKS:
            continue
        hessian_seconds += time.process_time() - start
        prefix = family.block_prefix.format(i=i)
        for group in family.siblings:
            for name in group:
                W = block.get_submodule(name).weight.data.to(torch.float32)
                for kind, kwargs in kinds.items():
                    start = time.process_time()
                    sampled_losses(W, hessians[group].H, fisher[prefix + name], opts=opts, **kwargs)
                    seconds[kind] += time.process_time() - start
    rows = [{"family": kind, "candidates": sum(map(len, kwargs.values())),
             "cpu_s_per_block": seconds[kind] / len(BLOCKS)} for kind, kwargs in kinds.items()]
    result = {"date": datetime.date.today().isoformat(), "cpu": cpu_label(), "blocks": list(BLOCKS),
              "fisher_cpu_s": fisher_seconds,
              "hessian_cpu_s_per_block": hessian_seconds / len(BLOCKS), "families": rows}
    result["picked"], result["beside_codebooks_with_codebooks"] = picked()
    (RESULTS / "measure-cost.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "measure-cost.md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    chosen = sum(r["picked"].values())
    lines = ["# Measurement cost per technique: SmolLM2-135M", "",
             (f"Measured {r['date']} on {r['cpu']}, one torch thread (`python bench/measure_cost.py`): CPU seconds "
              f"per block, the mean over blocks {', '.join(map(str, r['blocks']))}, of `sampled_losses` on the "
              "block's 7 linears (128 sampled rows each, as the measurement runs it), calibration as the quality "
              "protocol (c4_calib.txt, 128 x 512, seed 0; Hessians from the first 64 windows). The last column: "
              f"how many of the {chosen:,} linears of the stored plan runs (bench/results/plan-smollm2*) each family "
              "was given."), "",
             (f"The Fisher pass ({QuantizeOptions.fisher_samples} windows, with drawing the windows): "
              f"{r['fisher_cpu_s']:.0f} CPU s; the "
              f"block's Hessian pass: {r['hessian_cpu_s_per_block']:.2f} CPU s per block."), "",
             "| family | candidates | CPU s per block | linears given it |", "|---|---|---|---|"]
    for row in r["families"]:
        count = r["picked"].get(row["family"], 0)
        lines.append(f"| {row['family']} | {row['candidates']} | {row['cpu_s_per_block']:.2f} | {count:,} |")
    lines += ["", (f"Of the plans whose menu had codebooks of pairs, {r['beside_codebooks_with_codebooks']} linears "
                   "were given a candidate that the measurement now takes only without codebooks on the menu "
                   "(`BESIDE_CODEBOOKS`, bitsmith/measure.py).")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
