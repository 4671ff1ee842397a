"""CPU runtime benchmark: decode and prefill speed and peak memory of SmolLM2-135M on CPU, as a transformers model
(fp32, bf16) and as bitsmith checkpoints (W4/W3/W2 g128 RTN, a mixed-bit plan, and the lookup-table,
per-input-channel and dense-and-sparse layouts), each in its own process; and decode speed and whole-process peak
memory of a synthetic Llama of 1.0 B weights (bench/synthetic.py, TinyLlama's block shapes), fp32 against W4 g128,
where the runtime's fixed cost no longer hides the model's.

    taskset -c 1 python bench/cpu_runtime.py [--threads 1] [--repeats 3] [--work out/cpu-runtime] [--only ROW ...]
                                             [--note TEXT] [--llama-python PYTHON]

The llama.cpp row needs llama-cpp-python, built from its source package, in any Python (no torch needed there):
    python3 -m venv /tmp/lcp && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" \
        /tmp/lcp/bin/pip install --no-binary :all: llama-cpp-python
then --llama-python /tmp/lcp/bin/python (without it the row is skipped).

Protocol, per row (one process each, torch and OpenMP held to --threads; each time the best of --repeats runs,
taken both as wall time and as the process's CPU time; the report's speeds are per CPU second, which another job
on the same core does not stretch; with --threads > 1 read the wall columns):
  load      the model from its folder (`transformers.AutoModelForCausalLM.from_pretrained` or `bitsmith.load`).
  decode    greedy, batch 1, after an 8-token prompt: tokens/s over new tokens 2..64, i.e. the time of
            generate(64 new) minus that of generate(1 new), over 63 tokens. One warm-up generate first (it
            builds bitsmith's CPU forms, whose time is reported as `warmup s`).
  peak RSS  the process's high-water mark after load + decode (ru_maxrss), and the RSS right after the imports
            (torch, transformers and its Llama model, bitsmith), which every row pays alike.
  prefill   one forward of PREFILL_TOKENS tokens (no cache, last position's logits): tokens/s.
The transformers rows load an export of the bundled model (GGUF dequantized): fp32 from an fp32 folder (no
conversion while loading, its lowest peak), bf16 from a bf16 one; the bitsmith rows load the folders
`bitsmith quantize` writes from the same model; all folders are made once under --work and reused. Row
`w4g128-before` forces the reference path (per-call dequantization) that every CPU call of more than 8 rows
took before cpu_dense existed: prefill only. A kernel table compares cpu_int4 and cpu_dense per layer shape and M
(the crossover behind dispatch.CPU_INT4_MAX_M). Writes <out>/cpu-runtime.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
PROMPT = [1, 504, 3058, 282, 4649, 314, 253, 1345]       # a fixed 8-token prompt
NEW_TOKENS = 64
PREFILL_TOKENS = 2048
LAYER_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]   # SmolLM2 (K, N): q/o, k/v, gate/up, down
KERNEL_ROWS = [1, 8, 64, 65, 256]

# name -> (kind, folder, how to make it, load options)
ROWS = {
    "fp32": ("transformers", "hf-fp32", None, {"dtype": "float32"}),
    "bf16": ("transformers", "hf-bf16", None, {"dtype": "bfloat16"}),
    "w4g128": ("bitsmith", "w4g128", ["--bits", "4", "--group-size", "128"], {}),
    "w3g128": ("bitsmith", "w3g128", ["--bits", "3", "--group-size", "128"], {}),
    "w2g128": ("bitsmith", "w2g128", ["--bits", "2", "--group-size", "128"], {}),
    "mixed": ("bitsmith", "mixed", "plan", {}),
    "w3-lut": ("bitsmith", "w3-lut", "plan", {}),
    "w4g128-per-ic": ("bitsmith", "w4g128-per-ic", "plan", {}),
    "w3g128-outliers": ("bitsmith", "w3g128-outliers", "plan", {}),
    "w4g128-bf16": ("bitsmith", "w4g128", ["--bits", "4", "--group-size", "128"], {"dtype": "bfloat16"}),
    "w4g128-dequantized": ("bitsmith", "w4g128", ["--bits", "4", "--group-size", "128"], {"dequantized": True}),
    "w4g128-before": ("bitsmith", "w4g128", ["--bits", "4", "--group-size", "128"], {"before": True}),
    "llama.cpp": ("llama.cpp", None, None, {}),
    "fp32-1b": ("transformers", "synthetic-1b-fp32", None, {"dtype": "float32", "decode_only": True}),
    "w4g128-1b": ("bitsmith", "synthetic-1b-w4g128", ["--bits", "4", "--group-size", "128"], {"decode_only": True}),
}
SYNTHETIC = {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32, "kv_heads": 4}   # 0.99 B linear weights
SYNTHETIC_ROWS = ("fp32-1b", "w4g128-1b")


def mixed_plan(template: dict) -> dict:
    """Every bit width and several group sizes in one model: attention 4-bit g128, gate/up 3-bit g128, down_proj
    2-bit g64, except blocks 0 and 29 (8-bit per channel) and every fifth block's down_proj (4-bit g32)."""
    layers = {}
    for name in template["layers"]:
        block = int(name.split(".")[2])
        if block in (0, 29):
            layers[name] = {"bits": 8, "group_size": -1, "sym": False}
        elif "self_attn" in name:
            layers[name] = {"bits": 4, "group_size": 128, "sym": False}
        elif "down_proj" in name:
            layers[name] = {"bits": 4, "group_size": 32, "sym": False} if block % 5 == 0 else \
                {"bits": 2, "group_size": 64, "sym": False}
        else:
            layers[name] = {"bits": 3, "group_size": 128, "sym": False}
    return {**template, "target_bpw": None, "layers": layers}


