"""bitsmith: post-training weight quantization for large language models."""
__version__ = "0.1.0"
__all__ = ["load", "quantize"]


def _register_with_transformers() -> None:
    # `AutoModelForCausalLM.from_pretrained` of a quant_method "bitsmith" folder, once transformers is imported
    try:
        from . import transformers_hook
        transformers_hook.install()
    except Exception:  # noqa: BLE001, S110 never a reason for `import bitsmith` to fail
        pass


_register_with_transformers()


def __getattr__(name):
    # the public API imports torch and transformers: load it on first use, not at `import bitsmith`
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'bitsmith' has no attribute {name!r}")
