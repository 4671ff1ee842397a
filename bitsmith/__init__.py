"""bitsmith: post-training weight quantization for large language models."""
__version__ = "0.1.0"
__all__ = ["load", "quantize"]


def __getattr__(name):
    # the public API imports torch and transformers: load it on first use, not at `import bitsmith`
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'bitsmith' has no attribute {name!r}")
