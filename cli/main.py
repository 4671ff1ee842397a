"""The `bitsmith` command line: parse, call the API, report. Errors follow DESIGN.md section 1."""
from __future__ import annotations

import sys

import click

from ..formats.errors import InputError


class _Group(click.Group):
    """Turns bad input into one line and exit 2, and unexpected failures into one line and exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # the last line of defence: no traceback for users
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
@click.pass_context
def main(ctx, debug):
    """bitsmith: post-training weight quantization for LLM checkpoints."""
    ctx.obj = {"debug": debug}


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@main.command()
@click.argument("model")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--method", type=click.Choice(["rtn", "gptq", "qoq"]), default="gptq", show_default=True,
              help="qoq: W4A8 layers (QServe: per-channel int8 then per-group uint4, GPTQ-compensated).")
@click.option("--bits", type=int, default=4, show_default=True, help="2, 3, 4 or 8.")
@click.option("--group-size", type=int, default=128, show_default=True, help="-1 = per output channel.")
@click.option("--sym/--asym", default=False, show_default=True)
@click.option("--act-order/--no-act-order", default=True, show_default=True)
@click.option("--static-groups", is_flag=True, help="Fit groups in original column order (no g_idx).")
@click.option("--mse/--no-mse", default=None,
              help="Shrink each grid's range to the least L^2.4 error (GPTQ's mse search). Default: on for gptq.")
@click.option("--true-sequential/--no-true-sequential", default=False, show_default=True,
              help="Take each linear's Hessian after the linears before it in the block are quantized.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="Fraction of mean diag(H).")
@click.option("--calib", multiple=True, help="Calibration text file (repeatable); 'self' = sampled from the model.")
@click.option("--nsamples", type=int, default=128, show_default=True)
@click.option("--seqlen", type=int, default=2048, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--calib-dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True,
              help="Matmul precision of calibration forwards (Hessians and GPTQ are always float32).")
@click.option("--target-bpw", type=float, default=None,
              help="Plan per-layer bits for this all-in bits per weight (measures every candidate first).")
@click.option("--measurement", type=click.Path(dir_okay=False),
              help="Re-plan from a measurement.json of an earlier --target-bpw run on the same model.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False),
              help="Apply a plan.json (every linear: bits, group_size, sym).")
@click.option("--fisher-samples", type=int, default=16, show_default=True,
              help="Calibration windows whose backward pass weights the measurement.")
@click.option("--proxy", type=click.Choice(["fisher", "hessian"]), default="fisher", show_default=True,
              help="Error the plan minimises: Fisher-weighted (predicted nats/token) or plain output error.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--eval-data", type=click.Path(), help="Also measure perplexity of the quantized weights on this text.")
@click.option("--eval-seqlen", type=int, default=2048, show_default=True)
@click.option("--eval-max-tokens", type=int, default=None)
@click.option("--lossless-rest", is_flag=True,
              help="Entropy-code the tensors that stay BF16 (embeddings, norms, lm_head), bit for bit.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the summary as JSON.")
def quantize(model, out, method, bits, group_size, sym, act_order, static_groups, mse, true_sequential, damp, calib,
             nsamples, seqlen, seed, calib_dtype, target_bpw, measurement, plan_path, fisher_samples, proxy, device,
             eval_data, eval_seqlen, eval_max_tokens, lossless_rest, overwrite, json_path):
    """Quantize MODEL (folder, .gguf or bundled name) into OUT."""
    from .. import api
    if device == "cuda":
        raise InputError("--device cuda: calibration runs on CPU in this version; use --device cpu or auto")
    calib = list(calib) or ["self"]
    if calib == ["self"] and method != "rtn":
        click.echo("calibration: no --calib file given, sampling text from the model itself (--calib self)")
    s = api.quantize(model, out, method=method, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                     static_groups=static_groups, mse=mse, true_sequential=true_sequential, damp=damp, calib=calib,
                     nsamples=nsamples, seqlen=seqlen, seed=seed, calib_dtype=calib_dtype, overwrite=overwrite,
                     eval_data=eval_data, eval_seqlen=eval_seqlen, eval_max_tokens=eval_max_tokens,
                     lossless_rest=lossless_rest, target_bpw=target_bpw, measurement=measurement, plan=plan_path,
                     fisher_samples=fisher_samples, proxy=proxy)
    rows = [("quantized linears", str(s["quantized_linears"])),
            ("bits per weight (all-in)", f"{s['bits_per_weight']:.3f}" + (
                f" (target {s['target_bits_per_weight']})" if s["target_bits_per_weight"] else "")),
            ("size", (f"{_mb(s['output_bytes'])} (BF16 source {_mb(s['source_bf16_bytes'])}, "
                      f"{s['output_bytes'] / s['source_bf16_bytes']:.1%})")),
            ("calibration", s["calibration"]),
            ("wall time", f"{s['seconds']:.1f} s"),
            ("peak RSS", _mb(s["peak_rss_bytes"]))]
    if s["predicted_error"] is not None:
        rows.append(("predicted loss increase", f"{s['predicted_error']:.4f} nats/token (measurement)"))
    if s["eval"]:
        rows.append(("perplexity", (f"{s['eval']['perplexity']:.3f} ({s['eval']['tokens']} tokens, "
                                    f"seqlen {s['eval']['seqlen']})")))
    _table(f"wrote {out}", rows)
    _write_json(json_path, s)


@main.command("eval")
@click.argument("model")
@click.option("--data", "data_path", type=click.Path(), help="Evaluation text (default: WikiText-2 test from ../shared).")
@click.option("--seqlen", type=int, default=2048, show_default=True)
@click.option("--max-tokens", type=int, default=None, help="Use only the first N tokens of the text.")
@click.option("--base", help="Unquantized MODEL to compare against (KL divergence, top-1 agreement).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the result as JSON.")
def eval_(model, data_path, seqlen, max_tokens, base, json_path):
    """Perplexity of MODEL (and KL / top-1 agreement against --base)."""
    from .. import api
    from ..calibration import data
    from ..calibration.perplexity import evaluate
    from ..formats.source import open_source
    from ..kernels.linear import cache_dequantized
    if data_path is None:
        raise InputError("--data FILE is required (the text to evaluate on)")
    text = data.read_text([data_path])
    source = open_source(model)
    ids = data.tokenize(source.tokenizer(), text)
    windows = data.eval_windows(ids, seqlen, max_tokens)
    net = api.load(model)
    cache_dequantized(net)
    base_net = api.load(base) if base else None
    result = evaluate(net, windows, base_net)
    rows = [("perplexity", f"{result['perplexity']:.4f}"), ("tokens", str(result["tokens"])),
            ("seqlen", str(result["seqlen"]))]
    if base:
        rows += [("base perplexity", f"{result['base_perplexity']:.4f}"), ("KL to base (nats/token)", f"{result['kl']:.5f}"),
                 ("top-1 agreement", f"{result['top1_agreement']:.4f}")]
    _table(f"eval {model}", rows)
    _write_json(json_path, {"model": model, "data": data_path, "base": base, **result})


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the table as JSON.")
def inspect(path, json_path):
    """Per-layer table of a bitsmith checkpoint: shape, bits, group size, all-in bits per weight, bytes."""
    from ..formats.inspect import layer_table
    rows, totals = layer_table(path)
    widths = (44, 12, 4, 5, 3, 10, 10, 7, 12)

    def line(*cells):
        click.echo(" ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths))))

    line("layer", "shape", "bits", "group", "sym", "predicted", "loss", "bpw", "bytes")
    for r in rows:
        predicted = "-" if r["predicted_error"] is None else f"{r['predicted_error']:.3e}"
        line(r["name"], "x".join(map(str, r["shape"])), r["bits"], r["group_size"], "yes" if r["sym"] else "no",
             predicted, f"{r['loss']:.3e}", f"{r['bpw']:.3f}", f"{r['bytes']:,}")
    predicted = "-" if totals["predicted_error"] is None else f"{totals['predicted_error']:.3e}"
    line("quantized linears", totals["layers"], "", "", "", predicted, "", f"{totals['bpw']:.3f}",
         f"{totals['quantized_bytes']:,}")
    line("other tensors", totals["other_tensors"], "", "", "", "", "", "", f"{totals['other_bytes']:,}")
    for c in totals.get("coded", []):
        line(c["name"] + " (coded)", "", "", "", "", "", "", f"{c['bits_per_value']:.3f}", f"{c['coded_bytes']:,}")
    line("total", "", "", "", "", "", "", "", f"{totals['total_bytes']:,}")
    if totals["target_bpw"]:
        click.echo(f"planned for {totals['target_bpw']} bits per weight; predicted loss increase {predicted} nats/token")
    _write_json(json_path, {"layers": rows, "totals": totals})


@main.command()
@click.argument("path", type=click.Path())
def verify(path):
    """Check a bitsmith checkpoint: every file's sha256 against the manifest, and its structure."""
    from ..formats.checkpoint import verify as verify_folder
    problems = verify_folder(path)
    if problems:
        for p in problems:
            click.echo(f"FAIL {p}", err=True)
        sys.exit(2)
    click.echo(f"OK {path}")


from .lossless import compress, decompress  # commands defined beside this group

main.add_command(compress)
main.add_command(decompress)


def _table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    click.echo(title)
    for k, v in rows:
        click.echo(f"  {k:<{width}}  {v}")


def _write_json(path, payload) -> None:
    if path:
        import json
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, default=str)
            f.write("\n")
