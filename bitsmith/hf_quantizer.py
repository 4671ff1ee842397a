"""transformers' `from_pretrained` for folders with `quant_method: "bitsmith"` (`bitsmith compress`, `quantize
--lossless-rest`, `--method qoq`): a quantizer registered under that name that hands the folder to bitsmith's loader.

transformers builds its model first (on the meta device) and reads the safetensors it can match; the quantizer then
swaps in the modules `bitsmith.load` builds from the folder, so that the model `from_pretrained` returns computes
exactly what `bitsmith.load(folder, dtype=...)` does (same modules, same tensors). Since every tensor comes from
bitsmith's loader, transformers' own pass is kept cheap and quiet: it initialises and ties nothing, and its report
of the keys it could not place is left out.

Registered by `bitsmith/transformers_hook.py` when both `bitsmith` and transformers' quantizers are imported.
"""
from __future__ import annotations

import os

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats.checkpoint import TRANSFORMERS_GUARD

METHOD = "bitsmith"


class BitsmithConfig(QuantizationConfigMixin):
    """The `quantization_config` of a bitsmith folder, every key kept as written (bitsmith's loader reads them)."""

    def __init__(self, **kwargs):
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.quant_method = METHOD


class BitsmithQuantizer(HfQuantizer):
    """Loads a bitsmith folder through `bitsmith.load` for `from_pretrained`; it quantizes nothing itself."""

    requires_calibration = True             # a bitsmith folder only: refused as a config for quantizing a model
    requires_parameters_quantization = False
    required_packages = None

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.dtype = None
        self.device = "cpu"
        self.folder = None
        self.tied = None

    def validate_environment(self, *args, **kwargs):
        self.device = one_device(kwargs.get("device_map"))

    def update_device_map(self, device_map):
        return None                         # bitsmith's loader places the model (validate_environment)

    def update_dtype(self, dtype):
        self.dtype = dtype
        return dtype

    def update_torch_dtype(self, torch_dtype):         # the same hook in transformers 4.x
        return self.update_dtype(torch_dtype)

    def update_attn_implementation(self, config):
        return _unguarded(config)

    def update_tp_plan(self, config):                  # the same moment in transformers 4.52 to 5.1x
        return _unguarded(config)

    def update_missing_keys(self, model, missing_keys, prefix):     # transformers 4.x: no report of these keys
        return []

    def update_unexpected_keys(self, model, unexpected_keys, prefix):
        return []

    def _process_model_before_weight_loading(self, model, **kwargs):
        files = kwargs.get("checkpoint_files")
        if files:
            self.folder = os.path.dirname(files[0])
        for module in model.modules():      # transformers' tensors are all replaced: none is worth initialising
            module._is_hf_initialized = True
        model._keys_to_ignore_on_load_missing = {".*"}
        model._keys_to_ignore_on_load_unexpected = {".*"}
        self.tied = model.__dict__.get("all_tied_weights_keys")
        if isinstance(self.tied, dict):     # transformers 5: no tying of tensors bitsmith's loader replaces
            model.all_tied_weights_keys = {}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .loader import load_model
        for name in ("_keys_to_ignore_on_load_missing", "_keys_to_ignore_on_load_unexpected"):
            model.__dict__.pop(name, None)
        if isinstance(self.tied, dict):
            model.all_tied_weights_keys = self.tied
        folder = self.folder or getattr(model.config, "name_or_path", None)
        if not folder or not os.path.isdir(folder):
            raise ValueError(f"a bitsmith checkpoint loads from a local folder, not {folder!r}; download it first")
        dtype = self.dtype if isinstance(self.dtype, torch.dtype) else torch.float32
        net = load_model(folder, dtype=dtype, device=self.device)
        for name, child in list(net.named_children()):
            setattr(model, name, child)
        for module in model.modules():      # one config: what from_pretrained resolved (attention, dtype, ...)
            if getattr(module, "config", None) is net.config:
                module.config = model.config
        return model

    def is_serializable(self, *args, **kwargs):
        return False                        # save_pretrained would write transformers' layout, not bitsmith's

    @property
    def is_trainable(self) -> bool:
        return False


def one_device(device_map) -> str:
    """The one device a `device_map` names ("cpu", "cuda:0", {"": 0}, ...); bitsmith does not split a model."""
    if device_map is None:
        return "cpu"
    if isinstance(device_map, dict):
        places = set(device_map.values())
        if len(places) != 1:
            raise ValueError(f"device_map {device_map!r}: a bitsmith checkpoint loads onto one device")
        device_map = places.pop()
    if isinstance(device_map, int):
        return f"cuda:{device_map}"
    if isinstance(device_map, torch.device):
        return str(device_map)
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device_map == "disk" or not isinstance(device_map, str):
        raise ValueError(f"device_map {device_map!r}: a bitsmith checkpoint loads onto one cpu or cuda device")
    return device_map


def _unguarded(config):
    if getattr(config, "_attn_implementation", None) == TRANSFORMERS_GUARD:
        config._attn_implementation = None            # transformers' default, as for any model
    return config


def register() -> None:
    """Make `quant_method: "bitsmith"` known to transformers (once; a name already taken is left alone)."""
    import importlib
    auto = importlib.import_module("transformers.quantizers.auto")
    if METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(METHOD)(BitsmithConfig)
    if METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(METHOD)(BitsmithQuantizer)
