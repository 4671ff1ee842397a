"""`bitsmith compress` and `bitsmith decompress`: lossless BF16 checkpoints (formats/dfloat/)."""
from __future__ import annotations

import time

import click

from ..formats import dfloat


@click.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option("--window-bits", type=int, default=dfloat.WINDOW_BITS, show_default=True,
              help="Bits per independently decodable window of the exponent stream (a multiple of 32).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def compress(model, out, window_bits, overwrite):
    """Entropy-code the BF16 tensors of MODEL (a folder of safetensors) into OUT, bit for bit recoverable."""
    if window_bits < 32 or window_bits % 32:
        raise click.BadParameter(f"{window_bits} is not a positive multiple of 32", param_hint="--window-bits")
    started = time.perf_counter()
    s = dfloat.compress_checkpoint(model, out, overwrite=overwrite, window_bits=window_bits, progress=True)
    _report(f"compress {model} -> {out}", s, time.perf_counter() - started)
    dtypes = ", ".join(f"{d} x{n}" for d, n in sorted(s["source_dtypes"].items()))
    click.echo(f"  {'source tensors':<22} {dtypes}")
    if not s["coded"]:
        click.echo("note: nothing was coded: only BF16 tensors are entropy-coded (those here are "
                   f"{'too small to gain' if 'BF16' in s['source_dtypes'] else 'not BF16'}); "
                   "casting to BF16 first would shrink the model, but not losslessly")


@click.command()
@click.argument("path", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="Output folder of plain safetensors.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def decompress(path, out, overwrite):
    """Decode every coded tensor of PATH into plain safetensors in OUT (each checked against its sha256)."""
    started = time.perf_counter()
    s = dfloat.decompress_checkpoint(path, out, overwrite=overwrite, progress=True)
    _report(f"decompress {path} -> {out}", s, time.perf_counter() - started)
    if s["identical_files"]:
        click.echo(f"  {'files':<22} as before compression, byte for byte (sha256 checked)")


def _report(title: str, s: dict, seconds: float) -> None:
    ratio = s["output_bytes"] / s["source_bytes"] if s["source_bytes"] else 1.0
    rows = [("tensors (coded)", f"{s['tensors']} ({s['coded']})"),
            ("safetensors bytes in", f"{s['source_bytes']:,}"),
            ("safetensors bytes out", f"{s['output_bytes']:,} ({100 * ratio:.2f} % of in)"),
            ("time", f"{seconds:.2f} s")]
    click.echo(title)
    for k, v in rows:
        click.echo(f"  {k:<22} {v}")