CALIBRATED = ("w3-lut", "w4g128-per-ic", "w3g128-outliers")   # layouts GPTQ makes (quantize/gptq.py), not RTN
CALIB = ROOT.parent / "shared" / "assets" / "text" / "c4_calib.txt"
PLANS = {   # folder -> every linear's configuration, or a function of the uniform W4 g128 plan
    "mixed": mixed_plan,
    "w3-lut": {"bits": 3, "group_size": -1, "sym": False, "lut": True},
    "w4g128-per-ic": {"bits": 4, "group_size": 128, "sym": False, "per_ic": True},
    "w3g128-outliers": {"bits": 3, "group_size": 128, "sym": False, "outliers": 0.005},
}


def plan_for(folder: str, template: dict) -> dict:
    make = PLANS[folder]
    if callable(make):
        return make(template)
    return {**template, "target_bpw": None, "layers": {name: dict(make) for name in template["layers"]}}


# ---------------------------------------------------------------------------------------------------
# Preparing the folders (in child processes)

def prepare(work: Path, names: list[str]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    for name in names:
        kind, folder, make, _ = ROWS[name]
        if folder is None or (work / folder / "config.json").exists():
            continue
        print(f"making {work / folder}", file=sys.stderr, flush=True)
        if name in SYNTHETIC_ROWS:
            source = work / "synthetic-1b"
            if not (source / "config.json").exists():
                sys.path.insert(0, str(ROOT / "bench"))
                import synthetic
                synthetic.write(source, **SYNTHETIC)
            if kind == "transformers":
                run([sys.executable, __file__, "--export", str(work / folder), "--dtype", "float32", "--source",
                     str(source)])
            else:
                quantize(work / folder, make, model=str(source))
        elif kind == "transformers":
            dtype = {"hf-fp32": "float32", "hf-bf16": "bfloat16"}[folder]
            run([sys.executable, __file__, "--export", str(work / folder), "--dtype", dtype])
        elif make == "plan":
            base = work / "w4g128"
            if not (base / "plan.json").exists():
                quantize(work / "w4g128", ["--bits", "4", "--group-size", "128"])
            plan = work / f"{folder}-plan.json"
            plan.write_text(json.dumps(plan_for(folder, json.loads((base / "plan.json").read_text())), indent=1))
            quantize(work / folder, ["--plan", str(plan)], calibrated=folder in CALIBRATED)
        else:
            quantize(work / folder, make)


def quantize(out: Path, args: list[str], calibrated: bool = False, model: str = MODEL) -> None:
    """RTN, or GPTQ on a short calibration for the layouts only GPTQ makes (speed does not depend on it)."""
    method = ["--method", "gptq", "--calib", str(CALIB), "--nsamples", "16", "--seqlen", "256"] if calibrated \
        else ["--method", "rtn"]
    run([sys.executable, "-m", "bitsmith", "quantize", model, "-o", str(out), *method, "--overwrite", *args])


def export(out: Path, dtype: str, source: str = MODEL) -> None:
    """A model (by default the bundled one, GGUF dequantized to bf16) as a plain transformers folder in `dtype`."""
    import torch

    import bitsmith
    from bitsmith.formats.source import open_source
    model = bitsmith.load(source, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    open_source(source).tokenizer().save_pretrained(out)


def run(cmd: list[str], env: dict | None = None) -> str:
    try:
        return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"failed ({e.returncode}): {' '.join(cmd)}") from None


# ---------------------------------------------------------------------------------------------------
# One row, in its own process

def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # KiB on Linux


def load(kind: str, folder: Path, options: dict):
    import torch
    dtype = getattr(torch, options.get("dtype", "float32"))
    if kind == "transformers":
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    import bitsmith
    return bitsmith.load(str(folder), dtype=dtype, dequantized=options.get("dequantized", False))


def force_reference_path() -> None:
    """Make every CPU call of more than 8 rows take the reference path, as they did before cpu_dense."""
    from bitsmith.kernels import dispatch
    path = dispatch.W4A16Runtime.path
    dispatch.W4A16Runtime.path = lambda self, M, device: \
        "reference" if dispatch.device_kind(device) == "cpu" and M > 8 else path(self, M, device)


class Clock:
    """Wall and CPU seconds of a block. CPU time (this process's) is what a shared machine does not inflate: with
    one thread, another job on the same core stretches the wall time, not the work."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def seconds(self) -> dict:
        return {"wall": self.wall, "cpu": self.cpu}


def best_of(repeats: int, seconds) -> dict:
    """The least wall and the least CPU seconds over `repeats` runs of `seconds()`."""
    runs = [seconds() for _ in range(repeats)]
    return {clock: min(run[clock] for run in runs) for clock in ("wall", "cpu")}


def generate_seconds(model, new_tokens: int) -> dict:
    import torch
    ids = torch.tensor([PROMPT]) % model.config.vocab_size
    with Clock() as clock:
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert out.shape[1] == len(PROMPT) + new_tokens
    return clock.seconds()


def prefill_seconds(model) -> dict:
    import torch
    ids = torch.randint(3, model.config.vocab_size, (1, PREFILL_TOKENS), generator=torch.Generator().manual_seed(0))
    with Clock() as clock:
        model(ids, use_cache=False, logits_to_keep=1)
    return clock.seconds()


def measure_llama_cpp(gguf: str, threads: int, repeats: int) -> dict:
    """The llama.cpp row: the bundled GGUF (Q4_1) through llama-cpp-python, same prompt, greedy decode and prefill
    protocol as the other rows; its imports are llama_cpp's alone (no torch)."""
    from llama_cpp import Llama, __version__
    baseline = rss_mb()
    with Clock() as clock:
        llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=PREFILL_TOKENS + 16,
                    n_batch=PREFILL_TOKENS, n_ubatch=512, verbose=False)
    result = {"row": "llama.cpp", "kind": "llama.cpp", "folder": Path(gguf).name, "threads": threads,
              "llama_cpp_python": __version__, "load_s": clock.wall, "rss_after_imports_mb": baseline}

    def generate(new_tokens: int) -> dict:
        llm.reset()
        made = 0
        with Clock() as clock:
            for _ in llm.generate(PROMPT, top_k=1, top_p=1.0, temp=0.0, reset=True):
                made += 1
                if made == new_tokens:
                    break
        return clock.seconds()

    def prefill() -> dict:
        llm.reset()
        ids = [3 + (7919 * i) % (llm.n_vocab() - 3) for i in range(PREFILL_TOKENS)]
        with Clock() as clock:
            llm.eval(ids)
        return clock.seconds()

    result["warmup_s"] = generate(4)["wall"]
    one, full = best_of(repeats, lambda: generate(1)), best_of(repeats, lambda: generate(NEW_TOKENS))
    for c in ("wall", "cpu"):
        result[f"decode_tok_s_{c}"] = (NEW_TOKENS - 1) / (full[c] - one[c])
    result["peak_rss_decode_mb"] = peak_rss_mb()
    fill = best_of(repeats, prefill)
    for c in ("wall", "cpu"):
        result[f"prefill_tok_s_{c}"] = PREFILL_TOKENS / fill[c]
    result["peak_rss_prefill_mb"] = peak_rss_mb()
    return result


