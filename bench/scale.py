"""How quantization scales: peak memory and time against model size, calibration size and processes.

    python bench/scale.py                     # CPU tables (about 20 minutes on 2 cores)
    python bench/scale.py --device cuda       # on a GPU: time per block and peak GPU memory, SmolLM2 and
                                              # synthetic Llamas with 7B-sized blocks (4096 x 11008)
    python bench/scale.py --report            # the tables from the stored results

Every run is the CLI (`bitsmith quantize ... --json`) in a fresh process on a synthetic Llama (bench/synthetic.py:
random bf16 weights, 512-token vocabulary) or on SmolLM2-135M. Peak RSS is the quantize process's (ru_maxrss);
time is wall time. Tables:
1. model size (number of blocks of one shape) -> peak RSS, time per block: memory flat in the depth;
2. calibration tokens (nsamples x seqlen) -> peak RSS: grows by the hidden-state stream, n x seqlen x hidden x 4 B;
3. processes x threads (1 x 1, 2 x 1, 1 x 2) on SmolLM2 -> time, parallel efficiency, whether the outputs are the
   same bytes.
Results: bench/results/scale-<device>.json and .md.
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
import time
from pathlib import Path

import synthetic

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "assets" / "text"
CALIB = TEXT / "tinystories_calib.txt"
RESULTS = ROOT / "bench" / "results"
SMALL = {"hidden": 512, "intermediate": 1408, "heads": 8, "kv_heads": 4}
SEVEN_B = {"hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32}
SMOLLM2 = {"hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3, "layers": 30}   # SmolLM2-135M's shapes


def quantize(model: str, out: str, *args: str, nproc: int = 1, device: str = "cpu", threads: int = 1) -> dict:
    """One `bitsmith quantize` in a fresh process: its summary, wall time and the command."""
    summary = Path(out).with_suffix(".json")
    command = [sys.executable, "-m", "bitsmith", "quantize", model, "-o", out, "--device", device, "--json",
               str(summary), *args, *(["--nproc", str(nproc)] if nproc > 1 else [])]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    shown = ("bitsmith " + " ".join(command[3:])).replace(str(Path(out).parent), "OUT").replace(
        f"{TEXT.resolve()}/", "../shared/assets/text/")
    return {**json.loads(summary.read_text()), "wall_seconds": wall, "command": shown}


def depth(work: Path, device: str, shape: dict, layers: list[int], calib: list[str]) -> list[dict]:
    rows = []
    for n in layers:
        model = work / f"synthetic-{n}"
        size = synthetic.write(model, shape["hidden"], shape["intermediate"], n, shape["heads"], shape["kv_heads"])
        s = quantize(str(model), str(work / f"q-{n}"), *calib, device=device)
        rows.append({"layers": n, "model_bytes": size, "peak_rss_bytes": s["peak_rss_bytes"],
                     "peak_device_bytes": s.get("peak_device_bytes"), "seconds": s["seconds"],
                     "seconds_per_block": s["seconds"] / n, "command": s["command"]})
        print("depth", rows[-1], flush=True)
        subprocess.run(["rm", "-rf", str(model), str(work / f"q-{n}")], check=True)
    return rows


def tokens(work: Path, device: str, shape: dict, settings: list[tuple[int, int]], blocks: int,
           offloaded: list[tuple[int, int]] = ()) -> list[dict]:
    """Peak memory against the calibration size; the settings in `offloaded` once more with
    --offload-activations (the stream kept in host memory between blocks)."""
    model = work / "synthetic-tokens"
    synthetic.write(model, shape["hidden"], shape["intermediate"], blocks, shape["heads"], shape["kv_heads"])
    rows = []
    for (nsamples, seqlen), offload in [(s, False) for s in settings] + [(s, True) for s in offloaded]:
        out = work / f"q-{nsamples}-{seqlen}"
        s = quantize(str(model), str(out), "--calib", str(CALIB), "--nsamples", str(nsamples), "--seqlen", str(seqlen),
                     "--no-mse", *(["--offload-activations"] if offload else []), device=device)
        rows.append({"nsamples": nsamples, "seqlen": seqlen, "hidden": shape["hidden"], "offload": offload,
                     "stream_bytes": nsamples * seqlen * shape["hidden"] * 4, "peak_rss_bytes": s["peak_rss_bytes"],
                     "peak_device_bytes": s.get("peak_device_bytes"), "seconds": s["seconds"], "command": s["command"]})
        print("tokens", rows[-1], flush=True)
        subprocess.run(["rm", "-rf", str(out)], check=True)
    return rows


def smollm2_shaped(work: Path, device: str) -> dict:
    """A synthetic model of SmolLM2-135M's shapes (30 blocks, hidden 576, intermediate 1536, 9 / 3 heads; random
    weights, 512-token vocabulary), quantized as the bit-plan benchmarks calibrate: GPTQ W4 g128 with the mse grid,
    128 x 512 calibration tokens. Time and memory depend on the shapes alone (the perplexity is not measured)."""
    shape = SMOLLM2
    model = work / "smollm2-shaped"
    size = synthetic.write(model, shape["hidden"], shape["intermediate"], shape["layers"], shape["heads"],
                           shape["kv_heads"])
    s = quantize(str(model), str(work / "q-smollm2-shaped"), "--calib", str(CALIB), "--nsamples", "128", "--seqlen",
                 "512", device=device)
    row = {**shape, "model_bytes": size, "peak_rss_bytes": s["peak_rss_bytes"],
           "peak_device_bytes": s.get("peak_device_bytes"), "seconds": s["seconds"],
           "seconds_per_block": s["seconds"] / shape["layers"], "command": s["command"]}
    print("smollm2-shaped", row, flush=True)
    subprocess.run(["rm", "-rf", str(model), str(work / "q-smollm2-shaped")], check=True)
    return row


def processes(work: Path, runs: list[tuple[int, int]]) -> list[dict]:
    """SmolLM2, GPTQ W4 g128 on c4_calib 128 x 512, as (processes, threads per process)."""
    rows, first = [], None
    for n, threads in runs:
        out = work / f"smollm2-{n}x{threads}"
        s = quantize("smollm2-135m", str(out), "--calib", str(TEXT / "c4_calib.txt"), "--nsamples", "128", "--seqlen",
                     "512", nproc=n, threads=threads)
        files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        first = first or files
        rows.append({"processes": n, "threads": threads, "wall_seconds": s["wall_seconds"], "seconds": s["seconds"],
                     "peak_rss_bytes_main": s["peak_rss_bytes"], "same_bytes_as_first": files == first,
                     "command": s["command"]})
        print("processes", rows[-1], flush=True)
    base = rows[0]["wall_seconds"]
    for r in rows:
        r["speedup"] = base / r["wall_seconds"]
        r["efficiency"] = r["speedup"] / (r["processes"] * r["threads"])
    return rows


def report(result: dict) -> str:
    mb = lambda b: f"{b / 2**20:,.0f}" if b is not None else "-"
    lines = [f"# Scaling ({result['device']}, {result['date']}, {result['machine']})", "",
             f"torch threads per process: {result['threads']}. Command lines in the JSON next to this file.", ""]
    if result.get("note"):
        lines += [f"Note: {result['note']}.", ""]
    if result.get("smollm2_shaped"):
        r = result["smollm2_shaped"]
        lines += [("## SmolLM2-135M's shapes: a synthetic model of its 30 blocks (hidden 576, intermediate 1536, 9 / 3 "
                   "heads; random weights, so time and memory only), GPTQ W4 g128 with the mse grid, tinystories "
                   "128 x 512"), "",
                  "| blocks | model MB (bf16) | peak RSS MB | peak device MB | s in all | s per block |",
                  "|---|---|---|---|---|---|",
                  (f"| {r['layers']} | {mb(r['model_bytes'])} | {mb(r['peak_rss_bytes'])} | "
                   f"{mb(r['peak_device_bytes'])} | {r['seconds']:.1f} | {r['seconds_per_block']:.2f} |"), ""]
    if result.get("depth"):
        shape = result["shape"]
        lines += [(f"## Model depth: synthetic Llama blocks of hidden {shape['hidden']}, intermediate "
                  f"{shape['intermediate']}; calibration {result['calib']}"), "",
                  "| blocks | model MB (bf16) | peak RSS MB | peak device MB | s per block |", "|---|---|---|---|---|"]
        lines += [f"| {r['layers']} | {mb(r['model_bytes'])} | {mb(r['peak_rss_bytes'])} | {mb(r['peak_device_bytes'])} "
                  f"| {r['seconds_per_block']:.2f} |" for r in result["depth"]]
        lines.append("")
    if result.get("tokens"):
        rows = result["tokens"]
        lines += [f"## Calibration tokens: {result.get('tokens_blocks', 4)} synthetic blocks of the same shape", "",
                  "| nsamples x seqlen | --offload-activations | hidden stream MB | peak RSS MB | peak device MB | s |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['nsamples']} x {r['seqlen']} | {'yes' if r.get('offload') else 'no'} | "
                  f"{mb(r['stream_bytes'])} | {mb(r['peak_rss_bytes'])} | {mb(r['peak_device_bytes'])} | "
                  f"{r['seconds']:.0f} |" for r in rows]
        rows = [r for r in rows if not r.get("offload")]
        if len(rows) > 1 and result["device"] == "cpu":          # on a GPU the stream is not in host memory
            xs, ys = [r["stream_bytes"] for r in rows], [r["peak_rss_bytes"] for r in rows]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1)
            lines += ["", (f"Least squares: peak RSS = {mb(my - slope * mx)} MB + {slope:.2f} x the stream "
                      "(n x seqlen x hidden x 4 B).")]
        lines.append("")
    if result.get("processes"):
        lines += ["## Processes: SmolLM2-135M, GPTQ W4 g128 (mse grid), c4_calib 128 x 512", "",
                  ("Efficiency: speedup over the first row per core used. The outputs of runs with the same threads per "
                  "process are the same bytes (a thread count changes float rounding in torch's kernels)."), "",
                  "| processes x threads | wall s | speedup | efficiency | peak RSS MB (main) | same bytes as the first |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['processes']} x {r['threads']} | {r['wall_seconds']:.0f} | {r['speedup']:.2f} | "
                  f"{r['efficiency']:.0%} | {mb(r['peak_rss_bytes_main'])} | "
                  f"{'yes' if r['same_bytes_as_first'] else 'no'} |" for r in result["processes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--merge", type=Path, default=None,
                    help="stored results (JSON) whose tables the ones measured now replace (the others are kept)")
    settings = lambda v: [tuple(int(n) for n in s.split("x")) for s in v.split(",") if s]
    ap.add_argument("--depths", type=lambda v: [int(n) for n in v.split(",") if n], default=None,
                    help="block counts of the depth table, e.g. 2,4 (empty for none; default: 2,4 on a GPU, "
                         "2,4,8,16 on CPU)")
    ap.add_argument("--tokens", type=settings, default=None,
                    help="nsamples x seqlen settings of the tokens table, e.g. 16x256,128x512 (empty for none)")
    ap.add_argument("--offload", type=settings, default=[],
                    help="settings of the tokens table run once more with --offload-activations")
    ap.add_argument("--smollm2", action=argparse.BooleanOptionalAction, default=None,
                    help="the SmolLM2-shaped row (default: on a GPU)")
    args = ap.parse_args()
    path = args.results / f"scale-{args.device.split(':')[0]}.json"
    args.results.mkdir(parents=True, exist_ok=True)
    if not args.report:
        gpu = args.device != "cpu"
        shape = SEVEN_B if gpu else SMALL
        calib = ["--calib", str(CALIB), "--nsamples", "16", "--seqlen", "256", "--no-mse"]
        shown = args.device
        if gpu:
            import torch
            shown += f" ({torch.cuda.get_device_name()})"
        today = datetime.date.today().isoformat()
        result = json.loads(args.merge.read_text()) if args.merge else {}
        result.update({"device": shown, "machine": platform.machine() + f", {os.cpu_count()} CPUs", "threads": 1,
                       "shape": shape, "calib": "tinystories 16 x 256, --no-mse"})
        dates = result.setdefault("dates", {})
        settings = args.tokens if args.tokens is not None else ([(16, 256), (64, 512), (128, 512)] if gpu else
                                                                [(16, 256), (32, 256), (64, 256), (64, 512), (128, 512)])
        depths = args.depths if args.depths is not None else ([2, 4] if gpu else [2, 4, 8, 16])

        def save(table, rows):                                    # each table kept once measured
            result[table], dates[table] = rows, today
            result["date"] = ", ".join(sorted(set(dates.values())))
            path.write_text(json.dumps(result, indent=1) + "\n")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            if args.smollm2 if args.smollm2 is not None else gpu:
                save("smollm2_shaped", smollm2_shaped(work, args.device))
            if depths:
                save("depth", depth(work, args.device, shape, depths, calib))
            if settings or args.offload:
                result["tokens_blocks"] = 2 if gpu else 4                # memory is flat in the depth (first table)
                save("tokens", tokens(work, args.device, shape, settings, result["tokens_blocks"], args.offload))
            if not gpu:
                save("processes", processes(work, [(1, 1), (2, 1), (1, 2)]))
    result = json.loads(path.read_text())
    path.with_suffix(".md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
