"""The bit plan on SmolLM2-135M: WikiText-2 perplexity at target all-in bits per weight, next to uniform GPTQ
and the peers of ../shared/research/baselines.md.

    python bench/plan.py                              # targets 2.5 3.0 3.25 3.5 4.25, Fisher proxy
    python bench/plan.py --targets 3.25 --proxy hessian
    python bench/plan.py --targets 3.25 --rounding signround --rounding-iters 50
    python bench/plan.py --targets 3.25 --rounding gptaq [--true-sequential]
    python bench/plan.py --targets 3.25 --menu uniform,lut   # one technique alone next to the uniform grids
    python bench/plan.py --targets 3.25 --rounding signround --tune-epochs 1   # then end-to-end tuning
    python bench/plan.py --targets 3.25 --rotate --runs bench/results/plan-smollm2-rotated   # a rotated model
    python bench/plan.py --report                     # table and plot from the stored runs

Each run is the CLI job (`bitsmith quantize --target-bpw T`, one torch thread) of the quality protocol:
calibration 128 x 512 from c4_calib.txt seed 0, then `bitsmith eval` of the output on WikiText-2 test (first
65,536 tokens at seqlen 2048) and on a second held-out text (the bundled EB1911 article, 16,384 tokens). Time
and peak RSS are those of the quantize command alone; CPU time (one thread) does not depend on what else the
machine runs, wall time does. The first run measures (its time and peak RSS include the measurement) and leaves
measurement.json in bench/results/plan-smollm2/; later runs re-plan from it. Uniform rows come from bench/results/quality-smollm2.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from machine import cpu_label

from bitsmith.plan import FLAGS, TECHNIQUES, LayerPlan, QuantizeOptions

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEXT = SHARED / "assets" / "text"
HELD_OUT = ROOT / "bitsmith" / "calibration" / "texts" / "eval_eb1911_shakespeare.txt"
RESULTS = ROOT / "bench" / "results"
RUNS = RESULTS / "plan-smollm2"
MEASUREMENT = RUNS / "measurement.json"
TARGETS = (2.5, 3.0, 3.25, 3.5, 4.25)
DAMP = QuantizeOptions.damp        # quantize --damp's default
TUNE_BATCH = QuantizeOptions.tune_batch     # quantize --tune-batch's default
FISHER_SAMPLES = QuantizeOptions.fisher_samples     # quantize --fisher-samples' default
UNNAMED_BATCH = 8                  # the windows a tuning step of the runs named without -bB took (before --tune-batch)
NSAMPLES = 128                     # calibration windows of the targets' protocol (128 x 512 from c4_calib.txt)
UNIFORM = ("gptq-mse-w2-g128", "gptq-mse-w3-g128", "gptq-mse-w4-g128")


def bitsmith(*args: str) -> None:
    exe = Path(sys.executable).parent / "bitsmith"
    subprocess.run([str(exe), *args], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def portable(value, work: str | None = None):
    """`value` (a run's JSON) with machine paths made relative: this checkout's to the repository root, ../shared
    as such, the run's temporary output as OUT; the results then read the same wherever they were made."""
    if isinstance(value, dict):
        return {k: portable(v, work) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, work) for v in value]
    if isinstance(value, str):
        if work:
            value = value.replace(f"{work}/out", "OUT")
        return value.replace(f"{SHARED.resolve()}/", "../shared/").replace(f"{ROOT}/", "")
    return value


def held_out(model: str, json_path: Path) -> dict:
    bitsmith("eval", model, "--data", str(HELD_OUT), "--seqlen", "2048", "--max-tokens", "16384",
             "--json", str(json_path))
    return json.loads(json_path.read_text())


def wikitext(model: str, json_path: Path) -> dict:
    bitsmith("eval", model, "--data", str(TEXT / "wikitext2_test.txt"), "--seqlen", "2048", "--max-tokens", "65536",
             "--json", str(json_path))
    return json.loads(json_path.read_text())


FULL_MENU = ",".join(TECHNIQUES)