def measure_row(name: str, work: Path, threads: int, repeats: int) -> dict:
    # every row's imports come before the baseline RSS
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    import bitsmith  # noqa: F401
    torch.set_num_threads(threads)
    kind, folder, _, options = ROWS[name]
    baseline = rss_mb()
    with Clock() as clock:
        model = load(kind, work / folder, options)
    result = {"row": name, "kind": kind, "folder": folder, "threads": torch.get_num_threads(),
              "load_s": clock.wall, "rss_after_imports_mb": baseline}
    with torch.inference_mode():
        if options.get("before"):
            force_reference_path()
        else:
            result["warmup_s"] = generate_seconds(model, 4)["wall"]
            one = best_of(repeats, lambda: generate_seconds(model, 1))
            full = best_of(repeats, lambda: generate_seconds(model, NEW_TOKENS))
            for c in ("wall", "cpu"):
                result[f"decode_tok_s_{c}"] = (NEW_TOKENS - 1) / (full[c] - one[c])
            result["peak_rss_decode_mb"] = peak_rss_mb()
        if options.get("decode_only"):
            return result
        prefill = best_of(repeats, lambda: prefill_seconds(model))
        for c in ("wall", "cpu"):
            result[f"prefill_tok_s_{c}"] = PREFILL_TOKENS / prefill[c]
        result["peak_rss_prefill_mb"] = peak_rss_mb()
    return result


