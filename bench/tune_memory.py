"""Tuning's time and memory against how many blocks keep their activations (quantize/tune.py `kept_blocks`).

Each setting quantizes SmolLM2-135M in a process of its own (W4 g128 GPTQ, one tuning pass over 32 windows of
512 tokens: four steps of 8 windows) with the number of blocks that keep their activations fixed: none (every
block recomputed in the backward pass), all, or what the free memory allows (the default). Reported: CPU seconds
of the tuning pass per step, and the process's peak resident memory.

    python bench/tune_memory.py                  # writes bench/results/tune-memory-smollm2.{json,md}
"""
from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_label
from plan import RESULTS, TEXT

SETTINGS = ("none", "all", "auto")
WINDOWS, SEQLEN = 32, 512


def one(setting: str, out: Path) -> dict:
    """Quantize with tuning, `setting` blocks keeping their activations; the tuning pass's CPU seconds."""
    import torch

    import bitsmith
    from bitsmith import pipeline

    torch.set_num_threads(1)
    chosen, timed = {}, {}
    auto = pipeline.kept_blocks

    def keep(per_block, blocks, free):
        kept = {"none": 0, "all": blocks}[setting] if setting != "auto" else auto(per_block, blocks, free)
        chosen.update(per_block=per_block, blocks=blocks, free=free, kept=kept)
        return kept

    def timed_tune(*args, **kwargs):
        start = time.process_time()
        trace = tune(*args, **kwargs)
        timed.update(cpu_seconds=time.process_time() - start, steps=len(trace.losses))
        return trace

    tune = pipeline.tune
    pipeline.kept_blocks, pipeline.tune = keep, timed_tune
    summary = bitsmith.quantize("smollm2-135m", str(out), calib=[str(TEXT / "c4_calib.txt")], nsamples=WINDOWS,
                                seqlen=SEQLEN, seed=0, bits=4, group_size=128, tune_epochs=1, tune_lr=3e-3,
                                progress=False)
    return {"setting": setting, **chosen, **timed, "seconds_per_step": timed["cpu_seconds"] / timed["steps"],
            "quantize_cpu_seconds": summary["cpu_seconds"],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def report(runs: list[dict], meta: dict) -> str:
    how = (f"Measured {meta['date']} with `python bench/tune_memory.py` on {meta['cpu']} (one torch thread, one "
           f"process per row). W4 g128 GPTQ, then one tuning pass over {WINDOWS} windows of {SEQLEN} tokens "
           "(minibatches of 8); CPU seconds of the tuning pass per step; peak resident memory of the whole job.")
    header = ("| blocks keeping their activations | kept / blocks | one block's activations MB | tuning CPU s per step "
              "| peak RSS MB |")
    lines = ["# Tuning: kept activations against recomputed ones, SmolLM2-135M", "", how, "", header,
             "|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['setting']} | {r['kept']} / {r['blocks']} | {r['per_block'] / 2**20:.0f} | "
                     f"{r['seconds_per_step']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", choices=SETTINGS, help=argparse.SUPPRESS)       # a child process's setting
    ap.add_argument("--settings", nargs="*", choices=SETTINGS, default=list(SETTINGS))
    ap.add_argument("--out", type=Path, default=RESULTS / "tune-memory-smollm2")
    args = ap.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(one(args.one, Path(work) / "out")))
        return
    runs = []
    for setting in args.settings:
        done = subprocess.run([sys.executable, __file__, "--one", setting], check=True, capture_output=True,
                              text=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_label()}
    args.out.with_suffix(".json").write_text(json.dumps({**meta, "runs": runs}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(report(runs, meta))


if __name__ == "__main__":
    main()
