"""The quantize job (DESIGN.md section 2): stream the checkpoint block by block and write a packed checkpoint.
Each block goes through three steps: statistics (its inputs captured, Hessians accumulated), quantize (every
linear the plan names, written packed), propagate (the block re-run on its weights as stored, making the next
block's inputs). Only one block's weights are ever in memory.

Every finished block is journaled by the writer (formats/journal.py). A run continuing a killed one
(`--resume`) replays only the propagate step of the blocks the journal holds, on their stored weights: the
next block gets exactly the inputs an uninterrupted run gives it, so the result is the same, bit for bit.

With `--tune-epochs` the written model is then tuned end to end (quantize/tune.py), all its blocks in memory at
once: the tuned levels and norms replace what was written (unjournaled: a run resumed after that redoes it)."""
from __future__ import annotations

import contextlib
import copy
import resource
import time
from dataclasses import asdict, dataclass, field

import psutil
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from .calibration import data
from .calibration.adapter import AttentionCache, BlockRunner
from .calibration.hessian import Hessian
from .calibration.perplexity import summarize, window_stats
from .distributed import SOLO, World, broadcast_from_main, from_owners, gathered_list, reduce_hessians
from .formats import faults
from .formats.errors import InputError
from .formats.source import ModelSource
from .kernels.reference import qoq_dequantize
from .layouts import layout_of
from .memory import BATCH_THRESHOLD, keeping_freed_memory, mmap_threshold, release_freed_memory
from .plan import LayerPlan, QuantizeOptions, QuantPlan, check_layer
from .quantize.column_bits import gptq_column_bits
from .quantize.gptq import gptq_quantize, unquantized_target
from .quantize.lut import gptq_lut
from .quantize.qoq import qoq_quantize
from .quantize.rtn import rtn_quantize
from .quantize.signround import layer_output_error, signround
from .quantize.tune import Relative, TunedLinear, kept_blocks, resampled, saved_bytes, tune
from .quantize.vq import gptq_vq


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    bits: int
    group_size: int
    stored_bytes: int
    loss: float | None              # GPTQ's loss; None where the method measures none (RTN, QoQ)


@dataclass
class Result:
    layers: list[LayerReport] = field(default_factory=list)
    calibration: str = ""
    calibration_fingerprint: str = ""
    eval: dict | None = None
    calibration_nll: float | None = None    # the quantized model's mean NLL on the first `loss_windows` windows

    @property
    def bpw(self) -> float:
        weights = sum(l.shape[0] * l.shape[1] for l in self.layers)
        return 8 * sum(l.stored_bytes for l in self.layers) / max(weights, 1)


def quantize_linear(W: torch.Tensor, H: Hessian | None, opts: QuantizeOptions, layer: LayerPlan):
    """(quantized weight, tensors to store (on CPU), GPTQ loss) of one linear under its plan entry, computed on
    the device W is on (tensors the quantizers make go there too; on CPU, where they go anyway, without the
    device context, whose Python handler sits on every torch call of the column loop)."""
    with contextlib.nullcontext() if W.device.type == "cpu" else torch.device(W.device):
        qw, stored, loss = _quantize_linear(W, H, opts, layer)
    return qw, {name: t.cpu() for name, t in stored.items()}, None if loss is None else float(loss)


def _quantize_linear(W: torch.Tensor, H: Hessian | None, opts: QuantizeOptions, layer: LayerPlan):
    if H is not None and H.drift is not None:           # --rounding gptaq: toward the unquantized outputs
        W = unquantized_target(W, H.H, H.drift, opts.damp)
    if opts.method == "rtn":
        qw = rtn_quantize(W, layer.bits, layer.group_size, layer.sym, opts.mse)
        return qw, layout_of(layer).tensors(qw), qw.loss
    if opts.method == "gptq" and layer.vq:
        qw, _ = gptq_vq(W, H.H, layer.bits, layer.group_size, opts.act_order, opts.damp)
        return qw, layout_of(layer).tensors(qw), qw.loss
    if opts.method == "gptq" and layer.column_bits:
        qw = gptq_column_bits(W, H.H, layer.bits, layer.group_size, opts.act_order, opts.damp, opts.mse)
        return qw, layout_of(layer).tensors(qw), qw.loss
    if opts.method == "gptq" and layer.lut:
        qw = gptq_lut(W, H.H, layer.bits, opts.act_order, opts.damp)
        return qw, layout_of(layer).tensors(qw), qw.loss
    if opts.method == "gptq":
        qw = gptq_quantize(W, H.H, layer.bits, layer.group_size, layer.sym, opts.act_order, opts.static_groups,
                           opts.damp, mse=opts.mse, outliers=layer.outliers, per_ic=layer.per_ic, dq=layer.dq)
        return qw, layout_of(layer).tensors(qw), qw.loss
    qw = qoq_quantize(W, H.H, layer.group_size, opts.damp)              # W4A8 (QServe progressive)
    return qw, qw.tensors(), None


