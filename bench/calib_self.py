"""Calibration text against text sampled from the model itself (LLM-QAT's data-free calibration): uniform W3 g128
GPTQ (mse grid) of SmolLM2-135M calibrated on 128 x 512 tokens of c4_calib.txt, of the model's own samples
(`--calib self`), or half of each (`--calib c4_calib.txt --calib self`), seed 0; each evaluated on WikiText-2
(first 65,536 tokens) and the bundled held-out EB1911 text (16,384 tokens), in windows of 2048. It tells whether
the gap between the calibration text and the evaluation texts is one of the calibration text's domain.

    python bench/calib_self.py [--settings c4 self mixed] [--bits 3]

One torch thread; writes bench/results/calib-self-smollm2.{json,md} (runs of earlier invocations kept).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import tempfile
from pathlib import Path

from machine import cpu_label
from plan import HELD_OUT, RESULTS, TEXT, bitsmith, held_out, portable, wikitext

OUT = RESULTS / "calib-self-smollm2"
SETTINGS = {"c4": [str(TEXT / "c4_calib.txt")], "self": ["self"], "mixed": [str(TEXT / "c4_calib.txt"), "self"]}


def run(setting: str, bits: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        out, summary = f"{work}/out", Path(work) / "summary.json"
        calib = [arg for source in SETTINGS[setting] for arg in ("--calib", source)]
        bitsmith("quantize", "smollm2-135m", "-o", out, "--bits", str(bits), "--group-size", "128", *calib,
                 "--nsamples", "128", "--seqlen", "512", "--seed", "0", "--json", str(summary))
        result = json.loads(summary.read_text())
        result.update(wikitext=wikitext(out, Path(work) / "wiki.json")["perplexity"],
                      held_out=held_out(out, Path(work) / "held.json")["perplexity"])
    result["calibration"] = portable(result["calibration"])
    return {"setting": setting, "bits": bits, "date": datetime.date.today().isoformat(), "cpu": cpu_label(),
            **{k: result[k] for k in ("calibration", "bits_per_weight", "cpu_seconds", "seconds", "peak_rss_bytes",
                                      "wikitext", "held_out")}}


def report(runs: list[dict]) -> str:
    quality = {r["config"]: r for r in json.loads((RESULTS / "quality-smollm2.json").read_text())}
    base = {"wikitext": quality["bf16"]["perplexity"],
            "held_out": json.loads((RESULTS / "plan-smollm2" / "base-held-out.json").read_text())["perplexity"]}
    lines = ["# Calibration text against the model's own samples (SmolLM2-135M)", "",
             ("Written by `python bench/calib_self.py`: uniform GPTQ (mse grid, group 128), calibration 128 x 512 "
             f"tokens, seed 0, one torch thread; WikiText-2 test (first 65,536 tokens, base {base['wikitext']:.2f}) "
             f"and the held-out EB1911 text ({HELD_OUT.name}, 16,384 tokens, base {base['held_out']:.2f}), windows "
             "of 2048; loss increase in nats per token in brackets. CPU seconds are the whole quantize job's "
             "(sampling included)."), "",
             "| bits | calibration | WikiText-2 | held-out | quantize CPU s | date | CPU | note |", "|---" * 8 + "|"]
    for r in sorted(runs, key=lambda r: (r["bits"], list(SETTINGS).index(r["setting"]))):
        cells = [f"{r[k]:.2f} ({math.log(r[k] / base[k]):.3f})" for k in ("wikitext", "held_out")]
        lines.append(f"| {r['bits']} | {r['calibration']} | {' | '.join(cells)} | {r['cpu_seconds']:.0f} | "
                     f"{r['date']} | {r['cpu']} | {r.get('note', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", nargs="*", choices=sorted(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--report", action="store_true", help="Only rewrite the table from the stored runs.")
    args = ap.parse_args()
    path = OUT.with_suffix(".json")
    runs = json.loads(path.read_text()) if path.exists() else []
    if not args.report:
        for setting in args.settings:
            runs = [r for r in runs if (r["setting"], r["bits"]) != (setting, args.bits)] + [run(setting, args.bits)]
            path.write_text(json.dumps(runs, indent=1) + "\n")
    OUT.with_suffix(".md").write_text(report(runs))


if __name__ == "__main__":
    main()
