"""Build and load the native extension (``csrc/``) that backs the ``cpu`` backend.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja, JIT) and
cached: in ``$GPTFAST_BUILD_DIR`` when set, else in ``gptfast/`` under torch's extension cache
(``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``). ``gptfast build`` (or
:func:`build`) compiles it ahead of time. Building at install time is avoided on purpose: pip's
build isolation would pull a second multi-GB torch into the build environment, whose ABI need not
match the torch that imports the extension.

The sources ship inside the package as ``gptfast/csrc`` (a wheel) or are found in the repository's
``csrc/`` (editable install). If no compiler or ninja is found or the build fails, the failure is
remembered: :func:`unavailable_reason` returns one line (``gptfast info`` shows it), the build is
not retried in this process, and ``auto`` falls back to the reference backend.
"""
from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path
from types import ModuleType

__all__ = ["build", "load", "unavailable_reason", "sources", "source_dir", "extension_name", "build_directory"]

# -O3 and OpenMP; no -march=native (the kernels dispatch to AVX2/AVX-512 clones at load time, see
# csrc/common/vec_math.h) and no -ffast-math (it would break NaN propagation).
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]
LDFLAGS = ["-fopenmp"]

_SOURCES = ("bindings.cpp", "attention.cpp", "layer_norm.cpp", "gelu_ffn.cpp",
            "cpu/attention.cpp", "cpu/layer_norm.cpp", "cpu/gelu_ffn.cpp")

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


def source_dir() -> Path:
    """The ``csrc`` folder: inside the installed package, else the repository's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"gptfast C++ sources not found (looked in {here / 'csrc'} and "
                            f"{here.parent / 'csrc'})")


def sources() -> list[str]:
    root = source_dir()
    return [str(root / s) for s in _SOURCES]


def extension_name() -> str:
    """Module name, tagged with the torch version so that two torch installs never share a build."""
    import torch

    tag = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
    return f"gptfast_C_torch{tag}"


def build_directory(name: str | None = None) -> Path:
    """``$GPTFAST_BUILD_DIR/<name>``, else ``<torch's extension cache>/gptfast/<name>``."""
    name = name or extension_name()
    root = os.environ.get("GPTFAST_BUILD_DIR")
    if root:
        base = Path(root).expanduser()
    else:
        base = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions") / "gptfast"
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _shimmed_sources(build_dir: Path) -> list[str]:
    """The source list for cpp_extension, which names objects by file stem: csrc/attention.cpp and
    csrc/cpu/attention.cpp would both become attention.o. Nested sources are compiled through
    one-line shims (``cpu_attention.cpp`` including the real file); ninja's depfiles still track
    the real files, so editing them triggers a rebuild."""
    out = []
    shim_dir = build_dir / "shims"
    shim_dir.mkdir(exist_ok=True)
    for src in sources():
        rel = Path(src).relative_to(source_dir())
        if len(rel.parts) == 1:
            out.append(src)
            continue
        shim = shim_dir / "_".join(rel.parts)
        text = f'#include "{Path(src).as_posix()}"\n'
        if not shim.is_file() or shim.read_text() != text:
            shim.write_text(text)
        out.append(str(shim))
    return out


def _precheck() -> str | None:
    """A one-line reason when the build cannot even start."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH; install g++ or set CXX)"
    try:
        from torch.utils.cpp_extension import verify_ninja_availability
        verify_ninja_availability()
    except Exception:
        return "ninja is not installed (pip install ninja)"
    try:
        source_dir()
    except FileNotFoundError as exc:
        return str(exc)
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line for line in text if "error" in line.lower()), text[0] if text else "")
    return f"{type(exc).__name__}: {first[:300]}"


def _compile(verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    name = extension_name()
    build_dir = build_directory(name)
    return cpp_extension.load(name=name, sources=_shimmed_sources(build_dir), extra_cflags=CFLAGS,
                              extra_ldflags=LDFLAGS, extra_include_paths=[str(source_dir())],
                              build_directory=str(build_dir), with_cuda=False, verbose=verbose)


def load() -> ModuleType:
    """The extension module, built on first call; raises RuntimeError with the reason if it cannot be."""
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is None and _error is None:
            _error = _precheck()
            if _error is None:
                try:
                    _module = _compile(verbose=False)
                except Exception as exc:  # compiler errors, linker errors, import errors
                    _error = f"native extension failed to build ({_one_line(exc)})"
    if _module is None:
        raise RuntimeError(_error)
    return _module


def unavailable_reason() -> str | None:
    """None when the extension loads, else one line saying why not (cached: tried once)."""
    if _module is not None:
        return None
    if _error is not None:
        return _error
    try:
        load()
    except RuntimeError as exc:
        return str(exc)
    return None


def build(verbose: bool = True) -> ModuleType:
    """Compile (or find in the cache) and load the extension now; raises on failure.

    This is what ``gptfast build`` runs; unlike :func:`load` it retries after an earlier failure
    and prints the compiler's output when ``verbose``.
    """
    global _module, _error
    if _module is not None:  # already built and imported by this process: nothing to redo
        if verbose:
            print(f"gptfast: native extension {extension_name()} ready in 0.0 s (already loaded: "
                  f"{_module.__file__}); attention GEMMs: {_module.blas_source()}")
        return _module
    reason = _precheck()
    if reason is not None:
        raise RuntimeError(reason)
    start = time.perf_counter()
    with _lock:
        _module = _compile(verbose=verbose)
        _error = None
    if verbose:
        print(f"gptfast: native extension {extension_name()} ready in {time.perf_counter() - start:.1f} s "
              f"({_module.__file__}); attention GEMMs: {_module.blas_source()}")
    return _module