def kernel_table(threads: int) -> list[dict]:
    """Per layer shape and bit width: CPU ms of cpu_int4 and cpu_dense at each M (best of 5, weights in cache)."""
    import torch

    from bitsmith.formats.packing import pack
    from bitsmith.kernels.dispatch import W4A16Runtime
    torch.set_num_threads(threads)
    rows = []
    for bits in (2, 4, 8):
        for K, N in LAYER_SHAPES:
            G = -(-K // 128)
            q = torch.randint(0, 1 << bits, (K, N), dtype=torch.uint8)
            rt = W4A16Runtime(pack(q, bits, 0), (torch.rand(G, N) * 0.02 + 1e-3).half(),
                              pack(torch.randint(0, 1 << bits, (G, N)), bits, 1), None, bits, K, 128)
            for M in KERNEL_ROWS:
                x = torch.randn(M, K)
                rows.append({"bits": bits, "K": K, "N": N, "M": M,
                             **{f"{path}_ms": best_ms(rt, x, path) for path in ("cpu_int4", "cpu_dense")}})
    return rows


def best_ms(runtime, x, path: str, repeats: int = 5) -> float:
    """Least CPU milliseconds of one call (CPU time: see Clock)."""
    runtime(x, path)
    times = []
    for _ in range(repeats):
        with Clock() as clock:
            runtime(x, path)
        times.append(clock.cpu)
    return 1e3 * min(times)


# ---------------------------------------------------------------------------------------------------
# Report

PROTOCOL = (f"Decode: greedy, batch 1, {NEW_TOKENS} new tokens after an {len(PROMPT)}-token prompt (tokens/s over "
            f"tokens 2..{NEW_TOKENS}). Prefill: one forward of {PREFILL_TOKENS} tokens, no cache. Speeds are per "
            "second of this process's CPU time (the machine was shared: wall time counts other jobs on the same "
            "core; the JSON has both), best of the repeats. Peak RSS: the "
            "process's high-water mark after load + decode; `imports` is the RSS right after importing torch, "
            "transformers and bitsmith, paid by every row; `model` = peak - imports. bitsmith rows are RTN (unless the row notes say otherwise) "
            "checkpoints loaded with `bitsmith.load` (float32 unless the row says otherwise).")
ROW_NOTES = ("Rows: `mixed` is the plan of `mixed_plan` (8-bit per-channel blocks 0 and 29, attention 4-bit g128, "
             "gate/up 3-bit g128, down_proj 2-bit g64 or 4-bit g32); `w3-lut`, `w4g128-per-ic` and `w3g128-outliers` "
             "put every linear in that layout (a 3-bit lookup table per row; 4-bit groups of 128 output rows per "
             "input channel; 3-bit g128 with 0.5 % of the weights in fp16 CSR), made by GPTQ (act-order) on 16 x 256 "
             "C4 tokens; `llama.cpp` decodes the bundled GGUF (Q4_1: 4-bit groups of 32 with an fp16 scale and minimum, "
             "5 bits per weight) with llama-cpp-python built from its source package on this machine (AVX-512 kernels; "
             "AMX off: its matmul crashes in this virtual machine), "
             "the same prompt and thread count, its RSS after importing llama_cpp alone as `imports`; "
             "`w4g128-bf16` loads with dtype=torch.bfloat16; "
             "`w4g128-dequantized` with dequantized=True (dense copies); `w4g128-before` forces the reference path "
             "for every call of more than 8 rows, as before cpu_dense (prefill only).")
SYNTHETIC_NOTES = (f"A synthetic Llama (bench/synthetic.py: random bf16 weights, {SYNTHETIC['layers']} blocks of hidden "
                   f"{SYNTHETIC['hidden']}, MLP {SYNTHETIC['intermediate']}, {SYNTHETIC['heads']} heads, "
                   f"{SYNTHETIC['kv_heads']} KV heads: TinyLlama-1.1B's blocks, 0.99 B linear weights, a 512-token "
                   "vocabulary), exported to an fp32 transformers folder and quantized by RTN W4 g128; decode and peak "
                   "RSS as above (the prompt's ids modulo the vocabulary), no prefill.")
HEADER = ("| row | decode tok/s | vs fp32 | prefill tok/s | vs fp32 | peak RSS MB | vs fp32 | imports MB | model MB | "
          "vs fp32 model | peak after prefill MB | decode tok/s wall | prefill tok/s wall |")


def markdown(meta: dict, rows: list[dict], kernels: list[dict]) -> str:
    fp32 = next((r for r in rows if r["row"] == "fp32"), None)
    setting = (f"Measured {meta['date']} on {meta['cpu']} ({meta['cores']} cores), torch {meta['torch']}, "
               f"{meta['threads']} thread(s) per run, each row in its own process. {meta['note']}").rstrip()
    lines = [f"# CPU runtime: {MODEL}", "", setting, "", PROTOCOL, "", HEADER, "|---" * 13 + "|"]
    for r in (r for r in rows if r["row"] not in SYNTHETIC_ROWS):
        lines.append("| " + " | ".join([
            r["row"], fmt(r.get("decode_tok_s_cpu"), 2), ratio(r, fp32, "decode_tok_s_cpu"),
            fmt(r["prefill_tok_s_cpu"], 1), ratio(r, fp32, "prefill_tok_s_cpu"),
            fmt(r.get("peak_rss_decode_mb"), 0), ratio(r, fp32, "peak_rss_decode_mb"),
            fmt(r["rss_after_imports_mb"], 0), fmt(model_mb(r), 0),
            ratio({"m": model_mb(r)}, fp32 and {"m": model_mb(fp32)}, "m"), fmt(r["peak_rss_prefill_mb"], 0),
            fmt(r.get("decode_tok_s_wall"), 2), fmt(r["prefill_tok_s_wall"], 1)]) + " |")
    lines += ["", ROW_NOTES]
    synthetic = [r for r in rows if r["row"] in SYNTHETIC_ROWS]
    if synthetic:
        base = next((r for r in synthetic if r["kind"] == "transformers"), None)
        lines += ["", "## A larger model: the whole process", "", SYNTHETIC_NOTES, "",
                  ("| row | decode tok/s | vs fp32 | peak RSS MB | vs fp32 | imports MB | model MB | vs fp32 model | "
                   "load s |"), "|---" * 9 + "|"]
        for r in synthetic:
            lines.append("| " + " | ".join([
                r["row"], fmt(r["decode_tok_s_cpu"], 2), ratio(r, base, "decode_tok_s_cpu"),
                fmt(r["peak_rss_decode_mb"], 0), ratio(r, base, "peak_rss_decode_mb"), fmt(r["rss_after_imports_mb"], 0),
                fmt(model_mb(r), 0), ratio({"m": model_mb(r)}, base and {"m": model_mb(base)}, "m"),
                fmt(r["load_s"], 1)]) + " |")
    lines += ["", "## Per layer: cpu_int4 against cpu_dense (CPU ms, best of 5, the layer's weights in cache)",
              "", "| bits | K x N | " + " | ".join(f"M={m}" for m in KERNEL_ROWS) + " |",
              "|---|---|" + "---|" * len(KERNEL_ROWS)]
    for bits in sorted({k["bits"] for k in kernels}):
        for K, N in LAYER_SHAPES:
            cells = [k for k in kernels if (k["bits"], k["K"], k["N"]) == (bits, K, N)]
            lines.append(f"| {bits} | {K} x {N} | " + " | ".join(
                f"{c['cpu_int4_ms']:.2f} / {c['cpu_dense_ms']:.2f}" for c in cells) + " |")
    lines += ["", "Cells: cpu_int4 / cpu_dense. cpu_int4 computes with bf16 activations (kernels/cpu.py)."]
    return "\n".join(lines) + "\n"


def model_mb(row: dict) -> float | None:
    peak = row.get("peak_rss_decode_mb")
    return None if peak is None else peak - row["rss_after_imports_mb"]


def fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def ratio(row: dict, base: dict | None, key: str) -> str:
    """row[key] / base[key], when both are there."""
    if row.get(key) is None or not base or not base.get(key):
        return "-"
    return f"{row[key] / base[key]:.2f}x"


def machine(threads: int, note: str) -> dict:
    import torch
    return {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(), "threads": threads, "note": note,
            "affinity": sorted(os.sched_getaffinity(0))}


FIDELITY_ROWS = ("w4g128", "w3g128", "mixed", "w3-lut", "w4g128-per-ic", "w3g128-outliers")
FIDELITY_TEXT = ROOT.parent / "shared" / "assets" / "text" / "wikitext2_test.txt"
FIDELITY_WINDOWS, FIDELITY_TOKENS = 8, 64        # windows of at most CPU_INT4_MAX_M tokens: the decode path


def fidelity(work: Path) -> list[dict]:
    """How far each bitsmith row's CPU decode path (bf16 activations; lookup tables on their 8-bit grid) is from the
    exact float32 path of the same checkpoint (`dequantized=True`): KL(exact || decode) per token and top-1 agreement,
    over FIDELITY_WINDOWS windows of FIDELITY_TOKENS WikiText-2 tokens, each one forward of <= 64 rows."""
    import torch

    import bitsmith
    from bitsmith.formats.source import open_source
    text = FIDELITY_TEXT.read_text()
    ids = torch.tensor(open_source(MODEL).tokenizer()(text[:200_000])["input_ids"])
    windows = ids[:FIDELITY_WINDOWS * FIDELITY_TOKENS].reshape(FIDELITY_WINDOWS, FIDELITY_TOKENS)
    rows = []
    for name in FIDELITY_ROWS:
        folder = str(work / ROWS[name][1])
        decode, exact = bitsmith.load(folder), bitsmith.load(folder, dequantized=True)
        kl, agree = [], []
        with torch.inference_mode():
            for window in windows:
                a = decode(window[None]).logits[0].float().log_softmax(-1)
                b = exact(window[None]).logits[0].float().log_softmax(-1)
                kl.append((b.exp() * (b - a)).sum(-1).mean().item())
                agree.append((a.argmax(-1) == b.argmax(-1)).float().mean().item())
        rows.append({"row": name, "kl": sum(kl) / len(kl), "top1": sum(agree) / len(agree)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def fidelity_markdown(result: dict) -> str:
    rows = result["rows"]
    setting = (f"`python bench/cpu_runtime.py --fidelity`, {result['date']}. Each checkpoint of "
               "bench/results/cpu-runtime.md loaded twice, as `bitsmith.load` decodes (torch's int4 / int8 weight-only "
               "GEMMs, bf16 activations; lookup tables on their 8-bit grid) and with `dequantized=True` (float32, "
               f"exact); {FIDELITY_WINDOWS} WikiText-2 test windows of {FIDELITY_TOKENS} tokens, each a single forward "
               "of up to 64 rows, so every quantized linear takes its decode path. For scale: W4 g128 against the "
               "unquantized model is KL 0.23 (bench/results/quality-smollm2.md).")
    lines = ["# CPU decode path against the exact float32 path: SmolLM2-135M", "", setting, "",
             "| row | KL(exact \\|\\| decode path) nats/token | top-1 agreement |", "|---|---|---|"]
    lines += [f"| {r['row']} | {r['kl']:.2e} | {r['top1']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "cpu-runtime")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--only", nargs="+", choices=list(ROWS), help="rows to run (default: all)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement; the best is kept")
    ap.add_argument("--note", default="", help="a sentence for the report, e.g. what else ran on the machine")
    ap.add_argument("--row", help=argparse.SUPPRESS)            # internal: measure one row, JSON on stdout
    ap.add_argument("--kernels", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--export", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    ap.add_argument("--source", default=MODEL, help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--fidelity", action="store_true",
                    help="only compare each bitsmith row's decode path with its exact float32 path (logits)")
    ap.add_argument("--llama-python", default=sys.executable,
                    help="the Python with llama-cpp-python installed, for the llama.cpp row (skipped where it has none)")
    args = ap.parse_args()
    if args.export:
        return export(args.export, args.dtype, args.source)
    if args.row == "llama.cpp":
        return print(json.dumps(measure_llama_cpp(args.gguf, args.threads, args.repeats)))
    if args.row:
        return print(json.dumps(measure_row(args.row, args.work, args.threads, args.repeats)))
    if args.kernels:
        return print(json.dumps(kernel_table(args.threads)))
    if args.fidelity:
        prepare(args.work, list(FIDELITY_ROWS))
        result = {"date": datetime.date.today().isoformat(), "rows": fidelity(args.work)}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cpu-decode-fidelity.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "cpu-decode-fidelity.md").write_text(fidelity_markdown(result))
        return None
    names = args.only or list(ROWS)
    prepare(args.work, names)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    child = [sys.executable, __file__, "--work", str(args.work), "--threads", str(args.threads), "--repeats",
             str(args.repeats)]
    rows = []
    for name in names:
        command = [*child, "--row", name]
        if name == "llama.cpp":
            if subprocess.run([args.llama_python, "-c", "import llama_cpp"], capture_output=True, check=False).returncode:
                print(f"llama.cpp row skipped: {args.llama_python} has no llama_cpp", file=sys.stderr)
                continue
            from bitsmith.formats.source import bundled_path
            command = [args.llama_python, *command[1:], "--gguf", str(bundled_path(MODEL))]
        rows.append(json.loads(run(command, env).strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    kernels = json.loads(run([*child, "--kernels"], env).strip().splitlines()[-1])
    meta = machine(args.threads, args.note)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu-runtime.json").write_text(json.dumps({**meta, "rows": rows, "kernels": kernels}, indent=1) + "\n")
    (args.out / "cpu-runtime.md").write_text(markdown(meta, rows, kernels))
    print(f"wrote {args.out / 'cpu-runtime.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