def stored_weight(stored, layer: LayerPlan, method: str, in_features: int) -> torch.Tensor:
    """The float32 weight a linear's stored tensors load as (`stored(suffix)` gives each): exactly the Q its
    quantizer returned, and what the block runs on from then on."""
    if method == "qoq":
        return qoq_dequantize(stored("qweight"), stored("channel_scale"), stored("group_scale"),
                              stored("group_zero"), in_features, layer.group_size)
    return layout_of(layer).weight(stored, layer, in_features)


@dataclass
class Calibration:
    """The calibration windows ([nsamples, seqlen] token ids; None for RTN), where they came from, their
    sha256; `tuning`: the windows sampled from the model that tuning alone reads beside them (--tune-self)."""
    windows: torch.Tensor | None
    description: str
    fingerprint: str
    tuning: torch.Tensor | None = None


def calibration(source: ModelSource, opts: QuantizeOptions, progress: bool = True) -> Calibration:
    """The windows the run calibrates on (none for RTN), and those tuning reads beside them."""
    if opts.method == "rtn":
        return Calibration(None, "none: RTN uses no calibration data", "")
    tuning = opts.tune_self if opts.tune_epochs else 0
    windows, description, own = drawn_windows(source, source.tokenizer(), opts, tuning)
    if tuning:
        texts = "" if opts.tune_seqlen <= opts.seqlen else f" (texts of {opts.tune_seqlen})"
        description += (f"; tuning also reads {tuning} x {opts.seqlen} tokens sampled from the model{texts} "
                        "(--tune-self)")
    return Calibration(windows, description, data.fingerprint(windows), own)


def calibration_windows(source: ModelSource, tokenizer, opts: QuantizeOptions, progress: bool):
    """[nsamples, seqlen] token windows and a description of where they came from. `self` among calibration files
    gives half the windows, sampled from the model, interleaved with the files' (the first windows, which weigh
    the measurement, hold both)."""
    windows, description, _ = drawn_windows(source, tokenizer, opts)
    return windows, description


