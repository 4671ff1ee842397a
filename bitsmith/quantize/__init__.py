"""Quantizers: pure functions from a weight matrix (and its statistics) to a quantized weight.

`bitsmith.quantize` names both this package and the public job `bitsmith.quantize(model, out, ...)`
(DESIGN.md section 1), so the package is callable and calling it runs `bitsmith.api.quantize`.
"""
import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from ..api import quantize
        return quantize(*args, **kwargs)

    @property
    def __doc__(self):  # help(bitsmith.quantize) shows the job's documentation
        from ..api import quantize
        return quantize.__doc__


sys.modules[__name__].__class__ = _CallablePackage
