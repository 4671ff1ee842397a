"""The Python surface: `bitsmith.quantize(...)`, `bitsmith.load(...)` and `evaluate(...)`; the CLI calls the same
functions."""
from __future__ import annotations

import json
import os
import sys

import torch

from . import __version__, distributed
from . import resume as resuming
from .calibration import data, perplexity
from .calibration.adapter import BlockRunner, check_shapes, skeleton
from .formats import dfloat, output
from .formats.checkpoint import FORMAT_VERSION, CheckpointWriter
from .formats.errors import InputError, one_line
from .formats.paths import open_regular, read_bytes
from .formats.source import BUNDLED, FolderSource, bundled_path, open_source
from .kernels.linear import cache_dequantized
from .layouts import gptq_config, gptq_expressible
from .loader import load_model
from .measure import decide
from .pipeline import Result, Stopwatch, calibration, linear_shapes, peak_rss_bytes, run
from .plan import QuantizeOptions, QuantPlan
from .quantize.grid import ERROR_NORM
from .rotation import RotatedSource


def quantize(model: str, out: str, *, overwrite: bool = False, eval_data: str | None = None,
             eval_seqlen: int | None = None, eval_max_tokens: int | None = None, lossless_rest: bool = False,
             progress: bool = True, target_bpw: float | None = None, measurement: str | None = None,
             plan: str | None = None, resume: bool = False, **options) -> dict:
    """Quantize `model` (folder, .gguf or bundled name) into the folder `out`; returns a summary dict.

    Options are those of `bitsmith quantize` (method, bits, group_size, sym, act_order, static_groups,
    mse, true_sequential, damp, calib, nsamples, seqlen, seed, calib_dtype). `lossless_rest` entropy-codes the tensors left
    in BF16 (formats/dfloat/), which takes the checkpoint out of the plain GPTQ convention. With
    `eval_data`, the perplexity of the quantized weights on that text is measured while quantizing
    (same protocol as `bitsmith eval`; `eval_seqlen` by default 2048, or the model's context when shorter).

    The plan: uniform by default; with `target_bpw`, measured (or read from `measurement`, a
    measurement.json of an earlier run on the same model) and allocated to that all-in bits per weight;
    with `plan`, read from a plan.json (every linear named, each with bits, group_size, sym and optionally
    outliers, the fraction of its weights kept in fp16).

    With `resume`, a run on `out` that was killed is continued from its last finished block (bitsmith/resume.py)
    and gives the same files as an uninterrupted run; one with other inputs is refused.
    """
    clock = Stopwatch()
    options["device"] = calibration_device(options.get("device"))
    opts = QuantizeOptions(**{k: v for k, v in options.items() if v is not None})
    if isinstance(opts.calib, str):
        opts.calib = [opts.calib]
    opts.validate()
    data.eval_seqlen(eval_seqlen, None, "--eval-seqlen")
    data.check_max_tokens(eval_max_tokens, "--eval-max-tokens")
    if opts.calib != ["self"]:
        data.read_text([c for c in opts.calib if c != "self"])   # a missing or empty file fails now, not later
    eval_text = data.read_text([eval_data], "evaluation text") if eval_data is not None else None
    plan_body = _plan_request(target_bpw, measurement, plan)
    inputs = [bundled_path(model) if model in BUNDLED else model, *(f for f in opts.calib if f != "self"),
              *([eval_data] if eval_data else [])]
    output.refuse(out, inputs, overwrite)   # before the model is read
    source = open_source(model, finite=True)    # a NaN or Inf read while quantizing is refused, never written
    if isinstance(source, FolderSource) and source.checkpoint.quantization_config:
        raise InputError(f"{model}: already quantized; quantize the original model instead")
    calibrates = opts.method != "rtn" or (target_bpw is not None and measurement is None)
    if calibrates and source.context() and opts.seqlen > source.context():
        raise InputError(f"--seqlen {opts.seqlen} exceeds the model's context of {source.context()} tokens")
    if opts.tune_epochs and source.context() and opts.tune_seqlen > source.context():
        raise InputError(f"--tune-seqlen {opts.tune_seqlen} exceeds the model's context of {source.context()} tokens")
    check_shapes(source)
    original = source
    if opts.rotate:                         # after the shape checks: the config's widths size its matrices
        source = RotatedSource(source, opts.seed)
    eval_ids = None
    if eval_text is not None:
        ids = data.tokenize(source.tokenizer(), eval_text)
        eval_ids = data.eval_windows(ids, data.eval_seqlen(eval_seqlen, source.context(), "--eval-seqlen"),
                                     eval_max_tokens)
    check_placement(distributed.announced(), opts)     # before joining (distributed.announced)
    world = distributed.join(opts.device)
    with (CheckpointWriter(out, overwrite=overwrite, inputs=inputs, resume=resume) if world.main
          else distributed.Discarding()) as writer:
        if resume and world.main and not writer.resumed:
            print(f"{out}: nothing to resume, starting fresh", file=sys.stderr)
        with resuming.refusing(writer):
            calib = calibration(source, opts, progress and world.main)
            if world.main:
                fingerprint = source.fingerprint()
                resuming.take_up(writer, resuming.identity(__version__, fingerprint, opts, calib.fingerprint,
                                                           target_bpw, lossless_rest), out)
        runner = BlockRunner(source.config)
        if writer.resumed:
            print(f"{out}: resuming the interrupted run, {resuming.blocks_done(writer)} of {runner.n_blocks} "
                  "blocks done", file=sys.stderr)
        coder = dfloat.CodedWriter(writer) if lossless_rest and world.main else None
        shapes = linear_shapes(runner)
        measure_seconds = measure_cpu_seconds = base = qplan = None
        if plan_body is not None:
            qplan = QuantPlan.from_dict(plan_body, shapes, opts, plan) if world.main else None
        elif target_bpw is not None:                # every process measures; main decides and sends the plan
            started, cpu_started = clock.seconds, clock.cpu_seconds
            measured = resuming.measurement(writer, source, opts, measurement, progress, world,
                                            None if calib.windows is None else (calib.windows, calib.description))
            measure_seconds, measure_cpu_seconds = clock.seconds - started, clock.cpu_seconds - cpu_started
            qplan = decide(measured, target_bpw, opts, opts.proxy) if world.main else None
            if world.main and measured.base_nll is not None and measured.calibration == calib.fingerprint:
                base = measured      # its Fisher windows are this run's first windows: measure the real increase
        else:
            qplan = QuantPlan.uniform(opts, shapes)
        if world.main:
            resuming.check_plan(writer, qplan, out)
        qplan, loss_windows = distributed.broadcast_from_main((qplan, base.fisher_windows if base else 0), world)
        result = run(source, writer, qplan, eval_ids=eval_ids if world.main else None, progress=progress and world.main,
                     coder=coder, calib=calib, loss_windows=loss_windows, world=world)
        if not world.main:
            return {}
        writer.add_file("plan.json", (json.dumps(qplan.as_dict(), indent=1) + "\n").encode())
        if coder:
            coder.flush()
        coded = coder.coded if coder else {}
        tokenizer_files(original, writer)
        config = quantized_config(source.config, qplan, shapes, result)
        extra = {}
        if coded:
            extra["lossless"] = dfloat.lossless_block(coded)
            qc = config["quantization_config"]
            qc.update(quant_method="bitsmith", format_version=FORMAT_VERSION,
                      lossless=dfloat.config_block(extra["lossless"]))
        writer.commit(config, {**extra,
            "source": {"name": source.name, "fingerprint": original.fingerprint()},
            **({"rotation": source.describe()} if opts.rotate else {}),
            "calibration": {"description": result.calibration, "fingerprint": result.calibration_fingerprint},
            "plan": qplan.as_dict(),
            "layers": {l.name: {"shape": list(l.shape), "loss": l.loss} for l in result.layers},
        })
    measured_error = None
    if base and result.calibration_nll is not None:
        measured_error = {"nats_per_token": result.calibration_nll - base.base_nll, "base_nll": base.base_nll,
                          "nll": result.calibration_nll, "windows": base.fisher_windows}
    return {**summary(original, out, result, clock.seconds), "target_bits_per_weight": target_bpw,
            "predicted_error": qplan.predicted_error(), "predicted_error_unit": qplan.error_unit,
            "measured_error": measured_error,
            "measure_seconds": measure_seconds, "measure_cpu_seconds": measure_cpu_seconds, "device": opts.device,
            "peak_device_bytes": torch.cuda.max_memory_allocated(opts.device) if opts.device != "cpu" else None,
            "cpu_seconds": clock.cpu_seconds}