def drawn_windows(source: ModelSource, tokenizer, opts: QuantizeOptions, tuning: int = 0):
    """`calibration_windows`, and `tuning` windows more sampled from the model (None when 0): drawn after those
    of the calibration windows by the same generator, as whole texts of tuning's sequence length (--tune-seqlen)
    cut into consecutive windows, which tuning joins again. The model samples with its weights in
    `compute_dtype` (bf16 by default)."""
    files = [c for c in opts.calib if c != "self"]
    if not files:
        sampled = opts.nsamples                          # the model's samples alone (also with no --calib)
    else:
        sampled = opts.nsamples // 2 if "self" in opts.calib else 0
    own = extra = None
    if sampled or tuning:
        from .loader import load_model
        model = load_model(source, dtype=compute_dtype(opts))
        generator, vocab = torch.Generator().manual_seed(opts.seed), model.config.vocab_size
        own = data.self_windows(model, sampled, opts.seqlen, generator, vocab) if sampled else None
        if tuning:
            length = max(opts.tune_seqlen, opts.seqlen)
            texts = data.self_windows(model, tuning * opts.seqlen // length, length, generator, vocab)
            extra = texts.reshape(tuning, opts.seqlen)
        del model
    what = f"{sampled} x {opts.seqlen} tokens sampled from the model (seed {opts.seed})"
    if not files:
        return own, f"self: {what}", extra
    ids = data.tokenize(tokenizer, data.read_text(files))
    windows = data.random_windows(ids, opts.nsamples - sampled, opts.seqlen, opts.seed)
    if sampled:
        mixed = torch.empty(opts.nsamples, opts.seqlen, dtype=windows.dtype)
        mixed[0::2], mixed[1::2] = windows, own
        return mixed, (f"{', '.join(files)}: {opts.nsamples - sampled} x {opts.seqlen} tokens (seed {opts.seed}), "
                       f"interleaved with {what}"), extra
    return windows, f"{', '.join(opts.calib)}: {opts.nsamples} x {opts.seqlen} tokens (seed {opts.seed})", extra


class _InputsCaptured(Exception):
    """Raised by the last linear's hook: the rest of the block is not needed for statistics."""


def compute_dtype(opts: QuantizeOptions) -> torch.dtype:
    """The dtype of calibration's matrix products (`--calib-dtype`): of `compute`'s autocast, of the weights that
    sample `self` and of the levels tuning learns."""
    return getattr(torch, opts.calib_dtype)


def compute(opts: QuantizeOptions):
    """Precision of calibration forwards: matmuls in bf16 with fp32 residual stream (autocast), or fp32.
    Hessians and GPTQ itself always run in fp32."""
    return torch.autocast(torch.device(opts.device).type, dtype=torch.bfloat16, enabled=opts.calib_dtype == "bfloat16")


def collect_hessians(runner: BlockRunner, block, hidden: torch.Tensor, pos, opts: QuantizeOptions,
                     groups: tuple[tuple[str, ...], ...], in_place: bool = False,
                     attention: AttentionCache | None = None) -> dict:
    """H = 2XX^T/n of the shared input of each sibling group in `groups`, over all calibration windows.
    The forward of each batch stops at the input of the last of them; `in_place` runs it to the end instead
    and leaves the block's outputs in `hidden` (the block's weights stay as they are: one forward for both).
    `attention`: the block's attention outputs of `hidden`, kept or used."""
    attention = attention or AttentionCache(hidden.device)
    hessians, hooks = {}, []
    for group in groups:
        lin = block.get_submodule(group[0])
        hessians[group] = Hessian(lin.in_features, runner.device)

        def hook(module, args, h=hessians[group], stop=group is groups[-1]):
            h.add(args[0])
            if stop and not in_place:
                raise _InputsCaptured
        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        with compute(opts):
            for start in range(0, hidden.shape[0], opts.batch):
                window = slice(start, start + opts.batch)
                with contextlib.suppress(_InputsCaptured):
                    out = attention.forward(runner, block, hidden[window], pos, window)
                    if in_place:
                        hidden[start:start + opts.batch] = out
    finally:
        for h in hooks:
            h.remove()
    return hessians


def collect_paired(runner: BlockRunner, block, unquantized_block, hidden: torch.Tensor, unquantized: torch.Tensor,
                   pos, opts: QuantizeOptions, groups: tuple[tuple[str, ...], ...], last: bool = False,
                   attention: tuple[AttentionCache, AttentionCache] | None = None,
                   fold_unquantized: bool = False) -> dict:
    """The Hessians of `collect_hessians` (inputs X~ in the quantized model: `hidden` through `block`), each with
    `drift` = 2 (X - X~) X~^T / n, X the same tokens' inputs of that linear in the unquantized model (`unquantized`
    through `unquantized_block`, on its source weights): the statistics of GPTQ toward the unquantized outputs
    (quantize/gptq.py `unquantized_target`). Where the two inputs agree, the drift is exactly 0. At the `last`
    stage the unquantized forward runs to the end and leaves the block's outputs in `unquantized`. `attention`: the
    block's attention outputs of `hidden` and of `unquantized`, kept or used; with `fold_unquantized` (o_proj's stage,
    not the last: o_proj's source weights are final) the unquantized stream's are folded into it batch by batch,
    after each batch's forward, so that they are never all held at once."""
    seen, hessians, drift, hooks = {}, {}, {}, []
    quantized_attention, unquantized_attention = attention or (AttentionCache(hidden.device),
                                                               AttentionCache(hidden.device))
    for group in groups:
        lin = block.get_submodule(group[0])
        hessians[group] = Hessian(lin.in_features, runner.device)
        drift[group] = torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64, device=runner.device)

        def unquantized_input(module, args, group=group, stop=group is groups[-1] and not last):
            seen[group] = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            if stop:
                raise _InputsCaptured

        def quantized_input(module, args, group=group, stop=group is groups[-1]):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            hessians[group].add(x)
            drift[group] += ((seen.pop(group) - x).t() @ x).to(torch.float64)   # bf16 under bf16 autocast
            if stop:
                raise _InputsCaptured
        hooks.append(unquantized_block.get_submodule(group[0]).register_forward_pre_hook(unquantized_input))
        hooks.append(lin.register_forward_pre_hook(quantized_input))
    try:
        with compute(opts):
            for start in range(0, hidden.shape[0], opts.batch):
                window = slice(start, start + opts.batch)
                out = unquantized_attention.forward(runner, unquantized_block, unquantized[window], pos,
                                                    window) if last else None
                if out is None:
                    with contextlib.suppress(_InputsCaptured):
                        unquantized_attention.forward(runner, unquantized_block, unquantized[window], pos, window)
                    if fold_unquantized:
                        unquantized_attention.fold(runner, unquantized_block, unquantized, window)
                with contextlib.suppress(_InputsCaptured):
                    quantized_attention.forward(runner, block, hidden[window], pos, window)
                if out is not None:
                    unquantized[window] = out
    finally:
        for h in hooks:
            h.remove()
    for group, h in hessians.items():
        h.drift = (drift[group] * (2.0 / max(h.n, 1))).to(torch.float32)
    return hessians


def sequential_stages(siblings: tuple[tuple[str, ...], ...], true_sequential: bool):
    """Sibling groups quantized together. True-sequential (GPTQ code `--true-sequential`): one group at a
    time, each group's Hessian taken on inputs that already pass through the quantized groups before it."""
    return [(group,) for group in siblings] if true_sequential else [siblings]


def forward_in_place(runner: BlockRunner, block, hidden: torch.Tensor, pos, batch: int) -> None:
    """hidden <- block(hidden), one batch of windows at a time (no second activation-sized buffer)."""
    for start in range(0, hidden.shape[0], batch):
        hidden[start:start + batch] = runner.forward_block(block, hidden[start:start + batch], pos)


@torch.no_grad()
def linear_shapes(runner: BlockRunner) -> dict[str, tuple[int, int]]:
    """(out, in) of every decoder linear by full name, from the skeleton (shapes only, no weights)."""
    family = runner.family
    return {family.block_prefix.format(i=i) + name: tuple(block.get_submodule(name).weight.shape)
            for i, block in enumerate(runner.model.model.layers) for name in family.linears}


