"""Triton kernels and their launchers (installed as ``gptfast.kernels``).

Each module holds pure kernels plus launchers: tensors in, tensors out, no autograd. The
launcher signatures are the contract in ``gptfast/ops/_backend.py``. Importing this package
does not import triton; the op modules do, and they are loaded by the backend registry on
first use only.
"""
