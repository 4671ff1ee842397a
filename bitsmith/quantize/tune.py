"""End-to-end tuning of the quantization levels (EfficientQAT's E2E-QP, Chen et al. 2024, "EfficientQAT: Efficient
Quantization-Aware Training for Large Language Models", section 3.3), with the unquantized model as teacher.

Once every linear is quantized, its codes stay fixed and its continuous levels learn: the scales of its grids
(W = s[g] * (q - z)), the centroids of its lookup tables (W = c[o, q]), the codebooks and row scales of its
codebooks of pairs (W = s_o C[q]); so do the RMSNorm weights. Each moves in a
unit of its own size, so that one learning rate suits all: a scale or a norm weight by a fraction of itself,
s = s0 (1 + delta), a table's centroids by a fraction of the row's mean spacing. All of them
together, through the whole model, minimize the KL divergence of its next-token distributions from the unquantized
model's on the calibration windows,
  L = 1/N sum_t KL(p_t || p~_t),   p_t = softmax(head(norm(h_t))), p~ the same of the quantized model,
so that each block also makes up for the errors of the others, which block-wise rounding (GPTQ, SignRound) cannot
see. With `--tune-resample`, every pass after the first reads the windows with a share of their tokens drawn
from the unquantized model (`resampled`) and their own targets: the same steps on more text. Adam, the learning
rate decayed by a half cosine to 0 over the run; the levels are stored as fp16 and the
norms in their own dtype (the forward rounds them so, straight through); every other tensor stays as it was.

The teacher's side costs one head per window: its final hidden states are those the pipeline carries through the
unquantized blocks anyway (the targets of learned rounding). The head, the largest matrix product, runs on chunks
of positions, the gradient reaching the hidden states chunk by chunk, so that no [tokens, vocabulary] tensor of a
whole minibatch is ever held.

The backward pass needs every block's activations. Keeping them all costs memory in proportion to the depth
(SmolLM2-135M at 8 x 512 tokens: 133 MB a block, a peak of 8.3 GB against 4.5 recomputing them); recomputing a
block's in the backward pass (activation checkpointing) costs one more forward of it (a step 12 % slower there).
`kept_blocks` keeps as many blocks' activations as a share of the free memory holds, from the size of one block's
(`saved_bytes`), and the rest are recomputed: the same gradients either way.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..calibration.data import categorical
from .grid import stored_ste, whole_ste

HEAD_CHUNK = 128            # positions whose logits are held at once: SmolLM2's KL of 1,024 positions (49,152
                            # entries) 15 % faster than by 512, the passes over each chunk memory-bound
KEEP_SHARE = 0.5            # share of the free memory that tuning may fill with kept activations


@dataclass
class Level:
    """One stored tensor of a quantized linear whose values learn: its suffix (`name`), its values as stored
    (`start`) and the `unit` (broadcast to `start`) they move in, start + unit * delta: the scales themselves
    (relative steps), a table's mean spacing (bitsmith/layouts.py). `whole`: the values are integer codes
    1..SCALE_CODES (double-quantized scales), rounded to whole codes as stored instead of to fp16."""
    name: str
    start: torch.Tensor
    unit: torch.Tensor
    whole: bool = False


@dataclass
class Levels:
    """What tuning learns of one quantized linear: its `parts`, and the weight [out, in] as a differentiable
    function of their values, `weight(*values)` in the order of `parts`."""
    parts: list[Level]
    weight: Callable[..., torch.Tensor]


class TunedLinear(nn.Module):
    """y = x W(levels)^T + b: a quantized linear whose levels learn (each part start + unit * delta, delta a
    parameter, rounded to fp16 as stored), its codes fixed; W in `dtype`."""

    def __init__(self, levels: Levels, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.names = [part.name for part in levels.parts]
        self.whole = [part.whole for part in levels.parts]
        for i, part in enumerate(levels.parts):
            self.register_buffer(f"start{i}", part.start.to(torch.float32))
            self.register_buffer(f"unit{i}", part.unit.to(torch.float32))
        self.deltas = nn.ParameterList(torch.zeros_like(part.start, dtype=torch.float32) for part in levels.parts)
        self.weight_of, self.dtype = levels.weight, dtype
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))

    def levels(self) -> list[torch.Tensor]:
        return [(whole_ste if whole else stored_ste)(getattr(self, f"start{i}") + getattr(self, f"unit{i}") * delta)
                for i, (delta, whole) in enumerate(zip(self.deltas, self.whole))]

    def stored(self) -> dict[str, torch.Tensor]:
        """The levels as they are written (fp16, or uint8 codes), by suffix."""
        return {name: value.detach().to(torch.uint8 if whole else torch.float16)
                for name, value, whole in zip(self.names, self.levels(), self.whole)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.weight_of(*(value.to(self.dtype) for value in self.levels()))
        return F.linear(x.to(W.dtype), W, None if self.bias is None else self.bias.to(W.dtype))


class Relative(nn.Module):
    """A parametrization (torch.nn.utils.parametrize) of a tensor kept in `dtype`, w0 [...] at the start:
    w = w0 (1 + delta), rounded to `dtype` as stored; delta starts at 0. The norm weights' form in tuning."""

    def __init__(self, start: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("start", start.detach().to(torch.float32).clone())
        self.dtype = dtype

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        return stored_ste(self.start * (1 + delta), self.dtype)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(self.start)          # registered on the start itself


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the tensors the autograd graph of `fn()` saves for its backward pass (each storage once): what
    keeping its activations costs. `fn` runs once, with gradients."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def kept_blocks(per_block: int, blocks: int, free: int, share: float = KEEP_SHARE) -> int:
    """How many of `blocks` blocks keep their activations (`per_block` bytes each) for the backward pass, within
    `share` of `free` bytes; the others recompute theirs."""
    if per_block <= 0:
        return blocks
    return max(0, min(blocks, int(share * free) // per_block))


@dataclass
class Trace:
    """The mean KL divergence (nats per token) of every step's minibatch."""
    losses: list[float]


def logsumexp(x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """log sum exp over the last dimension of x, given probs = softmax(x): max x - log max probs (the top entry's
    probability is 1 / sum exp(x - max x)); no second pass of exp."""
    return x.amax(-1) - probs.amax(-1).log()


def kl_backward(hidden: torch.Tensor, teacher: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                teacher_head: Callable[[torch.Tensor], torch.Tensor], autocast: Callable) -> float:
    """Mean KL(teacher || model) per position of the logits z = `head(hidden)` against `teacher_head(teacher)`
    (hidden states [tokens, d] each), chunk by chunk of positions; its gradient, softmax(z) - p_teacher per
    position, goes back through `head` (into `hidden.grad`, `hidden` a leaf, and the head's own parameters)."""
    total, n = 0.0, hidden.shape[0]
    for start in range(0, n, HEAD_CHUNK):
        with autocast():
            with torch.no_grad():
                t = teacher_head(teacher[start:start + HEAD_CHUNK]).float()
            logits = head(hidden[start:start + HEAD_CHUNK])
        with torch.no_grad():
            z = logits.float()
            p, q = torch.softmax(t, -1), torch.softmax(z, -1)
            # KL = sum p (t - z) - lse(t) + lse(z) per position
            total += (torch.dot(p.view(-1), (t - z).view(-1)) + (logsumexp(z, q) - logsumexp(t, p)).sum()).item() / n
            grad = q.sub_(p).div_(n)
        logits.backward(grad.to(logits.dtype))
    return total


@torch.no_grad()
def resampled(windows: torch.Tensor, teacher: torch.Tensor, teacher_head: Callable[[torch.Tensor], torch.Tensor],
              share: float, generator: torch.Generator) -> torch.Tensor:
    """`windows` [n, seq] with a share `share` of their tokens after the first each replaced by a draw from the
    unquantized model's next-token distribution after the tokens before it, softmax(teacher_head(teacher[:, i-1]))
    (`teacher` [n, seq, d] the windows' last hidden states): other text of the model's own at the cost of one head
    per drawn token (the data augmentation of TinyBERT, Jiao et al. 2020, with the unquantized model itself
    as the language model that proposes the words). The draws condition on the windows as they were."""
    ids = windows.clone()
    rows, cols = (torch.rand(ids.shape[0], ids.shape[1] - 1, generator=generator) < share).nonzero(as_tuple=True)
    for start in range(0, len(rows), HEAD_CHUNK):
        r, c = rows[start:start + HEAD_CHUNK], cols[start:start + HEAD_CHUNK]
        probs = torch.softmax(teacher_head(teacher[r, c]).float(), -1).cpu()
        ids[r, c + 1] = categorical(probs, generator).to(ids.device, ids.dtype)
    return ids


def tune(body: Callable[[torch.Tensor], torch.Tensor], head: Callable[[torch.Tensor], torch.Tensor],
         teacher_head: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, teacher: torch.Tensor,
         params: list[nn.Parameter], epochs: int, lr: float, batch: int = 8, seed: int = 0,
         autocast: Callable = contextlib.nullcontext, progress: bool = False,
         later: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> Trace:
    """Tune `params` (the deltas of the model's `TunedLinear`s and of its norm weights, `Relative`) in place.

    `body(ids)`: the model's last hidden states [b, seq, d] of token windows [b, seq]; `head(h)`: its logits (final
    norm and lm_head); `teacher_head`, `teacher` [n, seq, d]: the unquantized model's head and last hidden states
    of the calibration `windows` [n, seq]. `epochs` passes over the windows in minibatches of `batch`, drawn by a
    generator seeded with `seed`; the forwards run in `autocast()`. Pass e > 0 reads `later[e - 1]` (windows and
    their targets, `resampled`) where given, else the calibration windows again."""
    if epochs < 0 or lr <= 0:
        raise ValueError(f"tuning for {epochs} epochs at learning rate {lr}: expected epochs >= 0 and lr > 0")
    steps = epochs * math.ceil(windows.shape[0] / batch)
    if steps == 0 or not params:
        return Trace([])
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(total=steps, desc="tune", unit="step", disable=not progress)
    for epoch in range(epochs):
        ids, targets = later[epoch - 1] if 0 < epoch <= len(later) else (windows, teacher)
        order = torch.randperm(ids.shape[0], generator=generator)
        for start in range(0, len(order), batch):
            pick = order[start:start + batch]
            optimizer.zero_grad()
            with autocast():
                hidden = body(ids[pick])
            leaf = hidden.detach().reshape(-1, hidden.shape[-1]).requires_grad_()
            losses.append(kl_backward(leaf, targets[pick].reshape(leaf.shape).to(leaf.device), head, teacher_head,
                                      autocast))
            hidden.backward(leaf.grad.reshape(hidden.shape))
            optimizer.step()
            schedule.step()
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
            bar.update()
    bar.close()
    return Trace(losses)
