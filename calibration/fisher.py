"""How much each output channel of each linear moves the model's loss: the diagonal Fisher information of
the linear's output, F_o = mean over tokens of (dL/dy_o)^2, L the summed next-token NLL of a window.

With it, a weight error dW of a linear costs about 1/2 sum_o F_o mean_t (dW_o x_t)^2 nats per token, where
mean_t (dW_o x_t)^2 is GPTQ's loss of row o: the output error of each channel weighted by how much it matters
(BRECQ, Li et al. ICLR 2021, eq. (10): Fisher-weighted output reconstruction; SqueezeLLM section 3.1 for
the weight-space version).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm


def output_fisher(model: torch.nn.Module, windows: torch.Tensor, linears: list[str],
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """F_o [out] of each module named in `linears`, from one forward and backward per window [n, seqlen]."""
    sums = {name: None for name in linears}
    tokens = 0

    def keep(name):
        def hook(module, args, output):
            def grad(g):
                g2 = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(dim=0)
                sums[name] = g2 if sums[name] is None else sums[name] + g2
            output.register_hook(grad)
        return hook

    model.requires_grad_(False)        # gradients of the outputs only: no weight gradients held
    hooks = [model.get_submodule(name).register_forward_hook(keep(name)) for name in linears]
    embed = model.get_input_embeddings()
    try:
        for ids in tqdm(windows, desc="fisher", unit="window", disable=not progress):
            ids = ids[None]
            x = embed(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, use_cache=False).logits
            nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
            nll.backward()
            tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return {name: s / tokens for name, s in sums.items()}