def method(proxy: str, rounding: str, iters: int, sequential: bool = False, menu: str = FULL_MENU,
           tune: tuple[int, float, int, int, float, int] = (0, 1e-3, TUNE_BATCH, 0, 0.0, 0), rotate: bool = False,
           damp: float = DAMP, own: bool = False, nsamples: int = NSAMPLES, seed: int = 0) -> str:
    """The name of a plan run's method: rotated+ for --rotate, the proxy, the rounding when it is not GPTQ's,
    +tuneE-lrL for end-to-end tuning (-bB when its windows per step are not 8, the runs' before --tune-batch; -sL
    for --tune-seqlen L; -rR for --tune-resample R; -tuneselfN for --tune-self N), -ts
    for --true-sequential, -dampD when the damping is not the default, -self when half the calibration windows are
    sampled from the model, -nN when there are N calibration windows rather than 128, -seedS when the calibration
    seed is not 0, the menu when it is not the whole one (menu-uniform+lut)."""
    name = {"gptq": proxy, "signround": f"{proxy}+signround{iters}"}.get(rounding, f"{proxy}+{rounding}")
    name = ("rotated+" if rotate else "") + name + (f"+tune{tune[0]}-lr{tune[1]:g}" if tune[0] else "")
    name += f"-b{tune[2]}" if tune[0] and tune[2] != UNNAMED_BATCH else ""
    name += f"-s{tune[3]}" if tune[0] and tune[3] else ""
    name += f"-r{tune[4]:g}" if tune[0] and tune[4] else ""
    name += f"-tuneself{tune[5]}" if tune[0] and tune[5] else ""
    return (name + ("-ts" if sequential else "") + ("" if damp == DAMP else f"-damp{damp:g}")
            + ("-self" if own else "") + ("" if nsamples == NSAMPLES else f"-n{nsamples}")
            + (f"-seed{seed}" if seed else "") + ("" if menu == FULL_MENU else "-menu-" + menu.replace(",", "+")))


