"""The `bitsmith` command line: parse, call the API, report. Errors follow DESIGN.md section 1. The group and what
its commands share are in cli/app.py; quantize, eval, inspect and verify are here, the other commands in their own
modules, imported below so that they join the group."""
from __future__ import annotations

import os
import sys

import click

from ..formats.errors import InputError
from ..plan import FISHER_LABELS, TECHNIQUES, QuantizeOptions
from .app import Report, Sectioned, json_option, main

QUANTIZE_SECTIONS = {
    "Method": ("method", "bits", "group_size", "sym", "act_order", "static_groups", "mse", "true_sequential", "damp",
               "rounding", "rounding_iters", "tune_epochs", "tune_lr", "tune_batch", "tune_seqlen",
               "tune_resample", "tune_self", "rotate"),
    "Bit plan": ("target_bpw", "measurement", "plan_path", "fisher_samples", "fisher_labels", "proxy",
                 "menu"),
    "Calibration": ("calib", "nsamples", "seqlen", "seed", "calib_dtype", "device", "offload_activations", "nproc"),
    "Evaluation": ("eval_data", "eval_seqlen", "eval_max_tokens"),
    "Output": ("out", "overwrite", "resume", "lossless_rest", "json_path"),
}


@main.command(cls=Sectioned, sections=QUANTIZE_SECTIONS)
@click.argument("model")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--method", type=click.Choice(["rtn", "gptq", "qoq"]), default="gptq", show_default=True,
              help="qoq: W4A8 layers (QServe: per-channel int8 then per-group uint4, GPTQ-compensated).")
@click.option("--bits", type=int, default=4, show_default=True,
              help="2, 3, 4, 5, 6 or 8 (5 and 6: a bitsmith checkpoint, not GPTQ).")
@click.option("--group-size", type=int, default=128, show_default=True, help="-1 = per output channel.")
@click.option("--sym/--asym", default=False, show_default=True,
              help="Symmetric grids (zero point in the middle) or asymmetric ones (a zero point per group).")
@click.option("--act-order/--no-act-order", default=True, show_default=True,
              help="Quantize columns in order of decreasing Hessian diagonal (GPTQ's desc_act; writes g_idx).")
@click.option("--static-groups", is_flag=True, help="Fit groups in original column order (no g_idx).")
@click.option("--mse/--no-mse", default=None,
              help="Shrink each grid's range to the least L^2.4 error (GPTQ's mse search). Default: on for gptq.")
