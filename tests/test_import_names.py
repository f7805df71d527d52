"""The repository's top-level Triton folder ``kernels/`` (installed as ``gptfast.kernels``) must
never shadow the Hugging Face ``kernels`` package that transformers >= 5.25 imports, even when
the checkout is on ``sys.path`` as it is for ``python -m pytest`` or a script run from the root."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_from_root(code: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path is not None:
        env["PYTHONPATH"] = extra_path
    # ``python -c`` puts the current directory first on sys.path, as ``python -m pytest`` does
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_an_installed_kernels_package_wins_over_the_checkout_folder(tmp_path):
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("WHO = 'the other kernels package'\n")
    (fake / "layers.py").write_text("VALUE = 7\n")
    proc = _run_from_root("""
        import sys, os
        assert os.path.abspath(sys.path[0] or os.curdir) == os.getcwd()
        import kernels
        from kernels.layers import VALUE
        print(kernels.WHO, VALUE, kernels.__file__)
        import gptfast.kernels.layer_norm as ours
        print(ours.__name__, ours.__file__)
    """, extra_path=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert first.startswith("the other kernels package 7 " + str(fake))
    assert second == f"gptfast.kernels.layer_norm {os.path.join(ROOT, 'kernels', 'layer_norm.py')}"


def test_without_another_kernels_package_the_folder_looks_like_no_install():
    """transformers (5.24 and 5.25 alike) probes ``kernels`` with find_spec, then imports it when no
    distribution metadata exists and treats a module without ``__file__`` as a mere namespace
    package: the checkout's folder must look like that, not fail and not expose our modules."""
    proc = _run_from_root("""
        import kernels
        print(getattr(kernels, "__file__", None), list(kernels.__path__))
        try:
            import kernels.layer_norm
        except ModuleNotFoundError as e:
            print("missing", e.name)
        import gptfast.kernels
        print(gptfast.kernels.__name__)
    """)
    if "site-packages" in proc.stdout:
        pytest.skip("a kernels package is installed in this environment")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "[]", "missing", "kernels.layer_norm", "gptfast.kernels"]


def test_transformers_imports_from_the_checkout():
    pytest.importorskip("transformers")
    proc = _run_from_root("""
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.utils import import_utils
        print(LlamaForCausalLM.__name__, import_utils.is_kernels_available())
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "LlamaForCausalLM"
