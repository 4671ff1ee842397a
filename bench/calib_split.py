"""What learned rounding and tuning learn beyond their calibration windows, within the calibration text's own
domain: c4_calib.txt split at a line boundary near 80 % of its characters; each setting calibrates on the first
part (128 x 512, seed 0) and is evaluated on the second, which it never saw, in windows of 512 (as calibrated),
next to the loss on the first part (the text its windows came from) and WikiText-2. It tells
overfitting (the unseen C4 text gains little of what the calibration windows gain) from a change of domain
(unseen C4 gains as much, WikiText-2 less). No evaluation text is used to choose anything.

    python bench/calib_split.py [--target 3.25] [--settings gptq tune1 ...] [--self] [--measurement DIR]

Every run re-plans from a stored measurement (`--measurement`, a folder of bench/results; plan-smollm2-vq by
default), one torch thread; with `--self` half the calibration windows are sampled from the model (`--calib
self`, next to the first part's). Writes bench/results/calib-split-smollm2.{json,md} (runs of earlier
invocations kept). The measurement read the protocol's windows of the whole file, so a plan may have seen some of
the second part's statistics through it; the learned rounding and tuning compared here never do.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import tempfile
from pathlib import Path

from machine import cpu_label
from plan import HELD_OUT, RESULTS, TEXT, bitsmith

from bitsmith.calibration import data
from bitsmith.formats.source import open_source

MEASUREMENT = "plan-smollm2-vq"
OUT = RESULTS / "calib-split-smollm2"
SPLIT = 0.8
SETTINGS = {
    "gptq": [],
    "tune1": ["--tune-epochs", "1", "--tune-lr", "3e-3"],
    "tune1-b2": ["--tune-epochs", "1", "--tune-lr", "3e-3", "--tune-batch", "2"],
    "signround50": ["--rounding", "signround", "--rounding-iters", "50"],
    "signround50+tune1": ["--rounding", "signround", "--rounding-iters", "50", "--tune-epochs", "1",
                          "--tune-lr", "3e-3"],
}
RECIPE = ["--rounding", "gptaq", "--true-sequential", "--tune-epochs", "2"]     # the menu's recipe, two passes
SETTINGS.update({f"recipe-lr{lr}": [*RECIPE, "--tune-lr", lr] for lr in ("1.5e-3", "3e-3", "6e-3")})


def split(text: str, at: float = SPLIT) -> tuple[str, str]:
    """The text cut after the line that ends nearest before `at` of its characters."""
    cut = text.rfind("\n", 0, int(len(text) * at)) + 1
    return text[:cut], text[cut:]


def perplexity(model: str, text: Path, seqlen: int, work: Path, max_tokens: int | None = None) -> dict:
    path = work / f"eval-{text.stem}-{seqlen}.json"
    bitsmith("eval", model, "--data", str(text), "--seqlen", str(seqlen),
             *(["--max-tokens", str(max_tokens)] if max_tokens else []), "--json", str(path))
    return json.loads(path.read_text())


def texts(work: Path) -> tuple[Path, Path]:
    seen, unseen = split((TEXT / "c4_calib.txt").read_text())
    paths = work / "c4_seen.txt", work / "c4_unseen.txt"
    for path, part in zip(paths, (seen, unseen)):
        path.write_text(part)
    return paths


def base(work: Path, seen: Path, unseen: Path) -> dict:
    tokenizer = open_source("smollm2-135m").tokenizer()
    return {"unseen_tokens": len(data.tokenize(tokenizer, unseen.read_text())),
            "seen": perplexity("smollm2-135m", seen, 512, work)["perplexity"],
            "unseen": perplexity("smollm2-135m", unseen, 512, work)["perplexity"],
            "wikitext2": perplexity("smollm2-135m", TEXT / "wikitext2_test.txt", 2048, work, 65536)["perplexity"],
            "held_out": perplexity("smollm2-135m", HELD_OUT, 2048, work, 16384)["perplexity"]}


def run(setting: str, target: float, seen: Path, unseen: Path, work: Path, own: bool, measurement: str) -> dict:
    out = work / setting
    bitsmith("quantize", "smollm2-135m", "-o", str(out), "--target-bpw", str(target), "--measurement",
             str(RESULTS / measurement / "measurement.json"), *SETTINGS[setting], "--calib", str(seen),
             *(["--calib", "self"] if own else []), "--nsamples", "128", "--seqlen", "512", "--seed", "0",
             "--json", str(work / "summary.json"))
    summary = json.loads((work / "summary.json").read_text())
    return {"setting": setting, "target": target, "args": SETTINGS[setting], "self": own,
            "measurement": measurement,
            "seen": perplexity(str(out), seen, 512, work)["perplexity"],
            "unseen": perplexity(str(out), unseen, 512, work)["perplexity"],
            "wikitext2": perplexity(str(out), TEXT / "wikitext2_test.txt", 2048, work, 65536)["perplexity"],
            "held_out": perplexity(str(out), HELD_OUT, 2048, work, 16384)["perplexity"],
            "cpu_seconds": summary["cpu_seconds"], "date": datetime.date.today().isoformat(), "cpu": cpu_label()}


def report(result: dict) -> str:
    b = result["base"]
    lines = ["# Calibration windows against unseen text of the same kind: SmolLM2-135M", "",
             (f"`python bench/calib_split.py`. c4_calib.txt split at {SPLIT:.0%} of its characters: calibration "
              f"128 x 512 (seed 0) from the first part, the second ({b['unseen_tokens']:,} tokens) never seen. "
              "Every run re-plans from a stored measurement (the plan-smollm2-vq one where the row names none); "
              "\"+ self\": 64 windows of the first part and 64 sampled from the model. Loss increase in nats per token over the "
              "unquantized model (perplexity in brackets): on the first part in windows of 512 (the text the "
              "calibration windows come from; they cover 76 % of its tokens), on the second in windows of "
              "512, on WikiText-2 test (65,536 tokens at 2048) and on the bundled EB1911 text (16,384 tokens at "
              f"2048). Base perplexities: seen C4 {b['seen']:.2f}, unseen C4 {b['unseen']:.2f}, WikiText-2 "
              f"{b['wikitext2']:.2f}, EB1911 {b['held_out']:.2f}."), "",
             "| setting | target bpw | seen C4 | unseen C4 | WikiText-2 | EB1911 | quantize CPU s | CPU | date |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        gap = {k: math.log(r[k] / b[k]) for k in ("seen", "unseen", "wikitext2", "held_out")}
        name = r["setting"] + (" + self" if r.get("self") else "") + (
            f" ({r['measurement']})" if r.get("measurement", MEASUREMENT) != MEASUREMENT else "")
        lines.append(f"| {name} | {r['target']} | {gap['seen']:.3f} ({r['seen']:.2f}) | {gap['unseen']:.3f} "
                     f"({r['unseen']:.2f}) | {gap['wikitext2']:.3f} ({r['wikitext2']:.2f}) | {gap['held_out']:.3f} "
                     f"({r['held_out']:.2f}) | {r['cpu_seconds']:,.0f} | {r['cpu']} | {r['date']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", type=float, default=3.25)
    ap.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["gptq", "tune1"])
    ap.add_argument("--self", dest="own", action="store_true",
                    help="Half the calibration windows sampled from the model (quantize --calib self).")
    ap.add_argument("--measurement", default=MEASUREMENT,
                    help="The folder of bench/results whose measurement.json the runs re-plan from.")
    args = ap.parse_args()
    path = OUT.with_suffix(".json")
    result = json.loads(path.read_text()) if path.exists() else {"runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seen, unseen = texts(work)
        if not result.get("base"):
            result["base"] = base(work, seen, unseen)
        for setting in args.settings:
            r = run(setting, args.target, seen, unseen, work, args.own, args.measurement)
            key = lambda x: (x["setting"], x["target"], x.get("self", False), x.get("measurement", MEASUREMENT))
            result["runs"] = [x for x in result["runs"] if key(x) != key(r)]
            result["runs"].append(r)
            path.write_text(json.dumps(result, indent=1) + "\n")
            OUT.with_suffix(".md").write_text(report(result))
            print(setting, args.target, r["seen"], r["unseen"], r["wikitext2"], flush=True)


if __name__ == "__main__":
    main()