def run(target: float, proxy: str, rounding: str = "gptq", iters: int = 0, sequential: bool = False,
        menu: str = FULL_MENU, tune: tuple[int, float, int, int, float, int] = (0, 1e-3, TUNE_BATCH, 0, 0.0, 0),
        rotate: bool = False,
        damp: float = DAMP, own: bool = False, nsamples: int = NSAMPLES, fisher_samples: int = FISHER_SAMPLES,
        seed: int = 0) -> None:
    with tempfile.TemporaryDirectory() as work:
        out, summary_path = f"{work}/out", Path(work) / "summary.json"
        reuse = ["--measurement", str(MEASUREMENT)] if MEASUREMENT.exists() else []
        busy_before, started = busy_seconds(), time.monotonic()
        bitsmith("quantize", "smollm2-135m", "-o", out, "--target-bpw", str(target), "--proxy", proxy, *reuse,
                 "--rounding", rounding, *(["--rounding-iters", str(iters)] if rounding == "signround" else []),
                 *(["--true-sequential"] if sequential else []), "--menu", menu,
                 "--tune-epochs", str(tune[0]), "--tune-lr", str(tune[1]), "--tune-batch", str(tune[2]),
                 "--tune-seqlen", str(tune[3]), "--tune-resample", str(tune[4]), "--tune-self", str(tune[5]),
                 *(["--rotate"] if rotate else []),
                 "--damp", str(damp),
                 "--calib", str(TEXT / "c4_calib.txt"), *(["--calib", "self"] if own else []),
                 "--nsamples", str(nsamples), "--seqlen", "512", "--seed", str(seed), "--fisher-samples", str(fisher_samples),
                 "--json", str(summary_path))
        summary = json.loads(summary_path.read_text())
        summary["others_busy"] = others_busy(busy_before, started, summary["cpu_seconds"])
        summary["eval"] = wikitext(out, Path(work) / "wikitext.json")
        if not reuse:
            measured = json.loads((Path(out) / "measurement.json").read_text())
            MEASUREMENT.write_text(json.dumps(portable(measured), indent=1) + "\n")
        summary["held_out"] = held_out(out, Path(work) / "held.json")
        summary["plan"] = json.loads((Path(out) / "plan.json").read_text())["layers"]
    name = method(proxy, rounding, iters, sequential, menu, tune, rotate, damp, own, nsamples, seed)
    summary.update(date=datetime.date.today().isoformat(), proxy=proxy, rounding=rounding, rounding_iters=iters,
                   method=name, menu=menu, tune_epochs=tune[0], tune_lr=tune[1],
                   tune_batch=tune[2], tune_seqlen=tune[3], tune_resample=tune[4], tune_self=tune[5], rotate=rotate, damp=damp,
                   self_calibration=own, nsamples=nsamples, seed=seed,
                   measured_here=not reuse, cpu=cpu_label())
    (RUNS / f"{name}-t{target}.json").write_text(json.dumps(portable(summary, work), indent=1) + "\n")
    print(name, target, summary["bits_per_weight"], summary["eval"]["perplexity"], flush=True)


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot, every core (psutil's times less idle and waiting
    for I/O; guest time is already inside user time)."""
    t = psutil.cpu_times()
    return sum(t) - sum(getattr(t, name, 0.0) for name in ("idle", "iowait", "guest", "guest_nice"))


def others_busy(busy_before: float, started: float, own_cpu_seconds: float) -> float:
    """Cores' worth of CPU time everything but the quantizing process spent while it ran: about 0 when the
    machine was otherwise idle, about 1 when the other core was busy throughout."""
    return max(0.0, busy_seconds() - busy_before - own_cpu_seconds) / (time.monotonic() - started)


def peers() -> dict[str, list[tuple[float, float, str]]]:
    """(bpw, WikiText-2 perplexity, setting) of llama.cpp (with an importance matrix) and AutoRound, read from
    the tables of ../shared/research/baselines.md."""
    text = (SHARED / "research" / "baselines.md").read_text()
    found = {"llama.cpp (imatrix)": [], "AutoRound": []}
    for name, bpw, ppl in re.findall(r"^\| (smol-\S+-imat) \| ([\d.]+) \| ([\d.]+) \|$", text, re.MULTILINE):
        found["llama.cpp (imatrix)"].append((float(bpw), float(ppl), name))
    for setting, iters, bpw, ppl in re.findall(r"^\| (W\d g128 asym) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|", text,
                                               re.MULTILINE):
        found["AutoRound"].append((float(bpw), float(ppl), f"{setting}, {iters} iters"))
    return found


def stored() -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*-t*.json"))]
    for r in runs:
        r.setdefault("method", r["proxy"])
    return runs


def calibration(measurement: dict | None) -> str:
    """The calibration of a folder's runs as its measurement records it (files by name): 128 windows of c4_calib.txt,
    or half of them sampled from the model (--self); and whose next tokens its Fisher is of."""
    recorded = (measurement or {}).get("calibration", "")
    labels = (measurement or {}).get("fisher", {}).get("labels", "data")
    fisher = (" the Fisher of labels drawn from the model (`--fisher-labels model`)" if labels == "model" else
              " the Fisher of the text's own next tokens (`--fisher-labels data`)")
    windows = (measurement or {}).get("fisher", {}).get("windows", FISHER_SAMPLES)
    fisher += "" if windows == FISHER_SAMPLES else f" on {windows} windows (`--fisher-samples {windows}`)"
    if "sampled" not in recorded:
        return "Calibration 128 x 512 from c4_calib.txt (seed 0);" + fisher
    return "Calibration " + re.sub(r"\S*/([^/\s]+\.txt)", r"\1", recorded) + " (`--calib self`);" + fisher


def report() -> str:
    runs = sorted(stored(), key=lambda r: (r["method"], r["target_bits_per_weight"]))
    uniform = {r["config"]: r for r in json.loads((RESULTS / "quality-smollm2.json").read_text())}
    base_held = json.loads((RUNS / "base-held-out.json").read_text()) if (RUNS / "base-held-out.json").exists() \
        else None
    dates = sorted({r["date"] for r in runs})
    menu = json.loads(MEASUREMENT.read_text()) if MEASUREMENT.exists() else None
    lines = ["# Bit plan: SmolLM2-135M", "",
             (f"Menu: the {len(menu['candidates'])} candidates of a format-{menu['format_version']} measurement "
              f"({RUNS.name}/measurement.json)." if menu else "Menu: as each run's measurement had it."), "",
             (f"Measured {', '.join(dates)} with `python bench/plan.py` on x86_64 (2 cores, one torch thread per "
              "run; CPU seconds are the one-core cost, wall seconds an upper bound; \"others\" is the cores' worth "
              "of CPU time everything else on the machine took while it quantized (about 0: otherwise idle; about 1: "
              "the other core busy), where recorded; "
              "the CPU, where recorded, is the last column: learned rounding and tuning follow it, a tuning step "
              "taking 5.4 s on the Xeon with AMX against 8.2 on the EPYC). "
              + calibration(menu) + "; WikiText-2 test, first 65,536 tokens at seqlen 2048; held-out: the bundled "
              "EB1911 text, 16,384 tokens"
              + (f" (base {base_held['perplexity']:.2f})" if base_held else "") + ". All-in bpw over the 210 "
              "decoder linears (codes, scales, zeros, g_idx, outliers, tables, codebooks). Loss increase in nats per token: predicted by the "
              "measurement; measured on the Fisher calibration windows (as `quantize` reports it) and as "
              "log(ppl / base ppl) on WikiText-2. The first run's time includes the measurement."), "",
             ("| plan | target bpw | all-in bpw | WikiText-2 ppl | held-out ppl | nats predicted / calib / WikiText-2 "
              "| measure CPU s | quantize CPU s (wall) | peak RSS MB | others | CPU |"), "|---" * 11 + "|"]
    base = uniform["bf16"]["perplexity"]
    for r in runs:
        measured = math.log(r["eval"]["perplexity"] / base)
        calib = f"{r['measured_error']['nats_per_token']:.3f}" if r.get("measured_error") else "-"
        measure_s = f"{r['measure_cpu_seconds']:.0f}" if r.get("measured_here") else "(reused)"
        lines.append(f"| {r['method']} | {r['target_bits_per_weight']} | {r['bits_per_weight']:.3f} | "
                     f"{r['eval']['perplexity']:.2f} | {r['held_out']['perplexity']:.2f} | "
                     f"{r['predicted_error']:.3f} / {calib} / {measured:.3f} | {measure_s} | "
                     f"{r['cpu_seconds']:.0f} ({r['seconds']:.0f}) | {r['peak_rss_bytes'] / 2**20:.0f} | "
                     + (f"{r['others_busy']:.2f}" if "others_busy" in r else "-") + f" | {r.get('cpu', '-')} |")
    own = any(r.get("self_calibration") for r in runs)
    lines += ["", ("Uniform GPTQ (mse grid, bench/results/quality-smollm2.md) at the nearest settings"
                   + (", calibrated on 128 windows of c4_calib.txt alone (the plans above on the file and the "
                      "model's samples)" if own else "") + ":"), "",
              "| config | all-in bpw | WikiText-2 ppl |", "|---|---|---|"]
    lines += [f"| {u} | {uniform[u]['bits_per_weight']:.3f} | {uniform[u]['perplexity']:.2f} |"
              for u in UNIFORM if u in uniform]
    lines += ["", "Techniques the plans picked: linears in all, and per layer type (30 linears of each type):", "",
              ("| plan | target bpw | uniform grid (2, 3, 4, 8 bits) | 5 or 6 bits | outliers | lookup table | "
               "per input channel | codebooks of pairs | bits per group of columns | double-quantized scales |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['target_bits_per_weight']} | {' | '.join(picks(r['plan']))} |" for r in runs]
    lines += ["", ("Caveat: the SmolLM2 weights are the GGUF Q4_1 model dequantized (4-bit, groups of 32): 4-bit "
              "groups of 32 reproduce them almost exactly, which flatters every 4-bit g32 choice on this model.")]
    plot(runs, uniform)
    return "\n".join(lines) + "\n"


def picks(plan: dict) -> list[str]:
    """For each technique (TECHNIQUES: uniform grid, 5 or 6 bits, outliers, lookup table, per-input-channel grids,
    codebooks of pairs, bits per group of columns, double-quantized scales):
    how many linears the plan gives it, and of which types ("210", "42: down 30, o 12")."""
    kinds: list[dict[str, int]] = [{} for _ in TECHNIQUES]
    for name, entry in plan.items():
        layer = LayerPlan(entry["bits"], entry["group_size"], entry["sym"], outliers=entry.get("outliers", 0.0),
                          **{key: entry.get(key, False) for key in FLAGS})
        technique = TECHNIQUES.index(layer.technique)
        kind = name.rsplit(".", 1)[-1].removesuffix("_proj")
        kinds[technique][kind] = kinds[technique].get(kind, 0) + 1
    cells = []
    for counts in kinds:
        total = sum(counts.values())
        mixed = 0 < total < len(plan)
        cells.append(f"{total}" + (": " + ", ".join(f"{k} {n}" for k, n in counts.items()) if mixed else ""))
    return cells


def plot(runs: list[dict], uniform: dict) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib missing: no plot (pip install 'bitsmith[plot]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in sorted({r["method"] for r in runs}):
        pts = sorted((r["bits_per_weight"], r["eval"]["perplexity"]) for r in runs if r["method"] == name)
        ax.plot(*zip(*pts), "o-", label=f"bitsmith plan ({name})")
    for prefix, label in (("gptq-mse-w", "uniform GPTQ (mse)"), ("rtn-w", "uniform RTN")):
        pts = sorted((r["bits_per_weight"], r["perplexity"]) for name, r in uniform.items()
                     if name.startswith(prefix) and name.endswith("g128"))
        ax.plot(*zip(*pts), "s--", label=label)
    for name, pts in peers().items():
        if pts:
            ax.plot(*zip(*sorted((b, p) for b, p, _ in pts)), "^:", label=name)
    ax.axhline(uniform["bf16"]["perplexity"], color="grey", lw=0.8, label="base (Q4_1 dequantized)")
    ax.set(xlabel="all-in bits per weight (decoder linears)", ylabel="WikiText-2 perplexity", yscale="log",
           title="SmolLM2-135M: perplexity against bits per weight")
    ax.set_ylim(top=1000)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{RUNS.name}.png", dpi=120)


def main() -> None:
    global RUNS, MEASUREMENT
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=float, nargs="*", default=list(TARGETS))
    ap.add_argument("--proxy", choices=("fisher", "hessian"), default="fisher")
    ap.add_argument("--rounding", choices=("gptq", "gptaq", "signround"), default="gptq")
    ap.add_argument("--rounding-iters", type=int, default=50)
    ap.add_argument("--true-sequential", action="store_true")
    ap.add_argument("--menu", default=FULL_MENU, help="Techniques the plan may choose from (quantize --menu).")
    ap.add_argument("--tune-epochs", type=int, default=0, help="quantize --tune-epochs (end-to-end tuning).")
    ap.add_argument("--tune-lr", type=float, default=1e-3)
    ap.add_argument("--tune-batch", type=int, default=TUNE_BATCH, help="quantize --tune-batch (windows per step).")
    ap.add_argument("--tune-seqlen", type=int, default=0,
                    help="quantize --tune-seqlen (tuning on calibration windows joined to this length).")
    ap.add_argument("--tune-resample", type=float, default=0.0,
                    help="quantize --tune-resample (a share of the tokens of later passes drawn from the model).")
    ap.add_argument("--tune-self", type=int, default=0,
                    help="quantize --tune-self (windows sampled from the model that tuning alone reads).")
    ap.add_argument("--rotate", action="store_true", help="quantize --rotate (a rotated model: its own --runs).")
    ap.add_argument("--self", dest="own", action="store_true",
                    help="Half the calibration windows sampled from the model (quantize --calib self next to "
                         "the file; its own --runs: the measurement differs).")
    ap.add_argument("--nsamples", type=int, default=NSAMPLES,
                    help="quantize --nsamples: calibration windows (with --self, half of them sampled).")
    ap.add_argument("--fisher-samples", type=int, default=FISHER_SAMPLES,
                    help="quantize --fisher-samples (windows of the measurement's Fisher: its own --runs).")
    ap.add_argument("--damp", type=float, default=DAMP, help="quantize --damp (the measurement's must match).")
    ap.add_argument("--seed", type=int, default=0,
                    help="quantize --seed: the calibration draw (the protocol's is 0; others measure the spread).")
    ap.add_argument("--report", action="store_true", help="Only rewrite the table and plot from the stored runs.")
    ap.add_argument("--runs", type=Path, default=RUNS,
                    help="Folder of the runs and their measurement.json (a new menu of candidates: a new folder).")
    args = ap.parse_args()
    default, RUNS = RUNS, args.runs.resolve()
    MEASUREMENT = RUNS / "measurement.json"
    RUNS.mkdir(parents=True, exist_ok=True)
    if not args.report:
        if not (RUNS / "base-held-out.json").exists() and (default / "base-held-out.json").exists():
            shutil.copyfile(default / "base-held-out.json", RUNS / "base-held-out.json")   # the same base model
        if not (RUNS / "base-held-out.json").exists():
            base = held_out("smollm2-135m", RUNS / "base-held-out.json")
            (RUNS / "base-held-out.json").write_text(json.dumps(portable(base), indent=1) + "\n")
        for target in args.targets:
            run(target, args.proxy, args.rounding, args.rounding_iters, args.true_sequential, args.menu,
                (args.tune_epochs, args.tune_lr, args.tune_batch, args.tune_seqlen, args.tune_resample, args.tune_self),
                args.rotate,
                args.damp, args.own, args.nsamples, args.fisher_samples, args.seed)
    (RESULTS / f"{RUNS.name}.md").write_text(report())


if __name__ == "__main__":
    main()
