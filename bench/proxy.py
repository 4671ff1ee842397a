"""Which measurement proxy predicts real perplexity best: stories260K plans at several targets under the
Fisher-weighted proxy (predicted nats per token) and the plain output-error ("hessian") proxy, each quantized
and evaluated on held-out text.

    python bench/proxy.py            # writes bench/results/proxy-stories.{json,md}

Calibration: the first 70 % of tinystories_calib.txt (32 x 256, seed 0, Fisher from 16 windows); evaluation:
the remaining 30 % at seqlen 256. One measurement serves every plan. Reported per plan: all-in bpw, held-out
perplexity, the predicted loss increase (Fisher proxy, nats per token) and the measured one, log(ppl / base).
"""
from __future__ import annotations

import datetime
import json
import math
import statistics
import tempfile
from pathlib import Path

import torch

import bitsmith
from bitsmith.calibration import data
from bitsmith.calibration.perplexity import evaluate
from bitsmith.formats.source import open_source
from bitsmith.measure import Measurement, decide
from bitsmith.plan import QuantizeOptions

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "assets" / "models" / "stories260K"
TEXT = ROOT.parent / "shared" / "assets" / "text" / "tinystories_calib.txt"
RESULTS = ROOT / "bench" / "results"
TARGETS = (2.75, 3.0, 3.25, 3.5, 4.0, 4.5)
CALIB = {"nsamples": 32, "seqlen": 256, "seed": 0, "fisher_samples": 16}


def configs(plan) -> dict:
    return {name: (layer.bits, layer.group_size, layer.sym) for name, layer in plan.layers.items()}


def pearson(a: list[float], b: list[float]) -> float:
    return float(torch.corrcoef(torch.tensor([a, b]))[0, 1])


def main() -> None:
    torch.set_num_threads(1)
    text = TEXT.read_text()
    cut = text.index("\n", int(len(text) * 0.7))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "calib.txt").write_text(text[:cut])
        (work / "eval.txt").write_text(text[cut:])
        calib, held = [str(work / "calib.txt")], str(work / "eval.txt")
        windows = data.eval_windows(data.tokenize(open_source(str(MODEL)).tokenizer(), text[cut:]), 256)
        base = evaluate(bitsmith.load(str(MODEL)), windows, progress=False)["perplexity"]
        first = bitsmith.quantize(str(MODEL), str(work / "m"), target_bpw=TARGETS[0], calib=calib, **CALIB,
                                  progress=False)
        opts = QuantizeOptions(calib=calib, **CALIB)
        opts.validate()
        measurement = Measurement.load(str(work / "m" / "measurement.json"), open_source(str(MODEL)), opts)
        for proxy in ("fisher", "hessian"):
            for target in TARGETS:
                plan = decide(measurement, target, opts, proxy)
                (work / "plan.json").write_text(json.dumps(plan.as_dict()))
                out = work / f"{proxy}-{target}"
                s = bitsmith.quantize(str(MODEL), str(out), plan=str(work / "plan.json"), calib=calib, **CALIB,
                                      eval_data=held, eval_seqlen=256, progress=False)
                fisher_plan = decide(measurement, target, opts, "fisher")
                predicted = sum(measurement.errors["fisher"][name][measurement.candidates.index(
                    type(layer)(layer.bits, layer.group_size, layer.sym))] for name, layer in plan.layers.items())
                rows.append({"proxy": proxy, "target": target, "bpw": s["bits_per_weight"],
                             "perplexity": s["eval"]["perplexity"], "predicted_nats": predicted,
                             "measured_nats": math.log(s["eval"]["perplexity"] / base),
                             "same_plan_as_fisher": configs(plan) == configs(fisher_plan)})
                print(rows[-1], flush=True)
    fisher = [r for r in rows if r["proxy"] == "fisher"]
    result = {"date": datetime.date.today().isoformat(), "base_perplexity": base, "measure_seconds":
              first["measure_seconds"], "rows": rows,
              "pearson_predicted_measured": pearson([r["predicted_nats"] for r in rows],
                                                    [r["measured_nats"] for r in rows]),
              "mean_ratio_measured_to_predicted": statistics.mean(r["measured_nats"] / r["predicted_nats"]
                                                                  for r in fisher)}
    (RESULTS / "proxy-stories.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Measurement proxies: stories260K", "",
             (f"Measured {result['date']} with `python bench/proxy.py` (one torch thread). One measurement "
              "(first 70 % of tinystories_calib.txt, 32 x 256, Fisher from 16 windows), plans under each proxy, "
              f"held-out perplexity on the last 30 % at seqlen 256 (base {base:.3f}). Predicted: the Fisher "
              "proxy's sum over the plan's choices (nats per token); measured: log(ppl / base)."), "",
             "| target bpw | proxy | all-in bpw | held-out ppl | predicted nats | measured nats | same plan as fisher |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["target"], r["proxy"])):
        lines.append(f"| {r['target']} | {r['proxy']} | {r['bpw']:.3f} | {r['perplexity']:.3f} | "
                     f"{r['predicted_nats']:.4f} | {r['measured_nats']:.4f} | {r['same_plan_as_fisher']} |")
    wins = sum(f["perplexity"] < h["perplexity"] for f, h in zip(fisher, [r for r in rows if r["proxy"] == "hessian"]))
    lines += ["", (f"Fisher plans beat the plain-error plans at {wins} of {len(TARGETS)} targets. Pearson correlation "
              f"of predicted and measured nats over all plans: {result['pearson_predicted_measured']:.3f}; "
              f"measured / predicted on the Fisher plans: {result['mean_ratio_measured_to_predicted']:.2f} on "
              "average.")]
    (RESULTS / "proxy-stories.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
