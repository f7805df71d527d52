"""Build script.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are
installed as ``gptfast.kernels``: a top-level ``kernels`` module would collide with the
unrelated ``kernels`` package on PyPI.
"""
from setuptools import setup

setup(
    packages=["gptfast", "gptfast.ops", "gptfast.kernels"],
    package_dir={"gptfast": "gptfast", "gptfast.kernels": "kernels"},
)
