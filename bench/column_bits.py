"""Does BAQ's per-column bit allocation pay on top of the per-linear plan? SmolLM2-135M, blocks 0/10/20/29.

BAQ (arXiv 2506.05664) gives each input column of a linear its own bit width: with a column's loss modelled as
L_j(R) = c_j 2^(-theta R), the budget-constrained optimum puts every column at the same loss, R_j = R + (1/theta)
log2(L_j / geomean(L)), theta = 1.95 (BAQ's code). Packed kernels need whole bit widths on runs of columns, so
here the unit is a group of 128 input columns in act-order (EXL2's layout, which sorts columns and gives each
run one width): bit widths R - 1, R, R + 1 with the same total as uniform R, chosen from the first pass's
per-group losses under that model, then GPTQ again with those widths.

Reported per linear and in total: the Fisher-weighted GPTQ error (predicted loss increase in nats per token,
as bitsmith/measure.py computes it) of uniform R bits against the column allocation, at the same stored bits
(one byte per group for its width aside). Calibration as the quality protocol (c4_calib.txt, 128 x 512, seed
0; Fisher from 16 windows).

    python bench/column_bits.py      # one thread; writes bench/results/column-bits.{json,md}
"""
from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from protocol import calibrated_smollm2

from bitsmith.pipeline import collect_hessians, compute, forward_in_place
from bitsmith.quantize.gptq import GridConfig, gptq_configs, inverse_cholesky
from bitsmith.quantize.grid import RowGrid, fake_quantize, fit_grid, quantize_codes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BLOCKS = (0, 10, 20, 29)
GROUP = 128
THETA = 1.95              # BAQ's rate-distortion exponent (opt_baq.py)
SHRINK_EVERY = 8          # as the measurement


def gptq_group_bits(W: torch.Tensor, H: torch.Tensor, bits: list[int], damp: float) -> torch.Tensor:
    """GPTQ with act-order, asymmetric mse grids refitted per group of GROUP permuted columns, group k on
    bits[k] bits; returns the loss of every row and group, [out, groups] ((w-q)^2 / [H^-1]_qq^2 / 2)."""
    rows, cols = W.shape
    W, H = W.float().clone(), H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True)
    Hinv, _ = inverse_cholesky(H[perm][:, perm], damp)
    W = W[:, perm]
    losses = torch.zeros(rows, len(bits))
    for k, i1 in enumerate(range(0, cols, GROUP)):
        i2 = min(i1 + GROUP, cols)
        scale, zero = fit_grid(W[:, i1:i2], RowGrid(bits[k], False), mse=True, shrink_every=SHRINK_EVERY)
        W1, Hinv1, Err1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2], torch.zeros(rows, i2 - i1)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            wq = fake_quantize(quantize_codes(w, scale, zero, bits[k]), scale, zero)
            err = (w - wq) / d
            losses[:, k] += err * err / 2
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return losses


def allocate_columns(group_loss: torch.Tensor, R: int) -> list[int]:
    """Widths R - 1, R, R + 1 per group with sum n R minimising sum_k L_k 2^(-theta (b_k - R)): moves of one bit
    from the group that loses least to the one that gains most, while a move pays (the model is convex in b)."""
    bits = [R] * len(group_loss)
    L = group_loss.tolist()

    def at(k: int, b: int) -> float:
        return L[k] * 2.0 ** (-THETA * (b - R))
    while True:
        gain = [(at(k, bits[k]) - at(k, bits[k] + 1), k) for k in range(len(bits)) if bits[k] < R + 1]
        cost = [(at(k, bits[k] - 1) - at(k, bits[k]), k) for k in range(len(bits)) if bits[k] > R - 1]
        if not gain or not cost:
            return bits
        (g, up), (c, down) = max(gain), min(cost)
        if up == down or g <= c:
            return bits
        bits[up] += 1
        bits[down] -= 1


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    cal = calibrated_smollm2()
    source, opts, runner, windows, fisher = cal.source, cal.opts, cal.runner, cal.windows, cal.fisher
    family = runner.family
    hidden = F.embedding(windows, source.get(family.embed).to(torch.float32))
    rows = []
    for i in range(max(BLOCKS) + 1):
        block = runner.build_block(i, {n: source.get(n) for n in runner.block_names(i)})
        pos = runner.position_embeddings(hidden[:1])
        if i in BLOCKS:
            hessians = collect_hessians(runner, block, hidden, pos, opts, family.siblings)
            for group in family.siblings:
                for name in group:
                    full = family.block_prefix.format(i=i) + name
                    W, H, Fo = block.get_submodule(name).weight.data.float(), hessians[group].H, fisher[full]
                    groups = -(-W.shape[1] // GROUP)
                    for R in (2, 3, 4):
                        uniform = gptq_group_bits(W, H, [R] * groups, opts.damp)
                        if R == 3:       # the loop is GPTQ's: the same losses as quantize/gptq.py
                            _, ref = gptq_configs(W, H, [GridConfig(3, GROUP, False)], True, damp=opts.damp,
                                                  mse=True, shrink_every=SHRINK_EVERY, keep=False)
                            assert torch.allclose(ref[0], uniform.sum(1), rtol=1e-3), full
                        bits = allocate_columns(Fo @ uniform / 2, R)
                        mixed = gptq_group_bits(W, H, bits, opts.damp)
                        rows.append({"linear": full, "R": R, "bits": bits, "uniform": float(Fo @ uniform.sum(1) / 2),
                                     "columns": float(Fo @ mixed.sum(1) / 2)})
                        print(full, R, bits, f"{rows[-1]['uniform']:.3e} -> {rows[-1]['columns']:.3e}", flush=True)
        with compute(opts):
            forward_in_place(runner, block, hidden, pos, opts.batch)
        runner.release_block(i)
    report(rows)


def report(rows: list[dict]) -> None:
    when = datetime.date.today().isoformat()
    (RESULTS / "column-bits.json").write_text(json.dumps({"date": when, "machine": platform.machine(),
                                                          "blocks": BLOCKS, "group": GROUP, "theta": THETA,
                                                          "rows": rows}, indent=1) + "\n")
    lines = [f"# Per-column bits (BAQ) on top of per-linear bits: SmolLM2-135M, blocks {', '.join(map(str, BLOCKS))}",
             "", (f"Measured {when} with `python bench/column_bits.py` ({platform.machine()}, one thread). Fisher-"
                  f"weighted GPTQ error (predicted nats per token) of the {len(rows) // 3} decoder linears of those "
                  f"blocks, act-order, asymmetric mse grids on groups of {GROUP}: every group on R bits against "
                  "groups on R - 1 / R / R + 1 bits with the same total, allocated by BAQ's closed form."), "",
             "| R | uniform R (sum) | per-column groups (sum) | change | linears improved | median change per linear |",
             "|---|---|---|---|---|---|"]
    for R in (2, 3, 4):
        mine = [r for r in rows if r["R"] == R]
        u, c = sum(r["uniform"] for r in mine), sum(r["columns"] for r in mine)
        changes = sorted(r["columns"] / r["uniform"] - 1 for r in mine)
        better = sum(ch < 0 for ch in changes)
        lines.append(f"| {R} | {u:.4f} | {c:.4f} | {c / u - 1:+.1%} | {better} of {len(mine)} | "
                     f"{changes[len(changes) // 2]:+.1%} |")
    moved = sum(any(b != r["R"] for b in r["bits"]) for r in rows)
    lines += ["", f"Linears whose groups got unequal widths: {moved} of {len(rows)}."]
    (RESULTS / "column-bits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
