"""Triton kernels and their launchers (installed as ``gptfast.kernels``).

Each module holds pure kernels plus launchers: tensors in, tensors out, no autograd. The
launcher signatures are the contract in ``gptfast/ops/_backend.py``. Importing this package
does not import triton; the op modules do, and they are loaded by the backend registry on
first use only.

The folder sits at the repository root, so with the checkout on ``sys.path`` (``python -m
pytest``, a script run from the root) ``import kernels`` finds it before the unrelated
Hugging Face ``kernels`` package that transformers >= 5.25 imports. Imported under that
top-level name, this module hands the import over to whichever ``kernels`` the rest of
``sys.path`` holds, so the checkout never shadows it; when there is none it stays an empty
module without ``__file__`` or submodules, which is how transformers' availability check
recognises a folder that merely shadows the name (a namespace package) rather than an install.
Our code only ever imports ``gptfast.kernels``.
"""
if __name__ != "gptfast.kernels":  # pragma: no cover - exercised in a subprocess by the tests
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _rest = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec(__name__, _rest)
    if _spec is None:
        del __file__
        __path__ = []
    else:
        _module = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _module  # the import statement returns this entry
        _spec.loader.exec_module(_module)