@dataclass
class Streams:
    """Hidden states carried from block to block: of the calibration windows, and of the held-out windows the
    run evaluates on (each None when absent); with learned rounding, also of the calibration windows in the
    unquantized model (its targets)."""
    hidden: torch.Tensor | None = None
    held: torch.Tensor | None = None
    unquantized: torch.Tensor | None = None

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.held is not None


def embed(source: ModelSource, family, windows: torch.Tensor | None, eval_ids: torch.Tensor | None,
          where: str | torch.device = "cpu") -> Streams:
    """The streams entering the first block: the token embeddings of both sets of windows, on `where`."""
    if windows is None and eval_ids is None:
        return Streams()
    table = source.get(family.embed).to(torch.float32)
    return Streams(None if windows is None else F.embedding(windows, table).to(where),        # [n, seqlen, d]
                   None if eval_ids is None else F.embedding(eval_ids, table).to(where))


def run(source: ModelSource, writer, plan: QuantPlan, eval_ids: torch.Tensor | None = None,
        progress: bool = True, coder=None, calib: Calibration | None = None, loss_windows: int = 0,
        world: World = SOLO) -> Result:
    """Quantize every decoder linear of `source` into `writer` (a CheckpointWriter) as `plan` says, on `calib`
    (made here when not given); optionally measure perplexity of the quantized weights on `eval_ids` windows,
    streamed through the same blocks. `coder` (a dfloat.CodedWriter on `writer`) stores the tensors that stay
    unquantized. Blocks the writer's journal holds (a resumed run) are replayed, not quantized again. With
    `loss_windows`, the quantized model's mean NLL on that many first calibration windows (the measured side of
    the plan's predicted error) comes from the calibration stream at the end.

    In a run of several processes (bitsmith/distributed.py), `world` is this one's place: it carries its share
    of the calibration windows, and the rank that is not main writes nothing (`writer` discards)."""
    opts = plan.options
    runner = BlockRunner(source.config, opts.device)
    family = runner.family
    for name, (_, in_features) in linear_shapes(runner).items():
        check_layer(plan.layers[name], name, in_features, opts.method)
    calib = calib or calibration(source, opts, progress)
    result = Result(calibration=calib.description, calibration_fingerprint=calib.fingerprint)
    share = world.share(calib.windows.shape[0], opts.batch) if calib.windows is not None else slice(0, 0)
    streams = embed(source, family, None if calib.windows is None else calib.windows[share], eval_ids,
                    "cpu" if opts.offload_activations else opts.device)
    learned = opts.rounding in ("signround", "gptaq")       # the blocks take the unquantized stream along
    if (learned or opts.tune_epochs) and streams.hidden is not None:
        streams.unquantized = streams.hidden.clone()
    done = broadcast_from_main(finished_blocks(writer, coder, result), world)
    mine = range(share.start, min(share.stop, loss_windows))      # this rank's windows among the first loss_windows
    last = {runner.n_blocks - 1: len(mine)}                       # after the last block, only they are read
    store = coder.add if coder else writer.add

    for i in tqdm(range(runner.n_blocks), desc=f"{opts.method}", unit="block", disable=not progress):
        if i < done:
            if streams.unquantized is not None:
                propagate_unquantized(runner, source_block(runner, source, i)[0], streams.unquantized, opts)
            if streams.any:
                propagate(runner, stored_block(runner, source, writer, plan, i, world), streams, opts, last.get(i))
        else:
            if streams.unquantized is not None and not learned:
                propagate_unquantized(runner, source_block(runner, source, i)[0], streams.unquantized, opts)
            with mmap_threshold(BATCH_THRESHOLD):       # the block's passes reuse their batches' temporaries
                block, layers, attention = quantize_block(runner, source, writer, plan, i, streams.hidden, store,
                                                          streams.unquantized if learned else None, world)
                result.layers += layers
                finish_block(writer, coder, i, layers)
                propagate(runner, block, streams, opts, last.get(i), attention)
                del attention
        runner.release_block(i)
        release_freed_memory()
    final = {name: source.get(name) for name in (family.embed, family.final_norm, family.lm_head) if name in source}
    if opts.tune_epochs:
        tuned = tune_written(runner, source, writer, plan, calib.windows, streams, eval_ids, len(mine), progress,
                             calib.tuning)
        final[family.final_norm] = tuned.to(final[family.final_norm].dtype)
    streams.unquantized = None          # the targets of the last block: not read again (151 MB on SmolLM2)
    release_freed_memory()

    for name, t in final.items():
        store(name, t)
    if streams.held is not None or (loss_windows and streams.hidden is not None):
        norm, head = _final_layers(source, family, runner)
        norm.weight.data = final[family.final_norm].to(torch.float32)      # tuned, with --tune-epochs
        if streams.held is not None:
            result.eval = summarize(sum(_nlls(norm, head, streams.held, eval_ids)), *eval_ids.shape)
        if loss_windows and streams.hidden is not None:
            nlls = gathered_list(_nlls(norm, head, streams.hidden[:len(mine)], calib.windows[mine.start:mine.stop]),
                                 world)
            result.calibration_nll = sum(nlls) / (loss_windows * (calib.windows.shape[1] - 1))
    return result


