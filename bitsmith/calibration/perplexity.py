"""Quality of a causal LM on a text (DESIGN.md section 3): perplexity as in GPTQ, and with a base model
the mean per-token KL divergence KL(base || model) and top-1 agreement."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..formats.errors import InputError


@torch.no_grad()
def nll_sum(logp: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood of next-token predictions in one window."""
    return -logp.gather(1, targets[1:, None]).sum().item()


def window_stats(logits: torch.Tensor, targets: torch.Tensor, base_logits: torch.Tensor | None = None):
    """Summed NLL of one window, and with a base: the base's NLL, summed KL(base || model), top-1 matches."""
    logp = F.log_softmax(logits[:-1].float(), dim=-1)
    if base_logits is None:
        return nll_sum(logp, targets), 0.0, 0.0, 0
    base_logp = F.log_softmax(base_logits[:-1].float(), dim=-1)
    kl = (base_logp.exp() * (base_logp - logp)).sum().item()
    top1 = (base_logp.argmax(-1) == logp.argmax(-1)).sum().item()
    return nll_sum(logp, targets), nll_sum(base_logp, targets), kl, top1


def summarize(nll: float, windows: int, seqlen: int, base_nll: float | None = None, kl: float = 0.0,
              top1: int = 0) -> dict:
    """The totals as per-token means; InputError when a model's logits held NaN or Inf (no NaN is reported)."""
    predicted = windows * (seqlen - 1)
    for what, total in (("the model", nll), ("the base model", base_nll)):
        if total is not None and not math.isfinite(total):
            raise InputError(f"{what} gives NaN or Inf log-likelihoods on this text (its weights hold NaN or Inf, "
                             "or overflow)")
    result = {"perplexity": _exp(nll / predicted), "tokens": windows * seqlen, "seqlen": seqlen,
              "windows": windows}
    if base_nll is not None:
        result["base_perplexity"] = _exp(base_nll / predicted)
        result["kl"] = kl / predicted
        result["top1_agreement"] = top1 / predicted
    return result


def _exp(x: float) -> float:
    """exp(x), infinite beyond what a float holds (a mean NLL above ~709 nats)."""
    return math.exp(x) if x < 709 else math.inf


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, base=None, progress: bool = True) -> dict:
    """Perplexity of `model` over [n, seqlen] windows; with `base`, KL and top-1 agreement against it."""
    model.eval()
    totals = [0.0, 0.0, 0.0, 0]
    for ids in tqdm(windows, desc="evaluate", unit="window", disable=not progress):
        logits = model(input_ids=ids[None]).logits[0]
        base_logits = base(input_ids=ids[None]).logits[0] if base is not None else None
        totals = [a + b for a, b in zip(totals, window_stats(logits, ids, base_logits))]
    nll, base_nll, kl, top1 = totals
    return summarize(nll, windows.shape[0], windows.shape[1], base_nll if base is not None else None, kl, top1)
