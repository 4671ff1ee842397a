"""The quantize job (DESIGN.md section 2): stream the checkpoint block by block, capture each block's
inputs, accumulate Hessians, quantize every linear, re-run the quantized block to make the next block's
inputs, and write a packed checkpoint. Only one block's weights are ever in memory."""
from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .calibration import data
from .calibration.adapter import BlockRunner
from .calibration.hessian import Hessian
from .calibration.perplexity import summarize, window_stats
from .formats.errors import InputError
from .formats.source import ModelSource
from .layouts import GPTQLayout
from .plan import LayerPlan, QuantizeOptions, QuantPlan, check_group
from .quantize.gptq import gptq_quantize
from .quantize.qoq import qoq_quantize
from .quantize.rtn import rtn_quantize


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    bits: int
    group_size: int
    stored_bytes: int
    loss: float


@dataclass
class Result:
    layers: list[LayerReport] = field(default_factory=list)
    calibration: str = ""
    calibration_fingerprint: str = ""
    eval: dict | None = None

    @property
    def bpw(self) -> float:
        weights = sum(l.shape[0] * l.shape[1] for l in self.layers)
        return 8 * sum(l.stored_bytes for l in self.layers) / max(weights, 1)


def quantize_linear(W: torch.Tensor, H: Hessian | None, opts: QuantizeOptions, layer: LayerPlan):
    """(Q the block runs on from now, tensors to store, GPTQ loss) of one linear under its plan entry."""
    if opts.method == "rtn":
        qw = rtn_quantize(W, layer.bits, layer.group_size, layer.sym, opts.mse)
        return qw.Q, GPTQLayout.tensors(qw), qw.loss
    if opts.method == "gptq":
        qw = gptq_quantize(W, H.H, layer.bits, layer.group_size, layer.sym, opts.act_order, opts.static_groups,
                           opts.damp, mse=opts.mse)
        return qw.Q, GPTQLayout.tensors(qw), qw.loss
    qw = qoq_quantize(W, H.H, layer.group_size, opts.damp)              # W4A8 (QServe progressive)
    return qw.Q, qw.tensors(), 0.0


def calibration_windows(source: ModelSource, tokenizer, opts: QuantizeOptions, progress: bool):
    """[nsamples, seqlen] token windows and a description of where they came from."""
    if opts.calib == ["self"]:
        from .loader import load_model
        model = load_model(source, dtype=torch.float32)
        vocab = model.config.vocab_size
        windows = data.self_windows(model, opts.nsamples, opts.seqlen, opts.seed, vocab)
        return windows, f"self: {opts.nsamples} x {opts.seqlen} tokens sampled from the model (seed {opts.seed})"
    if "self" in opts.calib:
        raise InputError("--calib self cannot be mixed with calibration files")
    ids = data.tokenize(tokenizer, data.read_text(opts.calib))
    windows = data.random_windows(ids, opts.nsamples, opts.seqlen, opts.seed)
    return windows, f"{', '.join(opts.calib)}: {opts.nsamples} x {opts.seqlen} tokens (seed {opts.seed})"


class _InputsCaptured(Exception):
    """Raised by the last linear's hook: the rest of the block is not needed for statistics."""


def compute(opts: QuantizeOptions):
    """Precision of calibration forwards: matmuls in bf16 with fp32 residual stream (autocast), or fp32.
    Hessians and GPTQ itself always run in fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=opts.calib_dtype == "bfloat16")


def collect_hessians(runner: BlockRunner, block, hidden: torch.Tensor, pos, opts: QuantizeOptions,
                     groups: tuple[tuple[str, ...], ...]) -> dict:
    """H = 2XX^T/n of the shared input of each sibling group in `groups`, over all calibration windows.
    The forward of each batch stops at the input of the last of them."""
    hessians, hooks = {}, []
    for group in groups:
        lin = block.get_submodule(group[0])
        hessians[group] = Hessian(lin.in_features)

        def hook(module, args, h=hessians[group], stop=group is groups[-1]):
            h.add(args[0])
            if stop:
                raise _InputsCaptured
        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        with compute(opts):
            for x in _batches(hidden, opts.batch):
                with contextlib.suppress(_InputsCaptured):
                    runner.forward_block(block, x, pos)
    finally:
        for h in hooks:
            h.remove()
    return hessians


def sequential_stages(siblings: tuple[tuple[str, ...], ...], true_sequential: bool):
    """Sibling groups quantized together. True-sequential (GPTQ code `--true-sequential`): one group at a
    time, each group's Hessian taken on inputs that already pass through the quantized groups before it."""
    return [(group,) for group in siblings] if true_sequential else [siblings]


def forward_in_place(runner: BlockRunner, block, hidden: torch.Tensor, pos, batch: int) -> None:
    """hidden <- block(hidden), one batch of windows at a time (no second activation-sized buffer)."""
    for start in range(0, hidden.shape[0], batch):
        hidden[start:start + batch] = runner.forward_block(block, hidden[start:start + batch], pos)


