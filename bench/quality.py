"""Quality benchmark: BF16, RTN and GPTQ on SmolLM2-135M (WikiText-2) and stories260K (TinyStories).

Protocol (DESIGN.md section 3): eval text tokenized once, non-overlapping windows, ppl = exp(mean NLL),
float32 compute; KL(base || quantized) and top-1 agreement on the first KL_WINDOWS windows; all-in bits
per weight of the quantized linears. Each configuration runs in its own process so that its peak RSS is
its own. Writes bench/results/quality-<model>.md and .json.

    python bench/quality.py [--model smollm2|stories] [--only NAME ...]
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

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "assets" / "text"
STORIES = ROOT.parent / "shared" / "assets" / "models" / "stories260K"
RESULTS = ROOT / "bench" / "results"
KL_WINDOWS = 4

MODELS = {
    "smollm2": {"model": "smollm2-135m", "calib": TEXT / "c4_calib.txt", "eval": TEXT / "wikitext2_test.txt",
                "eval_seqlen": 2048, "max_tokens": 65536, "base": "BF16 (GGUF dequantized)", "base_bits": 16.0,
                "text": "eval WikiText-2 test (first 65,536 tokens), calibration c4_calib.txt"},
    # stories260K has no held-out TinyStories text in ../shared: calibrate on the first 70 % of the file,
    # evaluate on the rest (the split is made here, never overlapping)
    "stories": {"model": str(STORIES), "calib": None, "eval": None, "eval_seqlen": 512, "max_tokens": None,
                "base": "fp32 checkpoint", "base_bits": 32.0,
                "text": "tinystories_calib.txt split: calibration on the first 70 %, eval on the last 30 %"},
}
CONFIGS = [  # name, method, bits, group size, sym, act-order, mse grid search, rotated (quantize --rotate)
    ("bf16", None, 16, None, None, None, None, False),
    ("gptq-w4-g128", "gptq", 4, 128, False, True, False, False),
    ("gptq-w3-g128", "gptq", 3, 128, False, True, False, False),
    ("rtn-w4-g128", "rtn", 4, 128, False, False, False, False),
    ("rtn-w3-g128", "rtn", 3, 128, False, False, False, False),
    ("rtn-w2-g128", "rtn", 2, 128, False, False, False, False),
    ("rtn-w4-pc-sym", "rtn", 4, -1, True, False, False, False),
    ("gptq-w2-g128", "gptq", 2, 128, False, False, False, False),
    ("gptq-w4-pc-sym", "gptq", 4, -1, True, True, False, False),
    ("gptq-mse-w4-g128", "gptq", 4, 128, False, True, True, False),     # bitsmith's default GPTQ grid
    ("gptq-mse-w3-g128", "gptq", 3, 128, False, True, True, False),
    ("gptq-mse-w2-g128", "gptq", 2, 128, False, False, True, False),
    ("gptq-mse-w4-g128-sym", "gptq", 4, 128, True, True, True, False),  # is symmetric a free default? (vLLM's Marlin)
    ("gptq-mse-w3-g128-sym", "gptq", 3, 128, True, True, True, False),
    ("rotated-rtn-w3-g128", "rtn", 3, 128, False, False, False, True),
    ("rotated-gptq-mse-w4-g128", "gptq", 4, 128, False, True, True, True),
    ("rotated-gptq-mse-w3-g128", "gptq", 3, 128, False, True, True, True),
    ("rotated-gptq-mse-w2-g128", "gptq", 2, 128, False, False, True, True),
]


def split_stories(workdir: Path) -> tuple[Path, Path]:
    text = (TEXT / "tinystories_calib.txt").read_text()
    cut = text.index("\n", int(len(text) * 0.7))
    (workdir / "calib.txt").write_text(text[:cut])
    (workdir / "eval.txt").write_text(text[cut:])
    return workdir / "calib.txt", workdir / "eval.txt"


def one(spec: dict, name: str, workdir: Path) -> dict:
    """Run one configuration in this process; returns its row."""
    import time

    import torch

    import bitsmith
    from bitsmith.calibration import data
    from bitsmith.calibration.perplexity import evaluate
    from bitsmith.formats.source import open_source
    from bitsmith.kernels.linear import cache_dequantized
    from bitsmith.pipeline import peak_rss_bytes

    _, method, bits, group, sym, act_order, mse, rotate = next(c for c in CONFIGS if c[0] == name)

    def eval_windows():
        ids = data.tokenize(open_source(spec["model"]).tokenizer(), Path(spec["eval"]).read_text())
        return data.eval_windows(ids, spec["eval_seqlen"], spec["max_tokens"])

    row = {"config": name, "date": datetime.date.today().isoformat(), "threads": torch.get_num_threads()}
    if method is None:
        windows = eval_windows()
        model = bitsmith.load(spec["model"])
        row["load_peak_rss_mb"] = peak_rss_bytes() / 1e6
        row.update(evaluate(model, windows, progress=False), bits_per_weight=spec["base_bits"])
    else:
        out = workdir / name
        t = time.perf_counter()
        s = bitsmith.quantize(spec["model"], str(out), method=method, bits=bits, group_size=group, sym=sym,
                              act_order=act_order, mse=mse, rotate=rotate, calib=[str(spec["calib"])], nsamples=128, seqlen=512,
                              seed=0, overwrite=True, progress=False)
        row.update(quantize_seconds=time.perf_counter() - t, quantize_peak_rss_mb=s["peak_rss_bytes"] / 1e6,
                   bits_per_weight=s["bits_per_weight"])
        windows = eval_windows()               # after quantizing: the quantize peak RSS is the job's alone
        model = bitsmith.load(str(out))
        cache_dequantized(model)
        row.update(evaluate(model, windows, progress=False))
        close = evaluate(model, windows[:KL_WINDOWS], base=bitsmith.load(spec["model"]), progress=False)
        row.update(kl=close["kl"], top1_agreement=close["top1_agreement"], kl_tokens=close["tokens"])
    row["peak_rss_mb"] = peak_rss_bytes() / 1e6
    return row


def measured(rows: list[dict]) -> str:
    """The dates the rows were measured on (each row records its own)."""
    dates = sorted({r.get("date", "?") for r in rows})
    return dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]} (each row's date in its last column)"


def report(model_key: str, rows: list[dict]) -> str:
    spec = MODELS[model_key]
    lines = [f"# Quality: {model_key}", "",
             (f"Measured {measured(rows)} on {platform.processor() or platform.machine()} "
             f"({os.cpu_count()} cores; another run may have shared the second core), torch threads per run: "
             f"{rows[0]['threads'] if rows else '?'}, float32 evaluation (calibration forwards: bf16 autocast, the default)."),
             f"Text: {spec['text']}; seqlen {spec['eval_seqlen']}, {rows[0]['tokens'] if rows else '?'} eval tokens; "
             f"KL(base || quantized) and top-1 agreement on the first {KL_WINDOWS} windows. Calibration 128 x 512 "
             "tokens, seed 0, GPTQ damp 0.01 with act-order except W2, not true-sequential; min-max grids except the gptq-mse rows (range shrunk to the least L^2.4 error, the default of `bitsmith quantize --method gptq`); rotated-* rows: the same setting with `--rotate` (seed 0), KL against the unrotated base. Quantize time and peak RSS are the whole "
             "quantize job in its process (load, calibration, write). Base row: " + spec["base"] + ".", "",
             "| config | all-in bits/weight | perplexity | KL to base | top-1 agreement | quantize s | peak RSS MB | measured |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl = f"{r['kl']:.4f}" if "kl" in r else "-"
        top1 = f"{r['top1_agreement']:.4f}" if "top1_agreement" in r else "-"
        secs = f"{r['quantize_seconds']:.0f}" if "quantize_seconds" in r else "-"
        rss = r.get("quantize_peak_rss_mb", r.get("load_peak_rss_mb", 0))
        bpw = spec["base_bits"] if r["config"] == "bf16" else r["bits_per_weight"]
        name = "base" if r["config"] == "bf16" else r["config"]
        lines.append(f"| {name} | {bpw:.3f} | {r['perplexity']:.3f} | {kl} | {top1} | "
                     f"{secs} | {rss:.0f} | {r.get('date', '?')} |")
    if model_key == "smollm2":
        lines += ["", ("Caveat: the SmolLM2 'BF16' weights are the GGUF Q4_1 model dequantized (4-bit, groups of "
                  "32 along the input): 4-bit settings sit close to the grid the weights came from, which "
                  "flatters them compared with a true BF16 model.")]
    return "\n".join(lines) + "\n"


def save(model_key: str, row: dict) -> None:
    """Merge one row into the results (runs of disjoint --only sets may share the files)."""
    path = RESULTS / f"quality-{model_key}.json"
    rows = {r["config"]: r for r in (json.loads(path.read_text()) if path.exists() else [])}
    rows[row["config"]] = row
    ordered = [rows[name] for name, *_ in CONFIGS if name in rows]
    path.write_text(json.dumps(ordered, indent=2) + "\n")
    (RESULTS / f"quality-{model_key}.md").write_text(report(model_key, ordered))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(MODELS), default=None)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--report", action="store_true", help="Rewrite the .md files from the .json results.")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        spec = dict(MODELS[args.model])
        if args.model == "stories":
            spec["calib"], spec["eval"] = split_stories(Path(args.workdir))
        print(json.dumps(one(spec, args.one, Path(args.workdir))))
        return
    if args.report:
        for key in MODELS:
            path = RESULTS / f"quality-{key}.json"
            if path.exists():
                (RESULTS / f"quality-{key}.md").write_text(report(key, json.loads(path.read_text())))
        return
    if not TEXT.exists():
        sys.exit(f"bench: {TEXT} not found (the real assets live beside the repository)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for model_key in [args.model] if args.model else list(MODELS):
        with tempfile.TemporaryDirectory() as work:
            for name, *_ in CONFIGS:
                if args.only and name not in args.only:
                    continue
                proc = subprocess.run([sys.executable, __file__, "--model", model_key, "--one", name,
                                       "--workdir", work], capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    sys.exit(f"bench: {model_key} {name} failed:\n{proc.stderr[-2000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                print(model_key, row, flush=True)
                save(model_key, row)


if __name__ == "__main__":
    main()
