"""What a bitsmith checkpoint holds, per layer: shape, the plan's choice (bits, group size, symmetry) and
predicted error, the GPTQ loss of the run, all-in bits per weight and bytes."""
from __future__ import annotations

from . import dfloat
from .checkpoint import Checkpoint
from .errors import InputError

QUANT_PARTS = ("qweight", "scales", "qzeros", "g_idx", "channel_scale", "group_scale", "group_zero")


def layer_table(path) -> tuple[list[dict], dict]:
    ckpt = Checkpoint(path)
    if ckpt.manifest is None:
        raise InputError(f"{path}: no bitsmith manifest (not a finished bitsmith checkpoint)")
    plan = _object(ckpt.manifest.get("plan", {}), "plan")
    entries = _object(plan.get("layers", {}), "plan layers")
    layers = _object(ckpt.manifest.get("layers", {}), "layers")
    coded = [dfloat.describe(n, meta) for n, meta in sorted(ckpt.coded.items())]
    sizes = {name: ckpt.nbytes(name) for name in ckpt}
    sizes.update({c["name"]: c["coded_bytes"] for c in coded})
    rows, counted = [], set()
    for name, report in layers.items():
        parts = [f"{name}.{p}" for p in QUANT_PARTS if f"{name}.{p}" in sizes]
        nbytes = sum(sizes[p] for p in parts)
        counted.update(parts)
        entry = _object(entries.get(name), f"plan entry of {name}")
        try:
            out_f, in_f = (int(n) for n in report["shape"])
            row = {"name": name, "shape": [out_f, in_f], "bits": int(entry["bits"]),
                   "group_size": int(entry["group_size"]), "sym": bool(entry.get("sym", False)),
                   "predicted_error": entry.get("predicted_error"), "loss": float(report["loss"]),
                   "bpw": 8 * nbytes / max(out_f * in_f, 1), "bytes": nbytes}
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: manifest entry of {name} is malformed ({type(e).__name__}: {e})") from None
        rows.append(row)
    weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    quantized_bytes = sum(r["bytes"] for r in rows)
    other = {n: b for n, b in sizes.items() if n not in counted}
    predicted = [r["predicted_error"] for r in rows]
    totals = {"coded": coded, "layers": len(rows), "target_bpw": plan.get("target_bpw"),
              "predicted_error": None if None in predicted or not rows else sum(predicted), "bpw": 8 * quantized_bytes / max(weights, 1), "quantized_bytes": quantized_bytes,
              "other_tensors": len(other), "other_bytes": sum(other.values()),
              "total_bytes": quantized_bytes + sum(other.values())}
    return rows, totals


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"manifest: {what} is not an object")
    return value
