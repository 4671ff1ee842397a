"""SignRound on codebooks of pairs (quantize/signround.py, `LearnedCodebook`) on one SmolLM2-135M block: the
block's output error on calibration windows it learned from and on windows it did not see, for the codes kept as
GPTQ chose them (the codebooks and row scales learned alone, the default), the codes learned among m nearest
entries (`CODE_CANDIDATES` = m), and the codes learned from each pair's nearest entry instead of GPTQ's choice;
CPU seconds of the 50 iterations.

The block's inputs are the unquantized model's hidden states entering it; c4_calib.txt is split by position, the
first 80 % of its tokens for the learned windows, the rest for the unseen ones. One torch thread.

    python bench/codebook_rounding.py [--block 5] [--bits 3] [--iters 50]
writes bench/results/codebook-rounding-smollm2.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bitsmith.calibration import data
from bitsmith.calibration.adapter import BlockRunner
from bitsmith.calibration.hessian import Hessian
from bitsmith.formats.source import open_source
from bitsmith.quantize import signround as sr
from bitsmith.quantize.vq import gptq_vq

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "assets" / "text"
RESULTS = ROOT / "bench" / "results"
SEEN, UNSEEN, SEQLEN, BATCH = 128, 16, 256, 8


class FromNearest(sr.LearnedCodebook):
    """The codes learned from each pair's nearest entry in the start's codebooks rather than GPTQ's choice
    (CODE_CANDIDATES > 0)."""

    def __init__(self, W: torch.Tensor, start, relative_to: str = "rtn"):
        super().__init__(W, start, relative_to)
        self.R = W.detach().to(torch.float32).reshape(self.R.shape)
        self.candidates = sr.nearest_entries(self.R / self.s0[:, None, None], start.codebooks, start.group_size,
                                             self.candidates.shape[2])


def block_data(block_index: int):
    source = open_source("smollm2-135m")
    runner = BlockRunner(source.config)
    ids = data.tokenize(source.tokenizer(), data.read_text([str(TEXT / "c4_calib.txt")]))
    cut = int(len(ids) * 0.8)
    windows = torch.cat([data.random_windows(ids[:cut], SEEN, SEQLEN, seed=0),
                         data.random_windows(ids[cut:], UNSEEN, SEQLEN, seed=0)])
    hidden = F.embedding(windows, source.get(runner.family.embed).float())
    pos = runner.position_embeddings(hidden[:1])

    def through(block, x):
        with torch.no_grad():
            return torch.cat([runner.forward_block(block, x[i:i + BATCH], pos) for i in range(0, len(x), BATCH)])

    for i in range(block_index):
        hidden = through(runner.build_block(i, {n: source.get(n) for n in runner.block_names(i)}), hidden)
    block = runner.build_block(block_index, {n: source.get(n) for n in runner.block_names(block_index)})
    hessians = {name: Hessian(block.get_submodule(name).in_features) for name in runner.family.linears}
    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, h=h: h.add(a[0]))
             for n, h in hessians.items()]
    targets = through(block, hidden[:SEEN])                              # the Hessians of the learned windows
    for hook in hooks:
        hook.remove()
    targets = torch.cat([targets, through(block, hidden[SEEN:])])
    weights = {n: block.get_submodule(n).weight.data.float().clone() for n in runner.family.linears}
    return block, hidden, targets, weights, {n: h.H for n, h in hessians.items()}, runner.block_kwargs(pos)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    block, hidden, targets, weights, hessians, kwargs = block_data(args.block)
    starts = {n: gptq_vq(W, hessians[n], args.bits, 128, act_order=True)[0] for n, W in weights.items()}
    seen, unseen = slice(0, SEEN), slice(SEEN, SEEN + UNSEEN)

    def errors(qws) -> tuple[float, float]:
        return tuple(sr.block_mse(block, {n: q.Q for n, q in qws.items()}, hidden[s], targets[s], **kwargs)
                     for s in (seen, unseen))

    rows = [{"run": "GPTQ codes, nothing learned", "seen": errors(starts)[0], "unseen": errors(starts)[1],
             "cpu_s": 0.0, "codes_changed": 0.0}]
    runs = [("codes kept, codebooks and scales learned (default)", sr.LearnedCodebook, 0),
            ("codes learned among 4 nearest", sr.LearnedCodebook, 4),
            ("codes learned among 8 nearest", sr.LearnedCodebook, 8),
            ("codes learned among 4 nearest, from nearest entries", FromNearest, 4)]
    default, m_default = sr.LearnedCodebook, sr.CODE_CANDIDATES
    for name, cls, m in runs:
        sr.LearnedCodebook, sr.CODE_CANDIDATES = cls, m
        try:
            t = time.process_time()
            refined, _ = sr.signround(block, hidden[seen], targets[seen], weights, starts, args.iters, batch=BATCH,
                                      relative_to="gptq", **kwargs)
            cpu = time.process_time() - t
        finally:
            sr.LearnedCodebook, sr.CODE_CANDIDATES = default, m_default
        changed = (sum(int((q.codes != starts[n].codes).sum()) for n, q in refined.items())
                   / sum(q.codes.numel() for q in refined.values()))
        seen_err, unseen_err = errors(refined)
        rows.append({"run": name, "seen": seen_err, "unseen": unseen_err, "cpu_s": round(cpu, 1),
                     "codes_changed": changed})
        print(rows[-1], flush=True)
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "block": args.block,
            "bits": args.bits, "group_size": 128, "iters": args.iters, "windows": [SEEN, UNSEEN, SEQLEN]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "codebook-rounding-smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# SignRound on codebooks of pairs: SmolLM2-135M, one block",
        "",
        (f"`python bench/codebook_rounding.py`, {meta['date']}, {meta['machine']}, one torch thread. Block "
        f"{args.block}, every linear {args.bits} bits per weight, a codebook per 128 inputs (GPTQ's codes, "
        f"act-order), SignRound {args.iters} iterations of {BATCH} windows from {SEEN} windows of {SEQLEN} tokens "
        f"(the first 80 % of c4_calib.txt); unseen: {UNSEEN} windows of the last 20 %. Mean squared error of the "
        "block's output against the unquantized block's, on the unquantized model's inputs."),
        "",
        "| run | output error, learned windows | output error, unseen windows | codes changed | CPU s |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['run']} | {r['seen']:.4f} | {r['unseen']:.4f} | {100 * r['codes_changed']:.1f} % | "
              f"{r['cpu_s']:.1f} |" for r in rows]
    (RESULTS / "codebook-rounding-smollm2.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