def source_block(runner: BlockRunner, source: ModelSource, i: int):
    """Block i with the source's weights, and those tensors by full name."""
    names = runner.block_names(i)
    missing = [n for n in names if n not in source]
    if missing:
        raise InputError(f"{source.name}: tensor {missing[0]} is missing")
    tensors = {n: source.get(n) for n in names}
    return runner.build_block(i, tensors), tensors


def quantize_block(runner: BlockRunner, source: ModelSource, writer, plan: QuantPlan, i: int,
                   hidden: torch.Tensor | None, store, unquantized: torch.Tensor | None = None,
                   world: World = SOLO):
    """Statistics and quantize steps of block i, stage by stage (`sequential_stages`): every linear written
    packed and left holding its stored weight, the other tensors given to `store`. The block and its
    linears' reports. With learned rounding, `unquantized` (the calibration windows' hidden states in the
    unquantized model) goes through the unquantized block first, in place, and the quantized linears are
    refined toward it (`refine_block`) before they are written. With `--rounding gptaq` each stage's linears
    are quantized toward their outputs in the unquantized model (`collect_paired`), whose last stage also takes
    `unquantized` through the block. Several processes (`world`) sum their Hessians and share the linears of each
    stage out among them (`quantize_shared`). With sequential stages each stream's attention outputs are kept at
    o_proj's stage and, once o_proj is quantized, folded into the stream (`AttentionCache`): the stages after it and
    the propagation (which takes the returned cache) run the MLP half alone."""
    opts, family = plan.options, runner.family
    prefix = family.block_prefix.format(i=i)
    block, tensors = source_block(runner, source, i)
    pos = runner.position_embeddings(hidden[:1]) if hidden is not None else None
    paired = copy.deepcopy(block) if unquantized is not None and opts.rounding == "gptaq" else None   # source weights
    starts = {} if unquantized is not None and paired is None else None
    if starts is not None:
        propagate_unquantized(runner, block, unquantized, opts)
    layers = []
    stages = sequential_stages(family.siblings, opts.true_sequential)
    # attention outputs kept once q/k/v are final: not with learned rounding, which changes them all at the end
    device = hidden.device if hidden is not None else "cpu"
    attention, unquantized_attention = AttentionCache(device), AttentionCache(device, final=True)
    for stage in stages:
        # after o_proj's stage (not the last, whose forwards run to the end) the streams hold the residual
        folds = stage is not stages[-1] and any(family.attention_out in group for group in stage)
        if paired is not None:      # the last stage also takes the unquantized stream through the block
            hessians = collect_paired(runner, block, paired, hidden, unquantized, pos, opts, stage, stage is stages[-1],
                                      (attention, unquantized_attention), folds)
        else:
            hessians = (collect_hessians(runner, block, hidden, pos, opts, stage, attention=attention)
                        if opts.method != "rtn" else {})
        reduce_hessians(hessians, world)
        if starts is None:                  # no learned rounding: each linear's result is final, one way for all
            layers += quantize_shared(block, prefix, stage, hessians, plan, writer, tensors, world)
            attention.final = attention.final or family.siblings[0] in stage
            if folds:                                    # o_proj quantized: the calibration stream to the residual
                with compute(opts):
                    attention.fold(runner, block, hidden)
            release_freed_memory()                       # the stage's temporaries, before the next one's
            continue
        for group in stage:                 # learned rounding: every linear waits for the block's refinement
            for name in group:
                _start_into(block, prefix, name, hessians.get(group), plan, starts)
    if starts is not None:
        layers = refine_block(runner, block, prefix, i, hidden, pos, unquantized, starts, plan, writer, tensors)
    quantized = {prefix + n for n in family.linears}
    for n, t in tensors.items():
        if n.rsplit(".", 1)[0] not in quantized:
            store(n, t)
    return block, layers, attention if starts is None else None


def quantize_shared(block, prefix: str, stage, hessians: dict, plan: QuantPlan, writer, tensors,
                    world: World) -> list[LayerReport]:
    """The linears of one stage quantized, then written in the stage's order (by main). In a run of several
    processes (`world`) each linear is quantized by one of them (the cost of GPTQ on a linear grows as
    out x in^2) and its result given to all; alone, all of them here."""
    jobs = [(group, name) for group in stage for name in group]
    weights = [block.get_submodule(name).weight.data for _, name in jobs]
    results = from_owners([lambda W=W, group=group, name=name: _quantized(W, hessians.get(group), plan, prefix + name)
                           for W, (group, name) in zip(weights, jobs)],
                          [W.shape[0] * W.shape[1] ** 2 for W in weights], world)
    return [_write_into(block, prefix, name, stored, loss, plan, writer, tensors)
            for (_, name), (stored, loss) in zip(jobs, results)]


def _quantized(W: torch.Tensor, H, plan: QuantPlan, full: str) -> tuple[dict, float | None]:
    """The tensors to store of one linear and its loss."""
    try:
        _, stored, loss = quantize_linear(W, H, plan.options, plan.layers[full])
    except ValueError as e:
        raise InputError(f"{full}: {e}") from None
    return stored, loss


