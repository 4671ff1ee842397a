"""Everything bitsmith knows about model families, in one place.

A family says which modules are the decoder blocks, which linears inside a block read the same input
(siblings share one Hessian), and how to run one block on its own with transformers' own modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from ..formats.errors import InputError, one_line


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    block_prefix: str                        # "{i}" is the block number
    siblings: tuple[tuple[str, ...], ...]    # linears of one block grouped by shared input
    embed: str
    final_norm: str
    lm_head: str
    attention_out: str = "self_attn.o_proj"   # the linear that reads the attention's output
    value: str = "self_attn.v_proj"           # the linear whose outputs attention mixes across positions
    norms: tuple[tuple[str, tuple[str, ...]], ...] = (   # each RMSNorm of a block and the linears reading it
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")   # added to the residual stream

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.siblings for name in group)


LLAMA = Family(
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    block_prefix="model.layers.{i}.",
    siblings=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    embed="model.embed_tokens.weight",
    final_norm="model.norm.weight",
    lm_head="lm_head.weight",
)
FAMILIES = (LLAMA,)


def family_of(config: dict) -> Family:
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise InputError(f"unsupported architecture {model_type!r} (supported: {', '.join(known)})")


def hf_config(config: dict):
    from transformers import AutoConfig
    # attn_implementation: bitsmith picks its own (below); a bitsmith folder's config names a guard there
    config = {k: v for k, v in config.items() if k not in ("quantization_config", "architectures", "attn_implementation")}
    model_type = config.pop("model_type")
    cfg = _built(lambda: AutoConfig.for_model(model_type, **config))
    cfg._attn_implementation = "sdpa"
    return cfg


def skeleton(config: dict) -> nn.Module:
    """The whole model with weights on the meta device: shapes and module classes, no memory."""
    from transformers import AutoModelForCausalLM
    family_of(config)
    with torch.device("meta"):
        return _built(lambda: AutoModelForCausalLM.from_config(hf_config(config), dtype=torch.float32))


def _built(make):
    """What transformers builds from a config, its complaints about the config's values (a wrong type, an
    unknown activation) made InputError."""
    from huggingface_hub.errors import StrictDataclassError
    try:
        return make()
    except (KeyError, ValueError, TypeError, StrictDataclassError) as e:
        raise InputError(f"model config: cannot build the model from it ({type(e).__name__}: {one_line(e)})") from None


def check_shapes(source) -> None:
    """Every tensor the config implies is in `source` (a tied lm_head may be absent) with the shape the config
    gives it: checked before any work, so that no block is built from weights that do not fit."""
    net = skeleton(source.config)
    held = set(source.keys())
    for name, t in net.state_dict().items():
        if name not in held:
            if name == "lm_head.weight" and net.config.tie_word_embeddings:
                continue
            raise InputError(f"{source.name}: tensor {name} is missing")
        if source.shape(name) != list(t.shape):
            raise InputError(f"{source.name}: tensor {name} is {source.shape(name)}, its config implies "
                             f"{list(t.shape)}")


class BlockRunner:
    """Runs single decoder blocks of one model, materialized one at a time from a tensor source."""

    def __init__(self, config: dict, device: str | torch.device = "cpu"):
        self.family = family_of(config)
        self.model = skeleton(config)
        self.config = self.model.config
        self.device = torch.device(device)
        rotary = self.model.model.rotary_emb
        self.rotary = type(rotary)(config=self.config).to(self.device)    # real buffers, not meta ones
        self.n_blocks = self.config.num_hidden_layers

    def block_names(self, i: int) -> list[str]:
        prefix = self.family.block_prefix.format(i=i)
        return [prefix + name for name, _ in self.model.model.layers[i].state_dict().items()]

    def build_block(self, i: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """Block i in float32 on the runner's device with the given weights (full names)."""
        prefix = self.family.block_prefix.format(i=i)
        block = self.model.model.layers[i]
        block = block.to_empty(device=self.device)
        state = {name[len(prefix):]: t.to(self.device, torch.float32) for name, t in tensors.items()}
        block.load_state_dict(state, strict=True)
        return block.eval()

    def head(self, source) -> tuple[nn.Module, torch.Tensor]:
        """(final norm, lm_head weight [vocab, hidden]) in float32: hidden states of the last block to logits
        are `norm(h) @ weight.t()` (the embedding when the head is tied)."""
        norm = self.model.model.norm.to_empty(device="cpu")
        norm.weight.data = source.get(self.family.final_norm).to(torch.float32)
        name = self.family.lm_head if self.family.lm_head in source else self.family.embed
        return norm, source.get(name).to(torch.float32)

    def release_block(self, i: int) -> None:
        self.model.model.layers[i].to("meta")

    def position_embeddings(self, hidden: torch.Tensor):
        """The rotary embeddings of windows as long as those of `hidden`, on the runner's device."""
        positions = torch.arange(hidden.shape[1], device=self.device).unsqueeze(0)
        return self.rotary(hidden[:1].to(self.device), positions)

    @staticmethod
    def block_kwargs(pos) -> dict:
        """The keyword arguments of a call of a block besides its hidden states (`pos`: position_embeddings)."""
        return {"attention_mask": None, "position_embeddings": pos, "use_cache": False}

    @torch.no_grad()
    def residual_after_attention(self, block: nn.Module, hidden: torch.Tensor, attention: torch.Tensor,
                                 hooks: bool = True) -> torch.Tensor:
        """hidden + o_proj(attention), `attention` the block's attention output of `hidden` (o_proj's input): the
        residual stream between the two halves of transformers' decoder layer, on the device `hidden` is on.
        Without `hooks`, o_proj's forward hooks do not see the call (nn.Linear's own F.linear)."""
        o_proj = block.get_submodule(self.family.attention_out)
        a = attention.to(self.device)
        out = o_proj(a) if hooks else F.linear(a, o_proj.weight, o_proj.bias)
        return (hidden.to(self.device) + out).to(hidden.device)

    @torch.no_grad()
    def forward_after_residual(self, block: nn.Module, residual: torch.Tensor) -> torch.Tensor:
        """The block's output from its residual stream between the halves (`residual_after_attention`):
        residual + MLP(post-attention norm(residual)), the decoder layer's second half."""
        h = residual.to(self.device)
        return (h + block.mlp(block.post_attention_layernorm(h))).to(residual.device)

    def forward_after_attention(self, block: nn.Module, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """The block's output for `hidden` from its attention output: the two steps above."""
        return self.forward_after_residual(block, self.residual_after_attention(block, hidden, attention))

    @torch.no_grad()
    def forward_block(self, block: nn.Module, hidden: torch.Tensor, pos) -> torch.Tensor:
        """The block's output for `hidden`, on the device `hidden` is on (computed on the runner's: activations
        offloaded to CPU go there one batch at a time)."""
        out = block(hidden.to(self.device), **self.block_kwargs(pos))
        return (out[0] if isinstance(out, tuple) else out).to(hidden.device)


class AttentionCache:
    """The attention outputs (o_proj's inputs) of one stream's windows through one block, kept for the block's later
    passes over the same windows. GPTQ's sequential stages run the block once per stage and the propagation once
    more; once the block's q/k/v are final (quantized, or the unquantized model's own), the attention output of each
    window is fixed, and the passes after it start from it (`BlockRunner.forward_after_attention`), skipping the
    attention. Kept in the dtype it is computed in, so the outputs are the same bits as a whole forward's.

    Once o_proj is final too, `fold` turns the stream itself into the residual between the block's halves and drops
    what it kept: the passes after that run the MLP half alone (`BlockRunner.forward_after_residual`)."""

    def __init__(self, device: torch.device | str, final: bool = False):
        self.kept: dict[int, torch.Tensor] = {}   # first window of a batch -> the batch's attention outputs
        self.folded: set[int] = set()             # batches whose stream windows hold the residual
        self.device = device
        self.final = final                         # q/k/v final: outputs seen from now on may be kept

    def forward(self, runner: BlockRunner, block: nn.Module, x: torch.Tensor, pos, window: slice,
                keep: bool = True) -> torch.Tensor:
        """block(x), x the stream's windows `window` (a batch): from the residual once folded, or from the kept
        attention outputs; else a whole forward that keeps them (when `keep` and q/k/v are final). A hook of the
        caller that stops the forward at o_proj's input (or later) still sees the output kept first."""
        if window.start in self.folded:
            return runner.forward_after_residual(block, x)
        if window.start in self.kept:
            return runner.forward_after_attention(block, x, self.kept[window.start])
        if not (keep and self.final):
            return runner.forward_block(block, x, pos)
        o_proj = block.get_submodule(runner.family.attention_out)
        handle = o_proj.register_forward_pre_hook(partial(self._keep, window), prepend=True)
        try:
            return runner.forward_block(block, x, pos)
        finally:
            handle.remove()

    def fold(self, runner: BlockRunner, block: nn.Module, stream: torch.Tensor, window: slice | None = None) -> None:
        """stream <- stream + o_proj(attention output), in place, for the batch `window` (or every batch) whose
        output is kept, which is then dropped (o_proj's hooks, which collect statistics of passes, do not see it).
        For a stream that holds the block's inputs, once o_proj is final."""
        for start in [window.start] if window is not None else list(self.kept):
            if start in self.kept:
                kept = self.kept.pop(start)
                batch = slice(start, start + kept.shape[0])
                stream[batch] = runner.residual_after_attention(block, stream[batch], kept, hooks=False)
                self.folded.add(start)

    def _keep(self, window: slice, module, args) -> None:
        self.kept[window.start] = args[0].detach().to(self.device, copy=True)
