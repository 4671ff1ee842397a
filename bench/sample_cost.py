"""What sampling calibration text from the model costs (`--calib self`): SmolLM2-135M, 64 windows of 512 tokens at
once (seed 0), one torch thread, as the pipeline sampled before (float32 weights, torch.multinomial: an exponential
drawn for every vocabulary entry of a row) and as it samples now (the calibration dtype's weights, bf16 by default;
`data.categorical`: one uniform a row through the cumulative sum).

    python bench/sample_cost.py [--windows 64] [--seqlen 512]     # writes bench/results/sample-cost.{json,md}
"""
from __future__ import annotations

import argparse
import datetime
import json
import time

import torch
from machine import cpu_label
from plan import RESULTS

from bitsmith.calibration import data
from bitsmith.formats.source import open_source
from bitsmith.loader import load_model

OUT = RESULTS / "sample-cost"
WAYS = {"before: float32, torch.multinomial": (torch.float32, lambda p, g: torch.multinomial(p, 1, generator=g)[:, 0]),
        "now: bfloat16, data.categorical": (torch.bfloat16, data.categorical)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    source, drawn = open_source("smollm2-135m"), data.categorical
    rows = []
    try:
        for way, (dtype, draw) in WAYS.items():
            data.categorical = draw                            # self_windows draws through the module's name
            model = load_model(source, dtype=dtype)
            cpu, wall = time.process_time(), time.perf_counter()
            ids = data.self_windows(model, args.windows, args.seqlen, 0, model.config.vocab_size)
            rows.append({"way": way, "cpu_seconds": round(time.process_time() - cpu, 1),
                         "wall_seconds": round(time.perf_counter() - wall, 1), "tokens": ids.numel()})
            print(rows[-1], flush=True)
    finally:
        data.categorical = drawn
    result = {"date": datetime.date.today().isoformat(), "cpu": cpu_label(), "windows": args.windows,
              "seqlen": args.seqlen, "rows": rows}
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Sampling calibration text from SmolLM2-135M", "",
             (f"`python bench/sample_cost.py`, {result['date']}, {result['cpu']}, one torch thread: {args.windows} "
              f"windows of {args.seqlen} tokens sampled at once (seed 0), the key/value cache filled in place."), "",
             "| weights, draw | CPU s | wall s | tokens |", "|---|---|---|---|"]
    lines += [f"| {r['way']} | {r['cpu_seconds']} | {r['wall_seconds']} | {r['tokens']:,} |" for r in rows]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
