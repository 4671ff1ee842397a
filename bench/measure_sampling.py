"""How well a sample of rows estimates a linear's measured error: SmolLM2-135M, blocks 0/10/20/29, every
decoder linear, every candidate of the measurement (outliers included), the full GPTQ measurement against the
row samples of bitsmith/measure.py (`sampled_losses`): an equal-strata sample and probability-proportional-to-size
samples of 64, 128 and 256 rows.

    python bench/measure_sampling.py          # one thread; writes bench/results/measure-sampling.{json,md}

Calibration as the quality protocol (c4_calib.txt, 128 x 512, seed 0; Fisher from 16 windows). Reported per
sample size: the relative error of the estimated Fisher-weighted error (median and 95th percentile over
linear x candidate), the mean Spearman correlation between estimated and full errors over the candidates of a
linear, and the time per block.
"""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from protocol import calibrated_smollm2

from bitsmith.measure import CANDIDATES, sampled_losses
from bitsmith.pipeline import collect_hessians, compute, forward_in_place
from bitsmith.quantize.gptq import GridConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BLOCKS = (0, 10, 20, 29)
SAMPLES = ((128, "strata"), (64, "pps"), (128, "pps"), (256, "pps"))      # rows sampled, sampler


def ranks(x: list[float]) -> torch.Tensor:
    return torch.argsort(torch.argsort(torch.tensor(x))).float()


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    cal = calibrated_smollm2()
    source, opts, runner, windows, fisher = cal.source, cal.opts, cal.runner, cal.windows, cal.fisher
    family = runner.family
    configs = [GridConfig(c.bits, c.group_size, c.sym, c.outliers) for c in CANDIDATES if not (c.lut or c.per_ic)]
    hidden = F.embedding(windows, source.get(family.embed).to(torch.float32))
    rows, seconds = [], {n: 0.0 for n in ("full", *SAMPLES)}
    for i in range(max(BLOCKS) + 1):
        block = runner.build_block(i, {n: source.get(n) for n in runner.block_names(i)})
        pos = runner.position_embeddings(hidden[:1])
        if i in BLOCKS:
            hessians = collect_hessians(runner, block, hidden, pos, opts, family.siblings)
            for group in family.siblings:
                for name in group:
                    full_name = family.block_prefix.format(i=i) + name
                    W = block.get_submodule(name).weight.data.float()
                    H, Fo = hessians[group].H, fisher[full_name]
                    got = {}
                    for n in ("full", *SAMPLES):
                        rows_n, sampler = (W.shape[0], "strata") if n == "full" else n
                        t = time.perf_counter()
                        got[n] = sampled_losses(W, H, Fo, configs, opts, rows_n, sampler)[0]
                        seconds[n] += time.perf_counter() - t
                    for n in SAMPLES:
                        rel = [abs(e - f) / f for e, f in zip(got[n], got["full"])]
                        rows.append({"linear": full_name, "rows": n[0], "sampler": n[1], "median_rel": statistics.median(rel),
                                     "max_rel": max(rel), "rel": rel, "spearman": spearman(got[n], got["full"])})
                    print(full_name, [round(r["median_rel"], 4) for r in rows[-len(SAMPLES):]], flush=True)
        with compute(opts):
            forward_in_place(runner, block, hidden, pos, opts.batch)
        runner.release_block(i)
    summary = {}
    for n in SAMPLES:
        mine = [row for row in rows if (row["rows"], row["sampler"]) == n]
        rel = sorted(r for row in mine for r in row["rel"])
        summary[" ".join(map(str, n))] = {"median_rel": statistics.median(rel), "p95_rel": rel[int(0.95 * len(rel))],
                                     "max_rel": rel[-1], "mean_spearman": statistics.mean(r["spearman"] for r in mine),
                                     "s_per_block": seconds[n] / len(BLOCKS)}
    full_s = seconds["full"] / len(BLOCKS)
    when = datetime.date.today().isoformat()
    (RESULTS / "measure-sampling.json").write_text(json.dumps(
        {"date": when, "machine": platform.machine(), "blocks": BLOCKS, "full_s_per_block": full_s,
         "summary": summary, "rows": [{k: v for k, v in r.items() if k != "rel"} for r in rows]}, indent=1) + "\n")
    lines = [f"# Measurement row sampling: SmolLM2-135M, blocks {', '.join(map(str, BLOCKS))}", "",
             (f"Measured {when} on {platform.machine()} (2 cores, one torch thread; the other core may have been "
             "busy). Fisher-weighted GPTQ error of every decoder linear of those blocks under all "
             f"{len(CANDIDATES)} candidates: full measurement against samples of rows."), "",
             ("| rows sampled, sampler | median rel. error | 95th pct | max | mean Spearman over candidates | "
              "s per block |"), "|---|---|---|---|---|---|",
             f"| all | 0 | 0 | 0 | 1 | {full_s:.1f} |"]
    lines += [f"| {n} | {s['median_rel']:.4f} | {s['p95_rel']:.4f} | {s['max_rel']:.4f} | {s['mean_spearman']:.4f} | "
              f"{s['s_per_block']:.1f} |" for n, s in summary.items()]
    (RESULTS / "measure-sampling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
