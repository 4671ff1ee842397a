"""Spread of GPTQ W3 g128 perplexity on SmolLM2-135M over calibration seeds, min-max against mse grids.

    python bench/seed_spread.py --seeds 1 2      # runs `bitsmith quantize` per (seed, grid), one thread each
    python bench/seed_spread.py --report         # rewrites the table from the stored runs

Each run is the CLI job of the quality protocol (128 x 512 C4 windows, WikiText-2 test first 65,536 tokens,
seqlen 2048) with the perplexity measured while quantizing (`--eval-data`, the number `bitsmith eval` gives).
Seed 0 comes from bench/results/quality-smollm2.json (rows gptq-w3-g128 and gptq-mse-w3-g128).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "assets" / "text"
RESULTS = ROOT / "bench" / "results"
RUNS = RESULTS / "seed-spread-smollm2"
GRIDS = {"no-mse": "gptq-w3-g128", "mse": "gptq-mse-w3-g128"}      # CLI flag -> quality bench row of seed 0


def run(seed: int, grid: str) -> None:
    bitsmith = Path(sys.executable).parent / "bitsmith"
    with tempfile.TemporaryDirectory() as work:
        out = RUNS / f"seed{seed}-{grid}.json"
        cmd = [str(bitsmith), "quantize", "smollm2-135m", "-o", f"{work}/out", "--method", "gptq", "--bits", "3",
               "--group-size", "128", "--calib", str(TEXT / "c4_calib.txt"), "--nsamples", "128", "--seqlen", "512",
               "--seed", str(seed), f"--{grid}", "--eval-data", str(TEXT / "wikitext2_test.txt"),
               "--eval-seqlen", "2048", "--eval-max-tokens", "65536", "--json", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    summary = json.loads(out.read_text())
    summary["date"] = datetime.date.today().isoformat()
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(seed, grid, summary["eval"]["perplexity"], flush=True)


def perplexities() -> dict[str, dict[int, tuple[float, str]]]:
    """grid -> seed -> (perplexity, date measured)."""
    rows = {r["config"]: r for r in json.loads((RESULTS / "quality-smollm2.json").read_text())}
    found = {grid: {0: (rows[name]["perplexity"], rows[name]["date"])} for grid, name in GRIDS.items()
             if name in rows}
    for path in sorted(RUNS.glob("seed*.json")):
        seed, grid = path.stem.removeprefix("seed").split("-", 1)
        s = json.loads(path.read_text())
        found.setdefault(grid, {})[int(seed)] = (s["eval"]["perplexity"], s["date"])
    return found


def report() -> str:
    found = perplexities()
    seeds = sorted({s for by_seed in found.values() for s in by_seed})
    dates = sorted({d for by_seed in found.values() for _, d in by_seed.values()})
    lines = ["# Seed spread: SmolLM2-135M GPTQ W3 g128 act-order", "",
             (f"Measured {', '.join(dates)}, `python bench/seed_spread.py`. WikiText-2 test perplexity (first 65,536 "
             "tokens, seqlen 2048) against the calibration seed (128 x 512 C4 windows); one thread per run. "
             "Reference implementation, seed 0: 65.18 (min-max grid)."), "",
             "| grid | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | range |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for grid, by_seed in found.items():
        ppl = [by_seed[s][0] for s in seeds if s in by_seed]
        cells = [f"{by_seed[s][0]:.2f}" if s in by_seed else "-" for s in seeds]
        label = "min-max (GPTQ reference grid)" if grid == "no-mse" else "mse (bitsmith default)"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {statistics.mean(ppl):.2f} | "
                     f"{min(ppl):.2f} - {max(ppl):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--grids", nargs="*", choices=list(GRIDS), default=list(GRIDS))
    ap.add_argument("--report", action="store_true", help="Only rewrite the table from the stored runs.")
    args = ap.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for seed in args.seeds:
            for grid in args.grids:
                run(seed, grid)
    (RESULTS / "seed-spread-smollm2.md").write_text(report())


if __name__ == "__main__":
    main()