@click.option("--true-sequential/--no-true-sequential", default=False, show_default=True,
              help="Take each linear's Hessian after the linears before it in the block are quantized.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="Fraction of mean diag(H).")
@click.option("--rounding", type=click.Choice(["gptq", "gptaq", "signround"]), default="gptq", show_default=True,
              help="gptaq: GPTQ toward each linear's output in the unquantized model, from the inputs it sees in "
                   "the quantized one (asymmetric calibration; one more block forward per stage). signround: after "
                   "GPTQ, learn each block's rounding and clipping (SignRound) so that its outputs match the "
                   "unquantized block's on the calibration windows; slower (see --rounding-iters).")
@click.option("--rounding-iters", type=int, default=50, show_default=True,
              help="Sign-gradient iterations per block of --rounding signround, one minibatch of 8 windows each.")
@click.option("--tune-epochs", type=int, default=0, show_default=True,
              help="After the blocks, tune every quantized linear's levels (grid scales, lookup tables, codebooks "
                   "and their row scales) and the norm weights end to end, codes fixed, toward the unquantized "
                   "model's next-token distributions (KL) on the calibration windows: passes over them "
                   "(EfficientQAT's E2E-QP). Holds the whole model in memory.")
@click.option("--tune-lr", type=float, default=1e-3, show_default=True, help="Adam learning rate of --tune-epochs.")
@click.option("--tune-batch", type=int, default=QuantizeOptions.tune_batch, show_default=True,
              help="Calibration windows per step of --tune-epochs (one Adam step each: fewer, more steps a pass); "
                   "with --tune-seqlen, joined sequences per step.")
@click.option("--tune-seqlen", type=int, default=QuantizeOptions.tune_seqlen, show_default=True,
              help="Tokens per sequence of --tune-epochs: consecutive calibration windows joined end to end (a "
                   "multiple of --seqlen), so that tuning sees the positions and spans of attention of longer "
                   "inputs than the windows; 0: each window alone.")
@click.option("--tune-resample", type=float, default=QuantizeOptions.tune_resample, show_default=True,
              help="Share of the tokens of the calibration windows that every pass of --tune-epochs after the first "
                   "replaces by a draw from the unquantized model's next-token distribution (its targets computed "
                   "anew): other text of the model's own for the same steps; 0: the windows as they are.")
@click.option("--tune-self", type=int, default=QuantizeOptions.tune_self, show_default=True,
              help="Windows of --seqlen sampled from the unquantized model that --tune-epochs reads beside the "
                   "calibration windows (the model's own text: LLM-QAT's data-free distillation; their targets take "
                   "one forward of the unquantized model; with --tune-seqlen, texts of that length cut into windows); "
                   "the measurement and GPTQ keep to the calibration windows.")
@click.option("--rotate/--no-rotate", default=False, show_default=True,
              help="Quantize the model in a rotated basis: norm weights folded into the linears, the residual "
                   "stream and each head's values turned by randomized Hadamard matrices (QuaRot's computational "
                   "invariance; seeded by --seed). The same function with weights easier to quantize, nothing "
                   "added at run time; a tied lm_head becomes a matrix of its own in the output. For GPTQ: with RTN it "
                   "measured far worse.")
@click.option("--calib", multiple=True,
              help="Calibration text file (repeatable); 'self' = sampled from the model: alone, or half the windows "
                   "next to files.")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration windows.")
@click.option("--seqlen", type=int, default=2048, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the choice of calibration windows (and of --rotate's matrices).")
@click.option("--calib-dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True,
              help="Matmul precision of calibration forwards and of sampling 'self' (Hessians and GPTQ are "
                   "always float32).")
@click.option("--target-bpw", type=float, default=None,
              help="Plan per-layer bits for this all-in bits per weight (measures every candidate first).")
@click.option("--measurement", type=click.Path(dir_okay=False),
              help="Re-plan from a measurement.json of an earlier --target-bpw run on the same model.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False),
              help="Apply a plan.json (every linear: bits, group_size, sym; optionally outliers, a fraction kept in fp16).")
@click.option("--fisher-samples", type=int, default=16, show_default=True,
              help="Calibration windows whose backward pass weights the measurement.")
@click.option("--fisher-labels", type=click.Choice(FISHER_LABELS), default="data", show_default=True,
              help="The NLL the measurement's Fisher is of: of the text's next tokens (the empirical Fisher) or of "
                   "labels drawn from the model's own next-token distribution (the Fisher information, KL from the "
                   "unquantized model).")
@click.option("--proxy", type=click.Choice(["fisher", "hessian"]), default="fisher", show_default=True,
              help="Error the plan minimises: Fisher-weighted (predicted nats/token) or plain output error.")
@click.option("--menu", default=",".join(TECHNIQUES), show_default=True, metavar="TECHNIQUE[,...]",
              help="What a measured plan may give a linear: uniform (GPTQ grids), wide (grids of 5 and 6 bits), "
                   "outliers (grids with fp16 outliers), lut (lookup tables), per-ic (grids per input channel), vq (codebooks of "
                   "pairs of weights, 2 to 4 bits in half bits), column-bits (groups of columns on R - 1, R or R + 1 "
                   "bits), dq (grids of 3 to 6 bits whose group scales are 8-bit codes under a per-row unit). "
                   "'uniform' alone keeps the checkpoint in the GPTQ convention; only these are measured (with vq, "
                   "not outliers or per-ic at 2 bits nor lut at 4, which codebooks displace).")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
              help="Where blocks, calibration activations, Hessians and GPTQ run (auto: CUDA when visible).")
@click.option("--offload-activations", is_flag=True,
              help="Keep the calibration activations on CPU between blocks (the device holds one batch).")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes sharing the calibration (torch.distributed, gloo): each runs its share of the windows, "
                   "the Hessians are summed, the linears shared out; the output is the same as one process's.")
@click.option("--eval-data", type=click.Path(), help="Also measure perplexity of the quantized weights on this text.")
@click.option("--eval-seqlen", type=int, default=None,
              help="Tokens per evaluation window (default: 2048, or the model's context when shorter).")
@click.option("--eval-max-tokens", type=int, default=None, help="Evaluate only the first N tokens of the text.")
@click.option("--lossless-rest", is_flag=True,
              help="Entropy-code the tensors that stay BF16 (embeddings, norms, lm_head), bit for bit.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--resume", is_flag=True,
              help="Continue a killed run on OUT from its last finished block (same model, options and calibration "
                   "text); the result is the same as an uninterrupted run's.")
@json_option("the summary")
def quantize(model, out, method, bits, group_size, sym, act_order, static_groups, mse, true_sequential, damp, calib,
             nsamples, seqlen, seed, calib_dtype, target_bpw, measurement, plan_path, fisher_samples, fisher_labels,
             proxy, menu, device, eval_data, eval_seqlen, eval_max_tokens, lossless_rest, overwrite, resume, json_path,
             rounding, rounding_iters, tune_epochs, tune_lr, tune_batch, tune_seqlen, tune_resample, tune_self, rotate,
             nproc,
             offload_activations):
    """Quantize MODEL (a Hugging Face folder, a .gguf file or the bundled name smollm2-135m) into OUT."""
    if nproc > 1:
        sys.exit(_launched(nproc, device))
    from .. import api
    report = Report(json_path)
    calib = list(calib) or ["self"]
    if calib == ["self"] and method != "rtn":
        report.note("calibration: no --calib file given, sampling text from the model itself (--calib self)")
    s = api.quantize(model, out, method=method, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                     static_groups=static_groups, mse=mse, true_sequential=true_sequential, damp=damp, calib=calib,
                     nsamples=nsamples, seqlen=seqlen, seed=seed, calib_dtype=calib_dtype, overwrite=overwrite,
                     eval_data=eval_data, eval_seqlen=eval_seqlen, eval_max_tokens=eval_max_tokens,
                     lossless_rest=lossless_rest, target_bpw=target_bpw, measurement=measurement, plan=plan_path,
                     fisher_samples=fisher_samples, fisher_labels=fisher_labels, proxy=proxy, menu=menu, resume=resume,
                     rounding=rounding,
                     rounding_iters=rounding_iters, tune_epochs=tune_epochs, tune_lr=tune_lr, tune_batch=tune_batch,
                     tune_seqlen=tune_seqlen, tune_resample=tune_resample, tune_self=tune_self,
                     rotate=rotate, device=device,
                     offload_activations=offload_activations)
    if not s:                                   # a process other than main of a parallel run: main reports
        return
    rows = [("quantized linears", str(s["quantized_linears"])),
            ("bits per weight (all-in)", f"{s['bits_per_weight']:.3f}" + (
                f" (target {s['target_bits_per_weight']})" if s["target_bits_per_weight"] else "")),
            ("size", (f"{_mb(s['output_bytes'])} (BF16 source {_mb(s['source_bf16_bytes'])}, "
                      f"{s['output_bytes'] / s['source_bf16_bytes']:.1%})")),
            ("calibration", s["calibration"]),
            ("wall time", f"{s['seconds']:.1f} s"),
            ("peak RSS", _mb(s["peak_rss_bytes"]))]
    if s["predicted_error"] is not None:
        rows.append(("predicted loss increase", f"{s['predicted_error']:.4f} {s['predicted_error_unit']} (measurement)"))
    if s["measured_error"] is not None:
        m = s["measured_error"]
        rows.append(("measured loss increase", (f"{m['nats_per_token']:.4f} nats/token (NLL {m['base_nll']:.4f} -> "
                                                f"{m['nll']:.4f} on the {m['windows']} Fisher calibration windows)")))
    if s["eval"]:
        rows.append(("perplexity", (f"{s['eval']['perplexity']:.3f} ({s['eval']['tokens']} tokens, "
                                    f"seqlen {s['eval']['seqlen']})")))
    report.table(f"wrote {out}", rows)
    report.json(s)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _launched(nproc: int, device: str | None) -> int:
    """`bitsmith quantize --nproc N`: this command line again, without --nproc, in N processes (torchrun's
    launcher); their exit status. A placement the processes would refuse (distributed.placement) is refused here
    first, once."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise InputError("--nproc: this process is already one of several (torchrun); give one or the other")
    import torch

    from ..api import calibration_device
    from ..distributed import launch, placement
    device = calibration_device(device)
    placement(device, nproc, torch.cuda.device_count() if device != "cpu" else 0)
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    if "quantize" not in args:
        raise InputError("--nproc: run bitsmith quantize from a command line to share it among processes")
    return launch(nproc, args)


@main.command("eval")
@click.argument("model")
@click.option("--data", "data_path", type=click.Path(),
              help="Evaluation text file: perplexity (give --data, --tasks or both).")
@click.option("--seqlen", type=int, default=None,
              help="Tokens per window (default: 2048, or the model's context when shorter).")
@click.option("--max-tokens", type=int, default=None, help="Use only the first N tokens of the text.")
@click.option("--base", help="Unquantized MODEL to compare against (KL divergence, top-1 agreement).")
@click.option("--tasks", help="lm-eval tasks, comma-separated (hellaswag,arc_easy); needs the lm-eval extra.")
@click.option("--num-fewshot", type=click.IntRange(min=0), default=None,
              help="Few-shot examples per task prompt (default: each task's own).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N documents of each task.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Requests per forward pass in lm-eval.")
@click.option("--include-path", "include_path", type=click.Path(), multiple=True,
              help="Folder of extra lm-eval task YAMLs, e.g. tasks reading local data files (repeatable).")
@json_option("the result")
def eval_(model, data_path, seqlen, max_tokens, base, tasks, num_fewshot, limit, batch_size, include_path,
          json_path):
    """Perplexity of MODEL on a text (and KL / top-1 agreement against --base), and scores on lm-eval tasks."""
    from .. import api
    if data_path is None and tasks is None:
        raise InputError("give --data FILE (perplexity on a text), --tasks LIST (lm-eval tasks), or both")
    spec = manager = None
    if tasks is not None:
        from .. import harness
        spec = harness.TaskSpec(harness.parse_tasks(tasks), limit, num_fewshot, batch_size, tuple(include_path))
        manager = harness.prepare(spec)              # unknown tasks and missing data refused before the text's work
    elif include_path or num_fewshot is not None or limit is not None:
        raise InputError("--include-path, --num-fewshot and --limit apply to --tasks")
    report = Report(json_path)
    out = {"model": model, "data": data_path, "base": base}
    if data_path is not None:
        result = api.evaluate(model, data_path, seqlen=seqlen, max_tokens=max_tokens, base=base)
        rows = [("perplexity", f"{result['perplexity']:.4f}"), ("tokens", str(result["tokens"])),
                ("seqlen", str(result["seqlen"]))]
        if base:
            rows += [("base perplexity", f"{result['base_perplexity']:.4f}"),
                     ("KL to base (nats/token)", f"{result['kl']:.5f}"),
                     ("top-1 agreement", f"{result['top1_agreement']:.4f}")]
        report.table(f"eval {model}", rows)
        out.update(result)
    if spec is not None:
        result = harness.run(model, spec, manager)
        report.table(f"lm-eval {model}", [(f"{task} {metric}", f"{value:.4f}")
                                           for task, row in result["tasks"].items() for metric, value in row.items()])
        out.update(result)
    report.json(out)


@main.command()
@click.argument("path", type=click.Path())
@json_option("the table")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Draw the plan as a PNG: bits and error per layer kind and block (needs bitsmith[plot]).")
def inspect(path, json_path, plot_path):
    """Per-layer table of a bitsmith checkpoint: shape, bits, group size, all-in bits per weight, bytes."""
    from ..formats.inspect import check_plot_path, layer_table
    if plot_path:
        check_plot_path(plot_path)
    rows, totals = layer_table(path)
    if plot_path and not rows:
        raise InputError(f"--plot: {path} has no quantized linears to draw")
    report = Report(json_path)
    _layer_report(report, rows, totals)
    report.json({"layers": rows, "totals": totals})
    if plot_path:
        _plot(path, rows, totals, plot_path)


def _layer_report(report: Report, rows: list[dict], totals: dict) -> None:
    widths = (44, 12, 4, 5, 3, 8, 10, 10, 7, 12)

    def line(*cells):
        report.line(" ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths))))

    line("layer", "shape", "bits", "group", "sym", "outliers", "predicted", "loss", "bpw", "bytes")
    for r in rows:
        predicted = "-" if r["predicted_error"] is None else f"{r['predicted_error']:.3e}"
        outliers = f"{100 * r['outliers']:g}%" if r["outliers"] else "-"      # fraction of the weights kept in fp16
        group = ("lut" if r.get("lut") else f"ic{r['group_size']}" if r.get("per_ic") else
                 f"vq{r['group_size']}" if r.get("vq") else f"cb{r['group_size']}" if r.get("column_bits") else
                 f"{r['group_size']}dq" if r.get("dq") else r["group_size"])
        line(r["name"], "x".join(map(str, r["shape"])), r["bits"], group, "yes" if r["sym"] else "no",
             outliers, predicted, "-" if r["loss"] is None else f"{r['loss']:.3e}", f"{r['bpw']:.3f}", f"{r['bytes']:,}")
    predicted = "-" if totals["predicted_error"] is None else f"{totals['predicted_error']:.3e}"
    line("quantized linears", totals["layers"], "", "", "", f"{totals['outlier_weights']:,}" if
         totals["outlier_weights"] else "", predicted, "", f"{totals['bpw']:.3f}", f"{totals['quantized_bytes']:,}")
    line("other tensors", totals["other_tensors"], "", "", "", "", "", "", "", f"{totals['other_bytes']:,}")
    for c in totals.get("coded", []):
        line(c["name"] + " (coded)", "", "", "", "", "", "", "", f"{c['bits_per_value']:.3f}",
             f"{c['coded_bytes']:,}")
    line("total", "", "", "", "", "", "", "", "", f"{totals['total_bytes']:,}")
    if isinstance(totals["rotation"], dict):
        r = totals["rotation"]
        report.line(f"rotated (seed {r.get('seed')}): residual stream by {r.get('residual')}, head values by "
                    f"{r.get('head')}" + ("; lm_head untied from the embedding" if r.get("untied_lm_head") else ""))
    if totals["target_bpw"]:
        report.line(f"planned for {totals['target_bpw']} bits per weight; predicted loss increase {predicted} "
                    f"{totals['predicted_error_unit']}")


def _plot(path, rows: list[dict], totals: dict, plot_path) -> None:
    """The plan as a figure: layer kind x block, in the order of the model family's blocks."""
    from ..calibration.adapter import family_of
    from ..formats.checkpoint import Checkpoint
    from ..formats.inspect import block_grid, error_measure, plan_title, plot_plan
    family = family_of(Checkpoint(path).config or {})
    grid = block_grid(rows, family.block_prefix, family.linears)
    plot_plan(grid, plan_title(totals, path), *error_measure(rows), plot_path)


@main.command()
@click.argument("path", type=click.Path())
@json_option("the result (ok, problems)")
def verify(path, json_path):
    """Check a bitsmith checkpoint: every file's sha256 against the manifest, and its structure."""
    from ..formats.checkpoint import verify as verify_folder
    problems = verify_folder(path)
    report = Report(json_path)
    report.json({"path": path, "ok": not problems, "problems": problems})
    if problems:
        for p in problems:
            click.echo(f"FAIL {p}", err=True)
        sys.exit(2)
    report.line(f"OK {path}")


from . import export, lossless, regress  # noqa: F401  (their commands join this group)
