"""Kernel benchmark on one CUDA GPU: W4A16 and W4A8 (QoQ) linears against fp16 torch.matmul and the
memory-bandwidth floor.

    python bench/kernel_speed.py [--out bench/results] [--quick]

For every layer shape (K x N) and token count M it checks the kernels against a float64 reference, then
times them with `triton.testing.do_bench` (median; do_bench zeroes a 256 MB buffer before every timed call,
so weights come from HBM, not L2). The HBM bandwidth is measured in the same run with a device-to-device
copy. Results go to `<out>/kernels-<gpu>.md` and `<out>/kernels-<gpu>.json`; without a GPU it exits.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

import torch

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672), (28672, 8192)]   # (K, N)
TOKENS = [1, 4, 16, 64, 256, 1024, 4096]
GROUP = 128
TOL = 1e-3            # fp16 output, fp32 accumulation (bf16/TF32-free paths)


def gpu_slug(name: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> `h100`."""
    known = re.search(r"\b([ABHL]\d{2,3}S?|GH200|GB200|B200)\b", name, re.IGNORECASE)
    return (known.group(1) if known else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")).lower()


def copy_bandwidth(do_bench) -> float:
    """Device-to-device copy of 1 GiB, counting read and write: bytes per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = do_bench(lambda: dst.copy_(src), warmup=10, rep=200, return_mode="median") * 1e-3
    return 2 * src.numel() / seconds


def w4a16_layer(K: int, N: int):
    from bitsmith.kernels.dispatch import W4A16Runtime
    G = K // GROUP
    qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device="cuda")
    scales = (torch.rand(G, N, device="cuda") * 0.02 + 1e-3).half()
    qzeros = torch.randint(-2**31, 2**31 - 1, (G, N // 8), dtype=torch.int32, device="cuda")
    return W4A16Runtime(qweight, scales, qzeros, None, 4, K, GROUP)


def w4a8_layer(K: int, N: int):
    from bitsmith.kernels.dispatch import W4A8Runtime
    G = K // GROUP
    qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device="cuda")
    channel_scale = (torch.rand(N, device="cuda") * 1e-3 + 1e-4).half()
    group_scale = torch.randint(1, 9, (G, N), dtype=torch.int8, device="cuda")
    group_zero = torch.randint(0, 16, (G, N), dtype=torch.int8, device="cuda")
    return W4A8Runtime(qweight, channel_scale, group_scale, group_zero, K, GROUP)


def bytes_moved(kernel: str, K: int, N: int, M: int) -> int:
    """Least bytes a layer call must move: weights (+ group metadata), fp16 activations in, fp16 out."""
    G = K // GROUP
    weights = {"fp16": 2 * K * N,
               "w4a16": K * N // 2 + 4 * G * N,            # codes + fp16 scale and zero per group
               "w4a8": K * N // 2 + 2 * G * N + 2 * N}     # codes + int8 scale and zero + fp16 channel scale
    return weights[kernel] + 2 * M * K + 2 * M * N


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def checked_layers(K: int, N: int) -> tuple[object, object, list[str]]:
    """The two quantized layers of one shape, verified against float64 references at M = 1, 64 and 1024 (every
    path); a layer that fails is reported and not timed."""
    from bitsmith.kernels import reference
    w4a16, w4a8 = w4a16_layer(K, N), w4a8_layer(K, N)
    W16 = reference.dequantize(*w4a16.layout).double()
    W8 = reference.qoq_dequantize(*w4a8.layout[:4], K, GROUP).double()
    errors, failed = [], set()
    for M in (1, 64, 1024):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        x_q, s_tok = reference.quantize_per_token(x)
        for name, layer, ref in (("w4a16", w4a16, x.double() @ W16.t()),
                                 ("w4a8", w4a8, (x_q.double() * s_tok.double()[:, None]) @ W8.t())):
            err = relative_error(layer(x), ref)
            if not err <= TOL:
                failed.add(name)
                errors.append(f"{name} {K}x{N} M={M} ({layer.path(M, 'cuda')}): relative error {err:.2e} > {TOL:g}")
    for line in errors:
        print("WRONG", line, "- not timed", flush=True)
    return (None if "w4a16" in failed else w4a16), (None if "w4a8" in failed else w4a8), errors


def run(quick: bool, done):
    """Measure shape after shape (the targets' shapes first); `done(rows, alternatives, bandwidth, errors)` after
    each, so a run cut short keeps what it measured."""
    from triton.testing import do_bench
    bandwidth = copy_bandwidth(do_bench)
    shapes, tokens = (SHAPES[3:4] + SHAPES[:1], [1, 16, 1024]) if quick else (SHAPES[3:] + SHAPES[:3], TOKENS)
    rows, alternatives, errors = [], [], []
    for K, N in shapes:
        w4a16, w4a8, wrong = checked_layers(K, N)
        errors += wrong
        W = torch.randn(K, N, device="cuda", dtype=torch.float16) * 0.02
        for M in tokens:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            calls = {"fp16": (lambda x=x, W=W: torch.matmul(x, W), "cublas")}
            if w4a16 is not None:
                calls["w4a16"] = (lambda x=x, f=w4a16: f(x), w4a16.path(M, "cuda"))
            if w4a8 is not None:
                calls["w4a8"] = (lambda x=x, f=w4a8: f(x), w4a8.path(M, "cuda"))
            times = {}
            for kernel, (fn, path) in calls.items():
                fn()                                        # first call tunes the launch configuration
                times[kernel] = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
            for kernel, (_, path) in calls.items():
                us, moved = times[kernel], bytes_moved(kernel, K, N, M)
                rows.append({"kernel": kernel, "K": K, "N": N, "M": M, "us": round(us, 2),
                             "gbps": round(moved / us * 1e-3, 1),
                             "frac_hbm": round(moved / us * 1e6 / bandwidth, 3),
                             "speedup_fp16": round(times["fp16"] / us, 3), "path": path,
                             "floor_us": round(moved / bandwidth * 1e6, 2)})
            if M > 1 and w4a16 is not None:                 # the other W4A16 paths, for the dispatch thresholds
                for path in ("splitk", "tiled", "dense"):
                    fn = lambda x=x, f=w4a16, path=path: f(x, path)
                    fn()
                    us = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
                    alternatives.append({"K": K, "N": N, "M": M, "path": path, "us": round(us, 2)})
            print(" ".join(f"{r['kernel']}:{r['us']}us" for r in rows[-len(calls):]), f"K={K} N={N} M={M}",
                  flush=True)
        done(rows, alternatives, bandwidth, errors)


TARGETS = [  # (description, predicate over a {(kernel, K, N, M): row} index); from the kernels issue
    ("W4A16 M=1 8192x28672 >= 80% of measured HBM bandwidth",
     lambda r: r[("w4a16", 8192, 28672, 1)]["frac_hbm"] >= 0.8),
    ("W4A16 M=1 8192x28672 >= 3.2x over fp16", lambda r: r[("w4a16", 8192, 28672, 1)]["speedup_fp16"] >= 3.2),
    ("W4A16 M<=16 on 8192x28672 and 28672x8192 >= 3x over fp16",
     lambda r: all(r[("w4a16", K, N, M)]["speedup_fp16"] >= 3 for K, N in [(8192, 28672), (28672, 8192)]
                   for M in (1, 4, 16))),
    ("W4A8 M=1024 8192x28672 >= 1.3x over fp16", lambda r: r[("w4a8", 8192, 28672, 1024)]["speedup_fp16"] >= 1.3),
    ("W4A8 M=1024 8192x28672 not slower than W4A16",
     lambda r: r[("w4a8", 8192, 28672, 1024)]["us"] <= r[("w4a16", 8192, 28672, 1024)]["us"]),
]


def report(rows, alternatives, bandwidth, errors, device: str, date: str) -> str:
    index = {(r["kernel"], r["K"], r["N"], r["M"]): r for r in rows}
    lines = [f"# Kernel benchmark: {device}", "",
             (f"Date {date}; torch {torch.__version__}; triton {__import__('triton').__version__}; "
             f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write). "
             "Times are `triton.testing.do_bench` medians with an L2 flush before each call; group size "
             f"{GROUP}; fp16 activations; `floor` = least bytes moved / measured bandwidth."), "",
             "## Targets", ""]
    for text, ok in TARGETS:
        try:
            verdict = "met" if ok(index) else "missed"
        except KeyError:
            verdict = "not measured"
        lines.append(f"- {text}: **{verdict}**")
    if errors:
        lines += ["", "## Kernels that failed the float64 check (not timed)", "", *[f"- {e}" for e in errors]]
    lines += ["", "## Results", "",
              "| kernel | K | N | M | path | us | GB/s | of HBM | x fp16 | floor us |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['K']} | {r['N']} | {r['M']} | {r['path']} | {r['us']} | {r['gbps']} "
                     f"| {r['frac_hbm']:.1%} | {r['speedup_fp16']} | {r['floor_us']} |")
    lines += ["", "## W4A16 paths side by side (dispatch thresholds)", "", "| K | N | M | path | us |",
              "|---|---|---|---|---|"]
    lines += [f"| {a['K']} | {a['N']} | {a['M']} | {a['path']} | {a['us']} |" for a in alternatives]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true", help="two shapes, three token counts")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernel_speed.py needs a CUDA GPU (H100/H200) and none is visible; nothing was measured "
                 "or written.")
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernels-{gpu_slug(device)}"

    def write(rows, alternatives, bandwidth, errors):
        stem.with_suffix(".json").write_text(json.dumps({"device": device, "date": date, "bandwidth": bandwidth,
                                                         "rows": rows, "alternatives": alternatives,
                                                         "errors": errors}, indent=1) + "\n")
        stem.with_suffix(".md").write_text(report(rows, alternatives, bandwidth, errors, device, date))
        print(f"wrote {stem}.md and {stem}.json", flush=True)

    run(args.quick, write)


if __name__ == "__main__":
    main()
