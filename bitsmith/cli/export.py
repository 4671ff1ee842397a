"""`bitsmith export`: a quantized checkpoint in another loader's format (bitsmith/pack_quantized.py)."""
from __future__ import annotations

import time

import click

from .. import gptq_formats, pack_quantized
from .app import Report, json_option, main


@main.command(name="export")
@click.argument("path", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option("--format", "fmt", type=click.Choice([*gptq_formats.FORMATS, *pack_quantized.FORMATS]), required=True,
              help="gptq: GPTQ v1 (zero points minus one; every GPTQ loader); gptq-v2: true zero points (GPTQModel); "
                   "compressed-tensors: pack-quantized, as llm-compressor writes it (vLLM, transformers).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@json_option("the summary")
def export_command(path, out, fmt, overwrite, json_path):
    """Write the quantized checkpoint PATH to OUT in another format, the same weights bit for bit."""
    started = time.perf_counter()
    if fmt in gptq_formats.FORMATS:
        s = gptq_formats.export_gptq(path, out, fmt, overwrite=overwrite, progress=True)
    else:
        s = pack_quantized.export(path, out, fmt, overwrite=overwrite, progress=True)
    seconds = time.perf_counter() - started
    report = Report(json_path)
    report.table(f"export {path} -> {out}", [("format", fmt), ("quantized linears", str(s["linears"])),
                                              ("configurations", str(s["configurations"])),
                                              ("time", f"{seconds:.2f} s")])
    report.json({"path": path, **s, "seconds": seconds})
