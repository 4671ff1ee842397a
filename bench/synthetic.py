"""A synthetic Llama checkpoint of any size: random bf16 weights (std 1/sqrt(fan-in), norms 1) in safetensors
shards with an index, stories260K's 512-token tokenizer, so that `bitsmith quantize` runs on it with
tinystories_calib.txt. For the memory and time scaling of bench/scale.py and tests/test_scale.py.

    python bench/synthetic.py OUT --hidden 1024 --intermediate 2816 --layers 24 [--shard-mb 256]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

STORIES = Path(__file__).resolve().parents[2] / "shared" / "assets" / "models" / "stories260K"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VOCAB = 512


def config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": VOCAB, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "attention_bias": False,
            "mlp_bias": False}


def tensors(cfg: dict):
    """(name, shape) of every tensor of the checkpoint, in the order they are written."""
    h, m, head_dim = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    yield "model.embed_tokens.weight", (VOCAB, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (m, h)
        yield p + "mlp.up_proj.weight", (m, h)
        yield p + "mlp.down_proj.weight", (h, m)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (VOCAB, h)


def write(out: Path, hidden: int, intermediate: int, layers: int, heads: int = 16, kv_heads: int = 4,
          shard_mb: int = 256, seed: int = 0) -> int:
    """Write the checkpoint into the new folder `out`; its size in bytes (the shards)."""
    out.mkdir(parents=True)
    cfg = config(hidden, intermediate, layers, heads, kv_heads)
    gen = torch.Generator().manual_seed(seed)
    shard, shard_bytes, index, total, count = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, count
        if shard:
            count += 1
            name = f"model-{count:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, name))
            shard, shard_bytes = {}, 0

    for name, shape in tensors(cfg):
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) / shape[1] ** 0.5).to(torch.bfloat16)
        if shard_bytes + t.numel() * 2 > shard_mb << 20:
            flush()
        shard[name], shard_bytes = t, shard_bytes + t.numel() * 2
        total += t.numel() * 2
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in TOKENIZER_FILES:
        shutil.copyfile(STORIES / f, out / f)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--shard-mb", type=int, default=256)
    args = ap.parse_args()
    size = write(args.out, args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.shard_mb)
    print(f"{args.out}: {size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