def calibration_device(device: str | None) -> str:
    """--device as a torch device: auto is CUDA when one is visible, else CPU; CUDA runs with TF32 off for
    Hessians and GPTQ (as the reference code)."""
    import re
    device = device or "cpu"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA device is visible to torch (torch {torch.__version__})")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


def check_placement(world: distributed.World, opts: QuantizeOptions) -> None:
    """What cannot run off CPU or in several processes yet, refused on every rank before any work."""
    if opts.device != "cpu" and (opts.rounding == "signround" or opts.method == "qoq" or opts.tune_epochs):
        raise InputError(f"--device {opts.device}: --rounding signround, --tune-epochs and --method qoq run on CPU in "
                         "this version (use --device cpu)")
    if not world.parallel:
        return
    if opts.rounding != "gptq" or opts.tune_epochs:
        what = f"--rounding {opts.rounding}" if opts.rounding != "gptq" else "--tune-epochs"
        raise InputError(f"{what} runs in one process; drop --nproc (or torchrun) for it")
    if opts.method != "rtn" and -(-opts.nsamples // opts.batch) < world.size:
        raise InputError(f"--nsamples {opts.nsamples}: {world.size} processes need at least {world.size} batches of "
                         f"{opts.batch} calibration windows")


def _plan_request(target_bpw, measurement, plan) -> dict | None:
    """Checks of --target-bpw / --measurement / --plan before any heavy work; the plan file's JSON."""
    if plan is not None and (target_bpw is not None or measurement is not None):
        raise InputError("--plan applies a plan as written; it does not combine with --target-bpw or --measurement")
    if measurement is not None and target_bpw is None:
        raise InputError("--measurement is reused to plan for a --target-bpw; give --target-bpw too")
    if target_bpw is not None and not (0 < target_bpw <= 32):
        raise InputError(f"--target-bpw {target_bpw}: expected all-in bits per weight, e.g. 3.25")
    if measurement is not None and not os.path.lexists(measurement):
        raise InputError(f"--measurement {measurement}: no such file")
    if measurement is not None:
        open_regular(measurement, f"--measurement {measurement}").close()   # a FIFO or device: refused unread
    if plan is None:
        return None
    raw = read_bytes(plan, f"--plan {plan}")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InputError(f"--plan {plan}: cannot read it as JSON ({one_line(e)})") from None


def load(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu", dequantized: bool = False):
    """A transformers model from any MODEL; quantized linears run through bitsmith's kernels. On CPU a call of a
    few rows (decode) multiplies by the packed codes with bf16 activations, a longer one dequantizes each W once
    for the call, exact in float32 (kernels/dispatch.py). With `dequantized`, every quantized W is also kept
    dense in `dtype` and used at every length: exact, fastest for long inputs, at the unquantized model's memory
    (the size is printed)."""
    net = load_model(path, dtype=dtype, device=device)
    if dequantized:
        held = cache_dequantized(net, dtype)
        print(f"bitsmith: dense copies of the quantized weights hold {held / 2**20:.1f} MiB ({dtype})", file=sys.stderr)
    return net


def evaluate(model: str, data_path: str, *, seqlen: int | None = None, max_tokens: int | None = None,
             base: str | None = None, progress: bool = True) -> dict:
    """Perplexity of `model` on the text file `data_path` (DESIGN.md section 3: non-overlapping windows of `seqlen`
    tokens, by default 2048 or the context when shorter; the first `max_tokens` tokens), and with `base` (the
    unquantized model, same vocabulary) the mean KL divergence and top-1 agreement against it."""
    data.check_max_tokens(max_tokens)
    data.eval_seqlen(seqlen, None)                   # a window under 2 tokens: refused before any reading
    text = data.read_text([data_path], "evaluation text")
    source = open_source(model)
    skeleton(source.config)                          # config values no model is built from: refused before tokenizing
    seqlen = data.eval_seqlen(seqlen, _shared_context(source, base))
    ids = data.tokenize(source.tokenizer(), text)
    windows = data.eval_windows(ids, seqlen, max_tokens)
    net = load(model)
    cache_dequantized(net)
    base_net = load(base) if base else None
    return perplexity.evaluate(net, windows, base_net, progress)


def _shared_context(source, base: str | None) -> int | None:
    """The context both MODEL and --base hold; --base must share MODEL's vocabulary to be compared."""
    if base is None:
        return source.context()
    other = open_source(base)
    if other.config.get("vocab_size") != source.config.get("vocab_size"):
        raise InputError(f"--base {base}: a vocabulary of {other.config.get('vocab_size')} tokens, MODEL has "
                         f"{source.config.get('vocab_size')}; compare a model with its own base")
    contexts = [c for c in (source.context(), other.context()) if c]
    return min(contexts) if contexts else None


def quantized_config(config: dict, plan: QuantPlan, shapes: dict, result: Result) -> dict:
    """config.json with a GPTQ-convention `quantization_config` (per-linear choices in its `dynamic` block,
    bitsmith details under `meta`); layers outside that convention (W4A8, dense-and-sparse outliers) are declared
    under quant_method "bitsmith"."""
    from . import __version__
    opts = plan.options
    qc = {"quant_method": "gptq", "checkpoint_format": "gptq", **gptq_config(plan, shapes),
          "static_groups": opts.static_groups, "true_sequential": opts.true_sequential and opts.method != "rtn",
          "mse": ERROR_NORM if opts.mse else 0.0, "damp_percent": opts.damp, "pack_dtype": "int32", "lm_head": False,
          "meta": {"quantizer": [f"bitsmith:{__version__}"], "method": opts.method,
                   "calibration": result.calibration}}
    if opts.method == "qoq":
        qc.update(quant_method="bitsmith", format_version=FORMAT_VERSION, layer_format="w4a8-qoq",
                  desc_act=False, sym=False)
    elif not gptq_expressible(plan):             # outliers in CSR next to some GPTQ linears (bitsmith/layouts.py)
        qc.update(quant_method="bitsmith", format_version=FORMAT_VERSION)
    return {**config, "torch_dtype": config.get("torch_dtype", "bfloat16"), "quantization_config": qc}


def tokenizer_files(source, writer) -> None:
    """Carry the tokenizer over: copied from a folder, or saved from a GGUF's embedded vocabulary."""
    import tempfile
    from pathlib import Path
    if isinstance(source, FolderSource):
        for f in sorted(source.path.iterdir()):
            if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "generation_config",
                                                   "vocab", "merges", "added_tokens"))):
                writer.add_file(f.name, f)
        return
    with tempfile.TemporaryDirectory() as tmp:
        source.tokenizer().save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            writer.add_file(f.name, f.read_bytes())


def summary(source, out, result: Result, seconds: float) -> dict:
    from pathlib import Path
    out_bytes = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    source_bytes = 2 * sum(source.numel(n) for n in source)              # the model as BF16
    return {"bits_per_weight": result.bpw, "quantized_linears": len(result.layers),
            "output_bytes": out_bytes, "source_bf16_bytes": source_bytes, "seconds": seconds,
            "peak_rss_bytes": peak_rss_bytes(), "calibration": result.calibration, "eval": result.eval}
