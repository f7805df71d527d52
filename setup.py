"""Build script.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are
installed as ``gptfast.kernels``: a top-level ``kernels`` module would collide with the
unrelated ``kernels`` package on PyPI.

The C++ sources in ``csrc/`` ship as package data of ``gptfast.csrc``; they are compiled on
first use of the ``cpu`` / ``cuda`` backend (or by ``gptfast build [--cuda]``), not here -- see
``gptfast/_build.py``.
"""
from setuptools import setup

setup(
    packages=["gptfast", "gptfast.ops", "gptfast.kernels", "gptfast.csrc"],
    package_dir={"gptfast": "gptfast", "gptfast.kernels": "kernels", "gptfast.csrc": "csrc"},
    package_data={"gptfast.csrc": ["*.cpp", "*.h", "*.md", "common/*.h", "cpu/*.cpp", "cpu/*.h",
                                   "cuda/*.cpp", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h", "cuda/*.md"]},
)
