"""How much each output channel of each linear moves the model's loss: the diagonal Fisher information of
the linear's output, F_o = mean over tokens of (dL/dy_o)^2, L the summed next-token NLL of a window.

The NLL is of labels drawn from the model's own next-token distribution ("model", the Fisher information proper:
its quadratic form is the KL divergence of a changed model from this one, the Gauss-Newton curvature of the
loss) or of the text's next tokens ("data", the empirical Fisher, which SqueezeLLM and BRECQ use; it follows the
calibration text's own errors where the model's Fisher follows the model; Kunstner et al., NeurIPS 2019,
"Limitations of the empirical Fisher approximation"). One label is drawn per position, from a generator seeded
by the seed and the window's index, so that how windows are grouped or shared out does not change them.

With it, a weight error dW of a linear costs about 1/2 sum_o F_o mean_t (dW_o x_t)^2 nats per token, where
mean_t (dW_o x_t)^2 is GPTQ's loss of row o: the output error of each channel weighted by how much it matters
(BRECQ, Li et al. ICLR 2021, eq. (10): Fisher-weighted output reconstruction; SqueezeLLM section 3.1 for
the weight-space version).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .adapter import BlockRunner
from .data import categorical

HEAD_CHUNK = 128          # positions whose logits are formed at once
WINDOWS_AT_ONCE = 4       # windows that go through each block together: every block is built once per group of
                          # them (from the source, which may dequantize it), and the block boundaries kept for the
                          # backward cost n_blocks x windows x seqlen x hidden floats (SmolLM2 at 512: 35 MB each)


def output_fisher(runner: BlockRunner, source, windows: torch.Tensor, linears: list[str],
                  progress: bool = False, at_once: int = WINDOWS_AT_ONCE,
                  autocast=contextlib.nullcontext, share: slice | None = None,
                  gather=list, labels: str = "data", seed: int = 0) -> tuple[dict[str, torch.Tensor], float]:
    """F_o [out] of each decoder linear named in `linears`, and the model's mean next-token NLL on the windows
    (nats per predicted token, the loss the Fisher is of), from one forward and backward per window
    [n, seqlen] (`labels`: "model" or "data", see the module docstring), streamed block by block: the forward
    keeps only each block's input, the backward rebuilds one block at a time from `source`, recomputes it and
    passes the gradient down (activation checkpointing at block granularity: the memory of one block and the block
    boundaries, never the whole model). `at_once` windows
    share each pass (a window's loss depends on its own tokens only, so its gradients are those it has alone).
    The blocks' forwards and backwards run in `autocast()` (the calibration's matmul precision); the head, the
    residual stream and the sums stay float32.

    Several processes share the windows: each takes `share` (whole groups of `at_once`, in order) and `gather`
    concatenates a list over the processes in their order; the sums are then added in the order of the windows,
    as one process adds them."""
    wanted = set(linears)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in linears}    # one per group of windows
    mine = range(windows.shape[0])[share or slice(None)]
    norm, head = runner.head(source)
    tied = runner.family.lm_head not in source
    embed = head if tied else source.get(runner.family.embed).to(torch.float32)
    norm.requires_grad_(False)
    nlls = []
    with tqdm(total=len(mine), desc="fisher", unit="window", disable=not progress) as bar:
        for first in range(mine.start, mine.stop, at_once):
            ids = windows[first:min(first + at_once, mine.stop)]
            h = F.embedding(ids, embed)
            pos = runner.position_embeddings(h[:1])
            inputs = []
            for i in range(runner.n_blocks):
                inputs.append(h)
                with autocast():
                    h = runner.forward_block(_block(runner, source, i), h, pos)
                runner.release_block(i)
            g = torch.empty_like(h)
            for b in range(ids.shape[0]):
                drawn = torch.Generator().manual_seed(seed * 1_000_003 + first + b) if labels == "model" else None
                g[b:b + 1], window_nll = _head_gradient(norm, head, h[b:b + 1], ids[b], drawn)
                nlls.append(window_nll)
            for i in reversed(range(runner.n_blocks)):
                with autocast():
                    g = _block_gradient(runner, source, i, inputs.pop(), pos, g, wanted, parts)
            bar.update(ids.shape[0])
    fisher = {}
    for name in linears:
        every = gather(parts[name])
        total = every[0]
        for part in every[1:]:
            total = total + part
        fisher[name] = total / windows.numel()
    return fisher, sum(gather(nlls)) / (windows.shape[0] * (windows.shape[1] - 1))


def _block(runner: BlockRunner, source, i: int) -> torch.nn.Module:
    block = runner.build_block(i, {n: source.get(n) for n in runner.block_names(i)})
    return block.requires_grad_(False)


def _head_gradient(norm, head: torch.Tensor, h: torch.Tensor, ids: torch.Tensor,
                   drawn: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """dL/dh of the summed next-token NLL L of one window with respect to the last block's output, and the NLL of
    the window's own next tokens, in chunks of HEAD_CHUNK positions (the logits of a whole window would take
    seqlen x vocab floats, three times over). L is of the window's next tokens, or of labels drawn from the
    model's softmax with `drawn`."""
    h = h.detach()
    grad = torch.zeros_like(h)
    total = 0.0
    for start in range(0, h.shape[1] - 1, HEAD_CHUNK):
        part = h[:, start:start + HEAD_CHUNK].requires_grad_(True)
        targets = ids[start + 1:start + 1 + part.shape[1]]
        with torch.enable_grad():
            logits = norm(part)[0, :targets.numel()] @ head.t()
            loss = F.cross_entropy(logits, targets, reduction="sum")
            if drawn is not None:
                probs = torch.softmax(logits.detach().float(), dim=-1)
                targets = categorical(probs, drawn)
                F.cross_entropy(logits, targets, reduction="sum").backward()
            else:
                loss.backward()
        total += loss.item()
        grad[:, start:start + part.shape[1]] = part.grad
    return grad, total


def _block_gradient(runner, source, i, x, pos, g, wanted, parts) -> torch.Tensor:
    """Recompute block i on its input x, append sum_t (dL/dy_t)^2 of each of its linears to `parts`, return
    dL/dx."""
    prefix = runner.family.block_prefix.format(i=i)
    block = _block(runner, source, i)
    hooks = []
    for name, module in block.named_modules():
        if isinstance(module, torch.nn.Linear) and prefix + name in wanted:
            hooks.append(module.register_forward_hook(_keep(prefix + name, parts)))
    x = x.detach().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = block(x, attention_mask=None, position_embeddings=pos, use_cache=False)
            (out[0] if isinstance(out, tuple) else out).backward(g)
    finally:
        for hook in hooks:
            hook.remove()
        runner.release_block(i)
    return x.grad


def _keep(name: str, parts: dict):
    def hook(module, args, output):
        def square(g):
            parts[name].append(g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(dim=0))
        output.register_hook(square)
    return hook
