"""Quality of a causal LM on a text (DESIGN.md section 3): perplexity as in GPTQ, and with a base model
the mean per-token KL divergence KL(base || model) and top-1 agreement."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm


@torch.no_grad()
def window_stats(logits: torch.Tensor, targets: torch.Tensor, base_logits: torch.Tensor | None = None):
    """Summed NLL of next-token predictions in one window, and (with a base) summed KL and top-1 matches."""
    logp = F.log_softmax(logits[:-1].float(), dim=-1)
    nll = -logp.gather(1, targets[1:, None]).sum().item()
    if base_logits is None:
        return nll, 0.0, 0
    base_logp = F.log_softmax(base_logits[:-1].float(), dim=-1)
    kl = (base_logp.exp() * (base_logp - logp)).sum().item()
    top1 = (base_logp.argmax(-1) == logp.argmax(-1)).sum().item()
    return nll, kl, top1


def summarize(nll: float, kl: float, top1: int, windows: int, seqlen: int, with_base: bool) -> dict:
    predicted = windows * (seqlen - 1)
    result = {"perplexity": math.exp(nll / predicted), "tokens": windows * seqlen, "seqlen": seqlen,
              "windows": windows}
    if with_base:
        result["kl"] = kl / predicted
        result["top1_agreement"] = top1 / predicted
    return result


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, base=None, progress: bool = True) -> dict:
    """Perplexity of `model` over [n, seqlen] windows; with `base`, KL and top-1 agreement against it."""
    model.eval()
    nll = kl = 0.0
    top1 = 0
    for ids in tqdm(windows, desc="evaluate", unit="window", disable=not progress):
        logits = model(input_ids=ids[None]).logits[0]
        base_logits = base(input_ids=ids[None]).logits[0] if base is not None else None
        a, b, c = window_stats(logits, ids, base_logits)
        nll, kl, top1 = nll + a, kl + b, top1 + c
    return summarize(nll, kl, top1, windows.shape[0], windows.shape[1], base is not None)
