"""Register bitsmith's transformers quantizer (bitsmith/hf_quantizer.py) at `import bitsmith` without importing
transformers then: at once when transformers' quantizers are already imported, else right after they are.

Nothing here may fail an `import bitsmith`: a transformers without the registration API (older than 4.5x) or
with a different one is left as it is, and `bitsmith.load` remains the way to load a bitsmith folder.
"""
from __future__ import annotations

import importlib.abc
import sys

TARGET = "transformers.quantizers.auto"


def install() -> None:
    if TARGET in sys.modules:
        register()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


def register() -> bool:
    """Register the quantizer; False (logged at debug level) when this transformers does not take it."""
    try:
        from .hf_quantizer import register as register_quantizer
        register_quantizer()
        return True
    except Exception as e:  # noqa: BLE001 any transformers API difference leaves transformers as it was
        import logging
        logging.getLogger("bitsmith").debug("transformers quantizer not registered (%s: %s)", type(e).__name__, e)
        return False


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds TARGET with the other finders and has its module call `register` once it has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)          # once, and not while looking below
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        register()

    def __getattr__(self, name):                # get_source, get_filename, ... as the wrapped loader's
        return getattr(self.loader, name)