def propagate(runner: BlockRunner, block, streams: Streams, opts: QuantizeOptions, hidden_windows: int | None = None,
              attention: AttentionCache | None = None) -> None:
    """The propagate step: both streams through the (quantized) block, in place; of the calibration stream, only
    the first `hidden_windows` when given (after the last block, only those the run still reads), from the
    attention outputs `attention` kept of it where there are."""
    if streams.hidden is not None and hidden_windows != 0:
        hidden = streams.hidden[:hidden_windows]
        attention = attention or AttentionCache(hidden.device)
        pos = runner.position_embeddings(hidden[:1])
        with compute(opts):
            for start in range(0, hidden.shape[0], opts.batch):
                window = slice(start, start + opts.batch)
                hidden[window] = attention.forward(runner, block, hidden[window], pos, window, keep=False)
    if streams.held is not None:
        forward_in_place(runner, block, streams.held, runner.position_embeddings(streams.held[:1]), opts.batch)


def stored_block(runner: BlockRunner, source: ModelSource, writer, plan: QuantPlan, i: int, world: World = SOLO):
    """Block i of a finished block as the uninterrupted run left it: every linear on its stored weight (read by
    main, which holds the output, and sent to the other processes)."""
    prefix = runner.family.block_prefix.format(i=i)
    block, _ = source_block(runner, source, i)
    for name in runner.family.linears:
        lin, full = block.get_submodule(name), prefix + name
        weight = stored_weight(lambda suffix, full=full: writer.get(f"{full}.{suffix}"), plan.layers[full],
                               plan.options.method, lin.in_features) if world.main else None
        lin.weight.data = broadcast_from_main(weight, world).to(runner.device)
    return block


def finish_block(writer, coder, i: int, layers: list[LayerReport]) -> None:
    """Journal block i once all its tensors are added (those the coder holds back included): its reports, and
    the metadata of the tensors coded in it."""
    before = set(coder.coded) if coder else set()
    if coder:
        coder.flush()
    coded = {name: meta for name, meta in coder.coded.items() if name not in before} if coder else {}
    faults.point(f"tensors:{i}")
    writer.record({"block": i, "layers": [asdict(layer) for layer in layers], "coded": coded})
    faults.point(f"block:{i}")


def finished_blocks(writer, coder, result: Result) -> int:
    """How many blocks the writer's journal holds (those of the run it continues); their reports go into
    `result`, the metadata of their coded tensors into `coder`."""
    blocks = [entry for entry in writer.resumed if "block" in entry]
    for entry in blocks:
        result.layers += [LayerReport(**{**layer, "shape": tuple(layer["shape"])}) for layer in entry["layers"]]
        if coder:
            coder.coded.update(entry["coded"])
    return len(blocks)


def propagate_unquantized(runner: BlockRunner, block, unquantized: torch.Tensor, opts: QuantizeOptions) -> None:
    """The unquantized model's calibration stream through the block on its source weights, in place."""
    with compute(opts):
        forward_in_place(runner, block, unquantized, runner.position_embeddings(unquantized[:1]), opts.batch)


def refine_block(runner: BlockRunner, block, prefix: str, i: int, hidden: torch.Tensor, pos, targets: torch.Tensor,
                 starts: dict, plan: QuantPlan, writer, tensors) -> list[LayerReport]:
    """Learned rounding and clipping (quantize/signround.py) of the block's quantized linears, `starts` (name ->
    (unquantized weight, quantized weight, Hessian)): the block run on `hidden`, the calibration windows' hidden
    states under the quantized blocks before it (what it will see), is fitted to `targets`, the same windows' hidden
    states after it in the unquantized model (so that it also makes up for the error it receives, as AutoRound and
    OmniQuant do). Each refined linear is written as `quantize_shared` writes it, its loss the output error
    ||(W - Q) X||^2 / n of its refined weight."""
    opts = plan.options
    if not starts:
        return []
    with keeping_freed_memory():
        refined, _ = signround(block, hidden, targets, {name: W for name, (W, _, _) in starts.items()},
                               {name: qw for name, (_, qw, _) in starts.items()}, opts.rounding_iters,
                               batch=opts.batch, seed=(opts.seed << 16) + i, autocast=lambda: compute(opts),
                               **runner.block_kwargs(pos))
    layers = []
    for name, qw in refined.items():
        W, _, H = starts[name]
        stored = layout_of(plan.layers[prefix + name]).tensors(qw)
        layers.append(_write_into(block, prefix, name, stored, layer_output_error(W, qw.Q, H.H), plan, writer,
                                  tensors))
    return layers


