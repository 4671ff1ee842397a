"""Learned rounding (`--rounding signround`) against GPTQ alone on SmolLM2-135M: WikiText-2 perplexity measured
while quantizing, a held-out public-domain text evaluated on the written checkpoint, all-in bits per weight, and
the quantize job's wall and CPU time, for a few iteration counts, and per layout of the plan's menu: GPTQ
against SignRound 50 with every linear on 3-bit grids with 0.5 % fp16 outliers, on lookup tables, on grids per
input channel or on codebooks of pairs (a plan.json giving every linear that entry, `--plan`).

Every row is the command line in processes of its own, one torch thread each:
    bitsmith quantize smollm2-135m -o OUT --bits B --group-size 128 --calib c4_calib.txt --nsamples 128
        --seqlen 512 --seed 0 --eval-data wikitext2_test.txt --eval-seqlen 2048 --eval-max-tokens 65536
        [--rounding signround --rounding-iters N | --rounding gptaq] [--true-sequential for the -ts- rows]
        [--no-act-order for W2, as the GPTQ baseline rows] [--plan PLAN for the rows of another layout]
    bitsmith eval OUT --data bitsmith/calibration/texts/eval_eb1911_shakespeare.txt --seqlen 2048 --max-tokens 16384
Rows merge into bench/results/rounding-smollm2.{json,md} (runs of disjoint --only sets may share the files).

    python bench/rounding.py [--only NAME ...] [--report]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_label

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "assets" / "text"
HELD_OUT = ROOT / "bitsmith" / "calibration" / "texts" / "eval_eb1911_shakespeare.txt"
RESULTS = ROOT / "bench" / "results"
BITSMITH = [sys.executable, "-c", "import sys; from bitsmith.cli.main import main; main(sys.argv[1:], prog_name='bitsmith')"]

CONFIGS = [  # name, bits, rounding, iterations per block
    ("gptq-w3-g128", 3, "gptq", 0),
    ("signround25-w3-g128", 3, "signround", 25),
    ("signround50-w3-g128", 3, "signround", 50),
    ("signround100-w3-g128", 3, "signround", 100),
    ("gptq-w4-g128", 4, "gptq", 0),
    ("signround50-w4-g128", 4, "signround", 50),
    ("gptq-w2-g128", 2, "gptq", 0),
    ("signround50-w2-g128", 2, "signround", 50),
    ("gptaq-w3-g128", 3, "gptaq", 0),
    ("gptq-ts-w3-g128", 3, "gptq", 0),           # -ts: --true-sequential
    ("gptaq-ts-w3-g128", 3, "gptaq", 0),
    *((f"{rounding}{iters or ''}-w3-{layout}", 3, rounding, iters)
      for layout in ("outliers0.5", "lut", "per-ic-g128", "vq-g128") for rounding, iters in (("gptq", 0), ("signround", 50))),
]
LAYOUTS = {  # plan entry of every linear, by the suffix of a config's name (grids of groups of 128 otherwise)
    "outliers0.5": {"group_size": 128, "outliers": 0.005},
    "lut": {"group_size": -1, "lut": True},
    "per-ic-g128": {"group_size": 128, "per_ic": True},
    "vq-g128": {"group_size": 128, "vq": True},
}


def layout(name: str) -> str:
    return next((suffix for suffix in LAYOUTS if name.endswith(suffix)), "grid")


def plan_file(name: str, bits: int, workdir: Path) -> Path:
    """A plan.json giving every decoder linear of SmolLM2 the layout of `name`."""
    from bitsmith.calibration.adapter import BlockRunner
    from bitsmith.formats.source import open_source
    from bitsmith.pipeline import linear_shapes
    linears = linear_shapes(BlockRunner(open_source("smollm2-135m").config))
    entry = {"bits": bits, "sym": False, **LAYOUTS[layout(name)]}
    path = workdir / f"{name}-plan.json"
    path.write_text(json.dumps({"layers": {linear: entry for linear in linears}}))
    return path


def one(name: str, workdir: Path) -> dict:
    """Quantize and evaluate one configuration; its row."""
    _, bits, rounding, iters = next(c for c in CONFIGS if c[0] == name)
    out, summary = workdir / name, workdir / f"{name}.json"
    args = ["quantize", "smollm2-135m", "-o", str(out), "--overwrite", "--bits", str(bits), "--group-size", "128",
            "--calib", str(TEXT / "c4_calib.txt"), "--nsamples", "128", "--seqlen", "512", "--seed", "0",
            "--eval-data", str(TEXT / "wikitext2_test.txt"), "--eval-seqlen", "2048", "--eval-max-tokens", "65536",
            "--rounding", rounding, "--rounding-iters", str(iters), "--json", str(summary)]
    if bits == 2:
        args.append("--no-act-order")
    if "-ts-" in name:
        args.append("--true-sequential")
    if layout(name) != "grid":
        args += ["--plan", str(plan_file(name, bits, workdir))]
    run(args)
    s = json.loads(summary.read_text())
    held = workdir / f"{name}-held.json"
    run(["eval", str(out), "--data", str(HELD_OUT), "--seqlen", "2048", "--max-tokens", "16384", "--json", str(held)])
    h = json.loads(held.read_text())
    return {"config": name, "bits": bits, "group_size": LAYOUTS.get(layout(name), {}).get("group_size", 128),
            "layout": layout(name), "rounding": rounding, "iterations": iters, "cpu": cpu_label(),
            "true_sequential": "-ts-" in name,
            "act_order": bits != 2, "bits_per_weight": s["bits_per_weight"], "wikitext2": s["eval"]["perplexity"],
            "wikitext2_tokens": s["eval"]["tokens"], "held_out": h["perplexity"], "held_out_tokens": h["tokens"],
            "quantize_seconds": s["seconds"], "quantize_cpu_seconds": s["cpu_seconds"],
            "peak_rss_mb": s["peak_rss_bytes"] / 1e6, "date": datetime.date.today().isoformat()}


def run(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*BITSMITH, *args], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.exit(f"bench: bitsmith {' '.join(args[:2])} failed:\n{proc.stderr[-2000:]}")


def report(rows: list[dict]) -> str:
    dates = sorted({r["date"] for r in rows})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    base = {(r["bits"], r.get("layout", "grid"), r["date"]): r for r in rows   # GPTQ of the same day's code
            if r["rounding"] == "gptq" and not r.get("true_sequential")}
    lines = ["# Learned rounding (SignRound) and GPTQ toward the unquantized outputs (GPTAQ): SmolLM2-135M", "",
             (f"Measured {when} on {platform.processor() or platform.machine()} ({os.cpu_count()} cores, pinned to "
              "one; other jobs shared that core, so wall time runs above CPU time), one torch thread, bitsmith's "
              "defaults otherwise (asymmetric, GPTQ's mse grid, act-order except W2, calibration forwards and "
              "SignRound in bf16 autocast)."),
             ("Calibration: c4_calib.txt, 128 windows of 512 tokens, seed 0; SignRound: minibatches of 8 windows, "
              "step 1/iterations decayed linearly to 0, the least-loss iteration kept, each block fitted to the "
              "unquantized model's hidden states after it. WikiText-2: test set, first 65,536 tokens, windows of "
              "2048, measured while quantizing. Held-out: bitsmith/calibration/texts/eval_eb1911_shakespeare.txt, first "
              "16,384 tokens, windows of 2048, `bitsmith eval` on the written checkpoint. Quantize time is the whole "
              "job (load, calibration, GPTQ, SignRound, the streamed WikiText-2 evaluation, writing). Layouts other "
              "than grids of 128: every linear on that layout at 3 bits (`--plan`): grids of 128 with 0.5 % fp16 "
              "outliers, a lookup table per row, per-input-channel grids of 128 rows, codebooks of pairs per 128 "
              "inputs. CPU: the machine of the row, where recorded; CPU s over GPTQ only against GPTQ of the same "
              "layout and day."), "",
             ("| config | layout | bits | iterations | all-in bpw | WikiText-2 | held-out | quantize wall s "
              "| quantize CPU s | CPU s over GPTQ | measured | CPU |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = base.get((r["bits"], r.get("layout", "grid"), r["date"]))
        extra = f"{r['quantize_cpu_seconds'] - same['quantize_cpu_seconds']:+.0f}" if r["rounding"] != "gptq" and same else "-"
        lines.append(f"| {r['config']} | {r.get('layout', 'grid')} | {r['bits']} | {r['iterations'] or '-'} | "
                     f"{r['bits_per_weight']:.3f} | {r['wikitext2']:.2f} | {r['held_out']:.2f} | "
                     f"{r['quantize_seconds']:.0f} | {r['quantize_cpu_seconds']:.0f} | {extra} | {r['date']} | "
                     f"{r.get('cpu', '-')} |")
    return "\n".join(lines) + "\n"


def save(row: dict) -> None:
    path = RESULTS / "rounding-smollm2.json"
    rows = {r["config"]: r for r in (json.loads(path.read_text()) if path.exists() else [])}
    rows[row["config"]] = row
    ordered = [rows[name] for name, *_ in CONFIGS if name in rows]
    path.write_text(json.dumps(ordered, indent=2) + "\n")
    (RESULTS / "rounding-smollm2.md").write_text(report(ordered))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", choices=[c[0] for c in CONFIGS])
    ap.add_argument("--report", action="store_true", help="Rewrite the .md file from the .json results.")
    args = ap.parse_args()
    path = RESULTS / "rounding-smollm2.json"
    if args.report:
        (RESULTS / "rounding-smollm2.md").write_text(report(json.loads(path.read_text())))
        return
    if not TEXT.exists():
        sys.exit(f"bench: {TEXT} not found (the real assets live beside the repository)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for name, *_ in CONFIGS:
            if args.only is None or name in args.only:
                row = one(name, Path(work))
                print(json.dumps(row), flush=True)
                save(row)


if __name__ == "__main__":
    main()
