"""`bitsmith compress` and `bitsmith decompress`: lossless BF16 checkpoints (formats/dfloat/)."""
from __future__ import annotations

import time

import click

from ..formats import dfloat
from .app import Report, json_option, main


@main.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option("--window-bits", type=int, default=dfloat.WINDOW_BITS, show_default=True,
              help="Bits per independently decodable window of the exponent stream (a multiple of 32).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@json_option("the summary")
def compress(model, out, window_bits, overwrite, json_path):
    """Entropy-code the BF16 tensors of MODEL (a folder of safetensors) into OUT, bit for bit recoverable."""
    if window_bits < 32 or window_bits % 32:
        raise click.BadParameter(f"{window_bits} is not a positive multiple of 32", param_hint="--window-bits")
    started = time.perf_counter()
    s = dfloat.compress_checkpoint(model, out, overwrite=overwrite, window_bits=window_bits, progress=True)
    seconds = time.perf_counter() - started
    report = Report(json_path)
    dtypes = ", ".join(f"{d} x{n}" for d, n in sorted(s["source_dtypes"].items()))
    report.table(f"compress {model} -> {out}", [*_rows(s, seconds), ("source tensors", dtypes)])
    if not s["coded"]:
        report.note("note: nothing was coded: only BF16 tensors are entropy-coded (those here are "
                    f"{'too small to gain' if 'BF16' in s['source_dtypes'] else 'not BF16'}); "
                    "casting to BF16 first would shrink the model, but not losslessly")
    report.json({"model": model, "out": out, **s, "seconds": seconds})


@main.command()
@click.argument("path", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="Output folder of plain safetensors.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@json_option("the summary")
def decompress(path, out, overwrite, json_path):
    """Decode every coded tensor of PATH into plain safetensors in OUT (each checked against its sha256)."""
    started = time.perf_counter()
    s = dfloat.decompress_checkpoint(path, out, overwrite=overwrite, progress=True)
    seconds = time.perf_counter() - started
    rows = _rows(s, seconds)
    if s["identical_files"]:
        rows.append(("files", "as before compression, byte for byte (sha256 checked)"))
    report = Report(json_path)
    report.table(f"decompress {path} -> {out}", rows)
    report.json({"path": path, "out": out, **s, "seconds": seconds})


def _rows(s: dict, seconds: float) -> list[tuple[str, str]]:
    ratio = s["output_bytes"] / s["source_bytes"] if s["source_bytes"] else 1.0
    return [("tensors (coded)", f"{s['tensors']} ({s['coded']})"),
            ("safetensors bytes in", f"{s['source_bytes']:,}"),
            ("safetensors bytes out", f"{s['output_bytes']:,} ({100 * ratio:.2f} % of in)"),
            ("time", f"{seconds:.2f} s")]