def tune_written(runner: BlockRunner, source: ModelSource, writer, plan: QuantPlan, windows: torch.Tensor,
                 streams: Streams, eval_ids: torch.Tensor | None, loss_windows: int,
                 progress: bool = False, extra: torch.Tensor | None = None) -> torch.Tensor:
    """End-to-end tuning (quantize/tune.py) of the model as written: every block rebuilt from the source with its
    linears as `TunedLinear`s on their stored tensors (`layout.levels`), tuned toward `streams.unquantized` (the
    unquantized model's last hidden states of `windows`; with --tune-seqlen, the windows `joined` into longer
    sequences and those sequences' states, `unquantized_last_states`). `extra` (--tune-self): windows that join
    the calibration windows here alone, their targets `unquantized_last_states`. The tuned levels, and the norm weights the
    writer holds as they are, replace what was written; the streams the run still reads (the first `loss_windows`
    calibration windows', the held-out ones') become the tuned model's. Returns the tuned final norm weight."""
    opts, family = plan.options, runner.family
    dtype = compute_dtype(opts)
    sequences, teacher = windows, streams.unquantized
    if extra is not None:                   # tuning draws its minibatches at random: the order does not matter
        sequences = torch.cat([windows, extra])
    if opts.tune_seqlen and opts.tune_seqlen != windows.shape[1]:
        sequences = joined(sequences, opts.tune_seqlen)
        teacher = unquantized_last_states(runner, source, sequences, opts).to(teacher.dtype)
        streams.unquantized = None          # the windows' own targets: not read again
    elif extra is not None:
        teacher = torch.cat([teacher, unquantized_last_states(runner, source, extra, opts).to(teacher.dtype)])
        streams.unquantized = None          # the windows' own targets: copied into `teacher`, not read again
    norm, head_weight = runner.head(source)
    head_weight = head_weight.to(dtype)                                  # cast once, not at every chunk
    teacher_norm = copy.deepcopy(norm).requires_grad_(False)
    teacher_head = lambda h: F.linear(teacher_norm(h), head_weight)
    later = resampled_passes(runner, source, sequences, teacher, teacher_head, opts)
    blocks, tuned, norms = [], {}, {}
    for i in range(runner.n_blocks):
        prefix = family.block_prefix.format(i=i)
        block, _ = source_block(runner, source, i)
        block.requires_grad_(False)
        for name in family.linears:
            lin, full = block.get_submodule(name), prefix + name
            layer = plan.layers[full]
            levels = layout_of(layer).levels(lambda suffix, full=full: writer.get(f"{full}.{suffix}"), layer,
                                              lin.in_features, dtype)
            tuned[full] = module = TunedLinear(levels, lin.bias, dtype)
            block.set_submodule(name, module)
        for name, p in list(block.named_parameters()):
            if ".deltas." not in name and writer.holds(prefix + name):
                norms[prefix + name] = _relative(block, name, writer.get(prefix + name).dtype)
        blocks.append(block)
    final = _relative(norm, "weight", source.get(family.final_norm).dtype)
    table = source.get(family.embed).to(torch.float32)

    def through(block: nn.Module, hidden: torch.Tensor, pos) -> torch.Tensor:
        out = block(hidden, **runner.block_kwargs(pos))
        return out[0] if isinstance(out, tuple) else out

    def body(ids: torch.Tensor, kept: int = len(blocks)) -> torch.Tensor:
        """The last hidden states of `ids`; with gradients, the last `kept` blocks keep their activations for the
        backward pass and the others recompute theirs in it (quantize/tune.py)."""
        hidden = F.embedding(ids, table)
        pos = runner.position_embeddings(hidden[:1])
        for i, block in enumerate(blocks):
            hidden = (checkpoint(through, block, hidden, pos, use_reentrant=False)
                      if torch.is_grad_enabled() and i < len(blocks) - kept else through(block, hidden, pos))
        return hidden

    head = lambda h: F.linear(norm(h), head_weight)
    params = [d for m in tuned.values() for d in m.deltas] + [p for _, _, p in norms.values()] + [final[2]]

    def first_block() -> torch.Tensor:      # one minibatch through block 0, its input needing a gradient as later's
        with compute(opts):
            hidden = F.embedding(sequences[:opts.tune_batch], table).requires_grad_()
            return through(blocks[0], hidden, runner.position_embeddings(hidden[:1]))

    kept = kept_blocks(saved_bytes(first_block), len(blocks), psutil.virtual_memory().available)
    with keeping_freed_memory():
        tune(lambda ids: body(ids, kept), head, teacher_head, sequences, teacher, params,
             opts.tune_epochs, opts.tune_lr, batch=opts.tune_batch, seed=opts.seed, autocast=lambda: compute(opts),
             progress=progress, later=later)
    for full, module in tuned.items():
        for suffix, tensor in module.stored().items():
            writer.replace(f"{full}.{suffix}", tensor)
        module.dtype = torch.float32                     # from here on, the weights exactly as they load
    for name, (module, attr, _) in norms.items():
        writer.replace(name, getattr(module, attr).detach().to(module.parametrizations[attr][0].dtype))
    with torch.no_grad():                                # the streams as `propagate` makes them
        if streams.hidden is not None and loss_windows:
            with compute(opts):
                streams.hidden[:loss_windows] = torch.cat([body(windows[s:min(s + opts.batch, loss_windows)])
                                                           for s in range(0, loss_windows, opts.batch)])
        if streams.held is not None:
            streams.held = torch.cat([body(eval_ids[s:s + opts.batch]) for s in range(0, len(eval_ids), opts.batch)])
    for block in blocks + [norm]:
        for module in block.modules():
            if parametrize.is_parametrized(module):
                for attr in list(module.parametrizations):
                    parametrize.remove_parametrizations(module, attr)   # the skeleton's modules, as they were
    for i in range(runner.n_blocks):
        runner.release_block(i)
    return norm.weight.detach()


