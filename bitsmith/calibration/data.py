"""Calibration and evaluation text, as token windows.

Calibration follows GPTQ's `datautils` sampler exactly: the whole text tokenized once, `random.seed(seed)`,
then each window starts at `random.randint(0, n - seqlen - 1)`. Evaluation cuts the text into
non-overlapping windows (GPTQ `llama_eval`), dropping the remainder.
"""
from __future__ import annotations

import functools
import hashlib
import os
import random
from dataclasses import fields

import torch

from ..formats.errors import InputError
from ..formats.paths import read_bytes

EVAL_SEQLEN = 2048            # the default evaluation window (GPTQ), or the model's context when shorter
UNPRINTABLE_SHARE = 0.1       # more control characters than this and a file is not text (a binary file)


def read_text(paths: list[str], what: str = "calibration text") -> str:
    """The files' text, joined by blank lines: each a regular file of UTF-8 text, not empty."""
    return "\n\n".join(text_file(p, what) for p in paths)


def text_file(p: str, what: str) -> str:
    """One file's UTF-8 text, or InputError naming the file and saying why it is not usable text."""
    if not os.path.lexists(p):
        raise InputError(f"{p}: {what} not found")
    raw = read_bytes(p, f"{p}: {what}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: {what} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         "give a plain text file") from None
    if not text.strip():
        raise InputError(f"{p}: {what} is empty")
    unprintable = sum(1 for c in text if not c.isprintable() and not c.isspace())
    if unprintable > UNPRINTABLE_SHARE * len(text):
        raise InputError(f"{p}: {what} is {unprintable / len(text):.0%} control characters, not text "
                         "(a binary file?)")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of ids, with the tokenizer's defaults (BOS only if it adds one)."""
    from transformers.utils import logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()            # the whole text is longer than the context on purpose
    try:
        ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    finally:
        logging.set_verbosity(verbosity)
    return torch.tensor(ids, dtype=torch.long)


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str = "calibration text"):
    """[nsamples, seqlen] windows at seeded random offsets (GPTQ datautils)."""
    n = ids.numel()
    if n < seqlen + 2:
        raise InputError(f"{what} has {n} tokens, fewer than --seqlen {seqlen} + 2; "
                         "give more text or a shorter --seqlen")
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s:s + seqlen] for s in starts])


def eval_seqlen(seqlen: int | None, context: int | None, option: str = "--seqlen") -> int:
    """The evaluation window: `seqlen` when the model's context holds it; by default EVAL_SEQLEN, or the context
    when shorter (windows beyond the context give numbers the model was never made for)."""
    if seqlen is None:
        return min(EVAL_SEQLEN, context or EVAL_SEQLEN)
    if seqlen < 2:
        raise InputError(f"{option} {seqlen}: a window needs at least 2 tokens (one to predict from)")
    if context and seqlen > context:
        raise InputError(f"{option} {seqlen} exceeds the model's context of {context} tokens")
    return seqlen


def check_max_tokens(max_tokens: int | None, option: str = "--max-tokens") -> None:
    """A limit on the evaluation tokens, when given, is a positive count."""
    if max_tokens is not None and max_tokens < 1:
        raise InputError(f"{option} {max_tokens}: expected a positive number of tokens")


def eval_windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping [n, seqlen] windows of the first `max_tokens` tokens (remainder dropped)."""
    if seqlen < 2:
        raise InputError(f"evaluation windows of {seqlen} tokens: a window needs at least 2")
    check_max_tokens(max_tokens)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seqlen
    if n == 0:
        raise InputError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)


def cache_arg() -> str:
    """The KV cache's keyword: `cache` from transformers 5.24 on, `past_key_values` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    return "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


SAMPLING_BATCH = 64              # windows sampled at once at most (per token 28 % less CPU than 16 on SmolLM2)
SAMPLING_CACHE_BYTES = 2 << 30   # what their key/value cache may hold


def sampling_batch(config, seqlen: int, budget: int = SAMPLING_CACHE_BYTES) -> int:
    """Windows to sample at once: at most SAMPLING_BATCH, as many as a float32 key/value cache of `seqlen`
    tokens (every layer's keys and values, of its key/value heads) fits in `budget` bytes, at least one."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_window = config.num_hidden_layers * 2 * seqlen * heads * head_dim * 4
    return max(1, min(SAMPLING_BATCH, budget // per_window))


@functools.cache
def _filled_layer():
    """transformers' DynamicLayer filled in place: its keys and values are views of the first positions of buffers
    of `length` positions, allocated at the first update (the DynamicLayer concatenates the whole cache at every
    step: on SmolLM2, 64 windows of 512 tokens, 40 % of the sampling's CPU time went to copies and page faults).
    Attention reads only the filled positions, as from the concatenated cache."""
    from transformers.cache_utils import DynamicLayer

    class FilledLayer(DynamicLayer):
        def __init__(self, length: int):
            super().__init__()
            self.length, self.filled = length, 0

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                b, h, _, d = key_states.shape
                self.key_buffer = key_states.new_empty(b, h, self.length, d)
                self.value_buffer = value_states.new_empty(b, h, self.length, value_states.shape[-1])
            end = self.filled + key_states.shape[-2]
            if end > self.length:
                raise ValueError(f"a cache of {self.length} positions cannot take position {end}")
            self.key_buffer[..., self.filled:end, :] = key_states
            self.value_buffer[..., self.filled:end, :] = value_states
            self.filled = end
            self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
            return self.keys, self.values

        def reset(self) -> None:
            super().reset()                     # the buffers are allocated again at the next update
            self.filled = 0

    return FilledLayer


def filled_cache(layers: int, length: int):
    """A key/value cache of `layers` layers of at most `length` positions each, filled in place (`_filled_layer`)."""
    from transformers.cache_utils import Cache
    return Cache(layers=[_filled_layer()(length) for _ in range(layers)])


def categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of `probs` [b, V] (each row a distribution), drawn by inverting its cumulative sum at a
    uniform draw: index i with F(i - 1) <= u F(V) < F(i). One uniform a row, where torch.multinomial draws an
    exponential for every entry (a third of the time of sampling text from SmolLM2, 49,152 entries a row)."""
    cdf = probs.to(torch.float64).cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=generator.device)
    u = u.to(probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)[:, 0]


@torch.no_grad()
def self_windows(model, nsamples: int, seqlen: int, seed: int | torch.Generator, vocab: int,
                 batch: int | None = None):
    """Text sampled from the model itself (data-free calibration): a random first token, then ancestral
    sampling at temperature 1 (LLM-QAT, Liu et al. 2023, section 2.1), `batch` windows at a time (by default
    `sampling_batch`'s); drawn by a generator seeded with `seed`, or by `seed` itself when it is one."""
    batch = batch or sampling_batch(model.config, seqlen)
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    rows, cache = [], cache_arg()
    for start in range(0, nsamples, batch):
        b = min(batch, nsamples - start)
        first = torch.randint(0, vocab, (b, 1), generator=gen)
        ids, past = first, filled_cache(model.config.num_hidden_layers, seqlen)
        step = first
        for _ in range(seqlen - 1):
            out = model(input_ids=step, use_cache=True, **{cache: past})
            past = getattr(out, cache)
            probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
            step = categorical(probs, gen)[:, None]
            ids = torch.cat([ids, step], dim=1)
        rows.append(ids)
    return torch.cat(rows)


def fingerprint(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()
