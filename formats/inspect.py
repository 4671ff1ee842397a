"""What a bitsmith checkpoint holds, per layer: shape, bits, group size, all-in bits per weight, bytes."""
from __future__ import annotations

from . import dfloat
from .checkpoint import Checkpoint
from .errors import InputError

QUANT_PARTS = ("qweight", "scales", "qzeros", "g_idx", "channel_scale", "group_scale", "group_zero")


def layer_table(path) -> tuple[list[dict], dict]:
    ckpt = Checkpoint(path)
    if ckpt.manifest is None:
        raise InputError(f"{path}: no bitsmith manifest (not a finished bitsmith checkpoint)")
    layers = ckpt.manifest.get("plan", {}).get("layers", {})
    coded = [dfloat.describe(n, meta) for n, meta in sorted(ckpt.coded.items())]
    sizes = {name: ckpt.nbytes(name) for name in ckpt.keys()}
    sizes.update({c["name"]: c["coded_bytes"] for c in coded})
    rows, counted = [], set()
    for name, plan in layers.items():
        parts = [f"{name}.{p}" for p in QUANT_PARTS if f"{name}.{p}" in sizes]
        nbytes = sum(sizes[p] for p in parts)
        counted.update(parts)
        out_f, in_f = plan["shape"]
        rows.append({"name": name, "shape": [out_f, in_f], "bits": plan["bits"], "group_size": plan["group_size"],
                     "bpw": 8 * nbytes / (out_f * in_f), "bytes": nbytes})
    weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    quantized_bytes = sum(r["bytes"] for r in rows)
    other = {n: b for n, b in sizes.items() if n not in counted}
    totals = {"coded": coded, "layers": len(rows), "bpw": 8 * quantized_bytes / max(weights, 1), "quantized_bytes": quantized_bytes,
              "other_tensors": len(other), "other_bytes": sum(other.values()),
              "total_bytes": quantized_bytes + sum(other.values())}
    return rows, totals