def resampled_passes(runner: BlockRunner, source: ModelSource, sequences: torch.Tensor, teacher: torch.Tensor,
                     teacher_head, opts: QuantizeOptions) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """With --tune-resample, the sequences and targets of every tuning pass after the first: `sequences` with
    that share of their tokens drawn from the unquantized model (`teacher_head` of its last states `teacher`;
    quantize/tune.py `resampled`, one seeded draw per pass), and the unquantized model's last states of them. Made
    before tuning rebuilds the blocks."""
    if not opts.tune_resample:
        return []
    passes = []
    for epoch in range(1, opts.tune_epochs):
        generator = torch.Generator().manual_seed(opts.seed + epoch)
        with compute(opts):
            ids = resampled(sequences, teacher, teacher_head, opts.tune_resample, generator)
        passes.append((ids, unquantized_last_states(runner, source, ids, opts).to(teacher.dtype)))
    return passes


def joined(windows: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Calibration windows [n, s] joined end to end, consecutive ones in order, into sequences [n s / seqlen,
    seqlen] (--tune-seqlen: a document boundary inside a sequence, as in packed pretraining data)."""
    per = seqlen // windows.shape[1]
    return windows.reshape(windows.shape[0] // per, per * windows.shape[1])


def unquantized_last_states(runner: BlockRunner, source: ModelSource, ids: torch.Tensor,
                            opts: QuantizeOptions) -> torch.Tensor:
    """The unquantized model's last hidden states [n, seq, d] of token sequences `ids` [n, seq], as the
    calibration stream's are made: tuning's targets when its sequences are not the calibration windows."""
    hidden = embed(source, runner.family, ids, None).hidden
    for i in range(runner.n_blocks):
        propagate_unquantized(runner, source_block(runner, source, i)[0], hidden, opts)
        runner.release_block(i)
    return hidden


def _relative(root: nn.Module, name: str, dtype: torch.dtype) -> tuple[nn.Module, str, nn.Parameter]:
    """The parameter `name` of `root` tuned relative to itself and kept in its stored `dtype` (quantize/tune.py
    `Relative`): (its module, its attribute, the parameter that learns)."""
    path, _, attr = name.rpartition(".")
    module = root.get_submodule(path) if path else root
    parametrize.register_parametrization(module, attr, Relative(getattr(module, attr), dtype))
    delta = module.parametrizations[attr].original
    delta.requires_grad_(True)
    return module, attr, delta


def _start_into(block, prefix: str, name: str, H, plan: QuantPlan, starts: dict) -> None:
    """Quantize one linear of `block` as the start of learned rounding (`refine_block`): its unquantized weight,
    quantized weight and Hessian go into `starts`, and the linear holds the quantized weight meanwhile."""
    lin, full = block.get_submodule(name), prefix + name
    try:
        qw, _, _ = quantize_linear(lin.weight.data, H, plan.options, plan.layers[full])
    except ValueError as e:
        raise InputError(f"{full}: {e}") from None
    starts[name] = (lin.weight.data, qw, H)
    lin.weight.data = qw.Q


def _write_into(block, prefix: str, name: str, stored: dict, loss: float | None, plan: QuantPlan, writer,
                tensors) -> LayerReport:
    """Write one linear's packed tensors (and bias) and leave it holding the weight they load as."""
    lin, full = block.get_submodule(name), prefix + name
    layer = plan.layers[full]
    for suffix, t in stored.items():
        writer.add(f"{full}.{suffix}", t)
    if lin.bias is not None:
        writer.add(f"{full}.bias", tensors[f"{full}.bias"])
    lin.weight.data = stored_weight(stored.__getitem__, layer, plan.options.method, lin.in_features).to(lin.weight.device)
    size = sum(t.numel() * t.element_size() for t in stored.values())
    return LayerReport(full, tuple(lin.weight.shape), layer.bits, layer.group_size, size, loss)


def _final_layers(source, family, runner):
    """The final norm and the lm_head matrix, to finish a streamed evaluation."""
    norm = runner.model.model.norm.to_empty(device="cpu")
    norm.weight.data = source.get(family.final_norm).to(torch.float32)
    return norm, source.get(family.lm_head if family.lm_head in source else family.embed).to(torch.float32)


def _nlls(norm, head: torch.Tensor, hidden: torch.Tensor, windows: torch.Tensor) -> list[float]:
    """Summed next-token NLL of each window from the last block's outputs `hidden`."""
    return [window_stats(norm(h[None].float().cpu())[0] @ head.t(), ids)[0] for h, ids in zip(hidden, windows)]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Stopwatch:
    """Wall time and CPU time (all threads of the process) since it was made."""
    def __init__(self):
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def cpu_seconds(self) -> float:
        return time.process_time() - self.cpu0