def _batches(x: torch.Tensor, size: int):
    return [x[i:i + size] for i in range(0, x.shape[0], size)]


@torch.no_grad()
def linear_shapes(runner: BlockRunner) -> dict[str, tuple[int, int]]:
    """(out, in) of every decoder linear by full name, from the skeleton (shapes only, no weights)."""
    family = runner.family
    return {family.block_prefix.format(i=i) + name: tuple(block.get_submodule(name).weight.shape)
            for i, block in enumerate(runner.model.model.layers) for name in family.linears}


def run(source: ModelSource, writer, plan: QuantPlan, eval_ids: torch.Tensor | None = None,
        progress: bool = True, store=None) -> Result:
    """Quantize every decoder linear of `source` into `writer` as `plan` says; optionally measure perplexity
    of the quantized weights on `eval_ids` windows, streamed through the same blocks. `store(name, tensor)`
    writes the tensors that stay unquantized (default: `writer.add`)."""
    store = store or writer.add
    opts = plan.options
    runner = BlockRunner(source.config)
    family = runner.family
    for name, (_, in_features) in linear_shapes(runner).items():
        check_group(plan.layers[name].group_size, name, in_features, opts.method)
    result = Result(calibration="none: RTN uses no calibration data")
    hidden = held = None
    if opts.method != "rtn" or eval_ids is not None:
        embed = source.get(family.embed).to(torch.float32)
        if opts.method != "rtn":
            windows, result.calibration = calibration_windows(source, source.tokenizer(), opts, progress)
            result.calibration_fingerprint = data.fingerprint(windows)
            hidden = F.embedding(windows, embed)                           # [n, seqlen, d]
        if eval_ids is not None:
            held = F.embedding(eval_ids, embed)
        del embed

    bar = tqdm(range(runner.n_blocks), desc=f"{opts.method}", unit="block", disable=not progress)
    for i in bar:
        prefix = family.block_prefix.format(i=i)
        names = runner.block_names(i)
        missing = [n for n in names if n not in source]
        if missing:
            raise InputError(f"{source.name}: tensor {missing[0]} is missing")
        tensors = {n: source.get(n) for n in names}
        block = runner.build_block(i, tensors)

        pos = runner.position_embeddings(hidden[:1]) if hidden is not None else None
        for stage in sequential_stages(family.siblings, opts.true_sequential):
            hessians = collect_hessians(runner, block, hidden, pos, opts, stage) if opts.method != "rtn" else {}
            for group in stage:
                for name in group:
                    result.layers.append(_quantize_into(block, prefix, name, hessians.get(group), plan, writer,
                                                        tensors))
        quantized = {prefix + n for n in family.linears}
        for n, t in tensors.items():
            if n.rsplit(".", 1)[0] not in quantized:
                store(n, t)

        if hidden is not None:
            with compute(opts):
                forward_in_place(runner, block, hidden, pos, opts.batch)
        if held is not None:
            forward_in_place(runner, block, held, runner.position_embeddings(held[:1]), opts.batch)
        runner.release_block(i)
        del block, tensors

    for name in (family.embed, family.final_norm, family.lm_head):
        if name in source:
            store(name, source.get(name))
    if held is not None:
        result.eval = _held_out_perplexity(source, family, held, eval_ids, runner)
    return result


def _quantize_into(block, prefix: str, name: str, H, plan: QuantPlan, writer, tensors) -> LayerReport:
    """Quantize one linear of `block` in place (its weight becomes Q) and write its packed tensors."""
    lin, full = block.get_submodule(name), prefix + name
    layer = plan.layers[full]
    try:
        Q, stored, loss = quantize_linear(lin.weight.data, H, plan.options, layer)
    except ValueError as e:
        raise InputError(f"{full}: {e}") from None
    lin.weight.data = Q
    for suffix, t in stored.items():
        writer.add(f"{full}.{suffix}", t)
    if lin.bias is not None:
        writer.add(f"{full}.bias", tensors[f"{full}.bias"])
    size = sum(t.numel() * t.element_size() for t in stored.values())
    return LayerReport(full, tuple(lin.weight.shape), layer.bits, layer.group_size, size, loss)


def _held_out_perplexity(source, family, held, eval_ids, runner) -> dict:
    """Finish the streamed evaluation: final norm and lm_head on the last block's outputs."""
    norm = runner.model.model.norm.to_empty(device="cpu")
    norm.weight.data = source.get(family.final_norm).to(torch.float32)
    head = source.get(family.lm_head if family.lm_head in source else family.embed).to(torch.float32)
    nll = 0.0
    for h, ids in zip(held, eval_ids):
        nll += window_stats(norm(h[None])[0] @ head.t(), ids)[0]
    return summarize(nll, eval_ids.shape[0], eval_ids.shape[1])


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Stopwatch:
    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0
