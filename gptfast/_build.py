"""Build and load the native extensions (``csrc/``) behind the ``cpu`` and ``cuda`` backends.

One set of bindings and argument checks (``csrc/bindings.cpp``, ``csrc/<op>.cpp``) is compiled
into two extension modules, each with its own kernels: ``cpu`` (``csrc/cpu/``, the host
compiler, ~30 s) and ``cuda`` (``csrc/cuda/``, nvcc + cuBLASLt, ~1 min). They are separate so that
the cpu backend never waits for nvcc and a machine without a CUDA toolkit still has it.

Each is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja, JIT) and cached:
in ``$GPTFAST_BUILD_DIR`` when set, else in ``gptfast/`` under torch's extension cache
(``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``). ``gptfast build [--cuda]`` (or
:func:`build`) compiles ahead of time. Building at install time is avoided on purpose: pip's
build isolation would pull a second multi-GB torch into the build environment, whose ABI need not
match the torch that imports the extension.

The CUDA build targets ``$TORCH_CUDA_ARCH_LIST`` or, when unset, ``8.0;9.0+PTX`` (sm_80 and sm_90
machine code, and PTX for newer GPUs). It needs no GPU, only a CUDA build of torch, nvcc (``$CUDA_HOME``, else
``/usr/local/cuda``, else nvcc on PATH) and cuBLASLt's header and library (the toolkit's, or the
``nvidia-cublas`` wheel that CUDA builds of torch install).

The sources ship inside the package as ``gptfast/csrc`` (a wheel) or are found in the repository's
``csrc/`` (editable install). If a build cannot start or fails, the failure is remembered:
:func:`unavailable_reason` returns one line (``gptfast info`` shows it), the build is not retried
in this process, and ``auto`` falls back to the next backend.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

__all__ = ["build", "load", "unavailable_reason", "sources", "source_dir", "extension_name",
           "build_directory", "BACKENDS", "DEFAULT_CUDA_ARCH_LIST"]

BACKENDS = ("cpu", "cuda")
# sm_80 and sm_90 machine code, plus compute_90 PTX that the driver compiles for newer GPUs
# (sm_100, sm_120), which cannot run sm_90 machine code.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

# -O3 and OpenMP; no -march=native (the kernels dispatch to AVX2/AVX-512 clones at load time, see
# csrc/common/vec_math.h) and no -ffast-math (it would break NaN propagation).
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]
LDFLAGS = ["-fopenmp"]
# -Xptxas -v: ptxas prints every kernel's registers, spills and shared memory (shown with
# `gptfast build --cuda`; resource_usage() reads them back from the binary). No --use_fast_math:
# NaN must propagate and the kernels call the fast exp2 explicitly where they want it.
CUDA_CFLAGS = ["-O3", "-DGPTFAST_CUDA", "-Xptxas=-v", "--expt-relaxed-constexpr"]

_COMMON = ("bindings.cpp", "attention.cpp", "layer_norm.cpp", "gelu_ffn.cpp")
_SOURCES = {
    "cpu": _COMMON + ("cpu/attention.cpp", "cpu/layer_norm.cpp", "cpu/gelu_ffn.cpp"),
    "cuda": _COMMON + ("cuda/attention.cpp", "cuda/attention.cu", "cuda/layer_norm.cpp",
                       "cuda/layer_norm.cu", "cuda/gelu_ffn.cpp", "cuda/gelu_ffn.cu"),
}


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    module: ModuleType | None = None
    error: str | None = None


_STATE = {backend: _State() for backend in BACKENDS}


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown native backend {backend!r}; choose one of {BACKENDS}")
    return backend


def source_dir() -> Path:
    """The ``csrc`` folder: inside the installed package, else the repository's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"gptfast C++ sources not found (looked in {here / 'csrc'} and "
                            f"{here.parent / 'csrc'})")


def sources(backend: str = "cpu") -> list[str]:
    root = source_dir()
    return [str(root / s) for s in _SOURCES[_check_backend(backend)]]


def extension_name(backend: str = "cpu") -> str:
    """Module name, tagged with the torch version so that two torch installs never share a build."""
    import torch

    tag = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
    prefix = "gptfast_C" if _check_backend(backend) == "cpu" else "gptfast_cuda"
    return f"{prefix}_torch{tag}"


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


def _shimmed_sources(build_dir: Path, backend: str) -> list[str]:
    """The source list for cpp_extension, which names objects by file stem: csrc/attention.cpp and
    csrc/cpu/attention.cpp would both become attention.o. Nested sources are compiled through
    one-line shims (``cpu_attention.cpp`` including the real file; ``cuda_attention.cu`` becomes
    ``cuda_attention.cuda.o``); ninja's depfiles still track the real files, so editing them
    triggers a rebuild."""
    out = []
    shim_dir = build_dir / "shims"
    shim_dir.mkdir(exist_ok=True)
    for src in sources(backend):
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


def cuda_home() -> str | None:
    """The CUDA toolkit: ``$CUDA_HOME`` / ``$CUDA_PATH``, else ``/usr/local/cuda``, else nvcc's."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # /usr/local/bin/nvcc may be a wrapper script: its parent is not the toolkit. Prefer the
    # directory whose include/ holds cuda_runtime.h.
    home = str(Path(nvcc).resolve().parent.parent)
    return home if Path(home, "include", "cuda_runtime.h").is_file() else None


def cublaslt() -> tuple[str, str] | None:
    """(include dir with cublasLt.h, path of libcublasLt.so*) from the toolkit or the nvidia wheels."""
    candidates = []
    home = cuda_home()
    if home:
        candidates.append((Path(home, "include"), [Path(home, "lib64"), Path(home, "lib")]))
    for site in sys.path:
        for inc in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))) + \
                sorted(glob.glob(os.path.join(site, "nvidia", "cublas", "include"))):
            root = Path(inc).parent
            candidates.append((Path(inc), [root / "lib"]))
    for inc, libdirs in candidates:
        if not (inc / "cublasLt.h").is_file():
            continue
        for libdir in libdirs:
            libs = sorted(libdir.glob("libcublasLt.so*"))
            if libs:
                return str(inc), str(libs[0])
    return None


def cuda_arch_list() -> str:
    """``$TORCH_CUDA_ARCH_LIST`` when set, else DEFAULT_CUDA_ARCH_LIST."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCH_LIST


def gencode_flags(arch_list: str) -> list[str]:
    """nvcc flags for an arch list in torch's notation ("8.0;9.0+PTX", "9.0a", spaces or ';')."""
    flags = []
    for arch in re.split(r"[;\s]+", arch_list.strip()):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch.removesuffix("+PTX").replace(".", "")
        if not re.fullmatch(r"\d+[a-z]?", num):
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot read {arch!r} (expected e.g. 8.0, 9.0a, 9.0+PTX)")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise ValueError("TORCH_CUDA_ARCH_LIST is empty")
    return flags


def _precheck(backend: str = "cpu") -> str | None:
    """A one-line reason when the build cannot even start."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH; install g++ or set CXX)"
    try:
        _cpp_extension().verify_ninja_availability()
    except Exception:
        return "ninja is not installed (pip install ninja)"
    try:
        source_dir()
    except FileNotFoundError as exc:
        return str(exc)
    if _check_backend(backend) == "cuda":
        import torch

        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build (the cuda backend needs a CUDA build of torch)"
        home = cuda_home()
        if home is None or not Path(home, "bin", "nvcc").is_file():
            return "no CUDA toolkit (nvcc) found: set CUDA_HOME"
        if cublaslt() is None:
            return "cuBLASLt (cublasLt.h and libcublasLt.so) not found in the CUDA toolkit or the nvidia wheels"
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line for line in text if "error" in line.lower()), text[0] if text else "")
    return f"{type(exc).__name__}: {first[:300]}"


def _cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, imported with $CUDA_HOME pointing at the toolkit found here: it
    resolves CUDA_HOME once, at import, and would otherwise pick a wrapper script's folder (and
    warn about it) on machines whose nvcc on PATH is a wrapper."""
    if "torch.utils.cpp_extension" not in sys.modules and not os.environ.get("CUDA_HOME"):
        home = cuda_home()
        if home:
            os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension
    return cpp_extension


def _compile(backend: str, verbose: bool) -> ModuleType:
    cpp_extension = _cpp_extension()
    name = extension_name(backend)
    build_dir = build_directory(name)
    srcs = _shimmed_sources(build_dir, backend)
    if backend == "cpu":
        return cpp_extension.load(name=name, sources=srcs, extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                                  extra_include_paths=[str(source_dir())], build_directory=str(build_dir),
                                  with_cuda=False, verbose=verbose)
    home = cuda_home()
    # cpp_extension resolved CUDA_HOME when it was imported (it may have picked a wrapper
    # script's folder); point it, and nvcc's children, at the toolkit found above.
    cpp_extension.CUDA_HOME = home
    os.environ["CUDA_HOME"] = home
    inc, lib = cublaslt()
    libdir = str(Path(lib).parent)
    # -idirafter: the wheel's include dir also carries CUDA runtime headers; the toolkit's win.
    cflags = ["-O3", "-DGPTFAST_CUDA", "-idirafter", inc]
    ldflags = [f"-L{libdir}", f"-l:{Path(lib).name}", f"-Wl,-rpath,{libdir}"]
    # Explicit -gencode flags: cpp_extension then adds none of its own, and TORCH_CUDA_ARCH_LIST
    # is read here without being set for the rest of the process.
    cuda_cflags = CUDA_CFLAGS + gencode_flags(cuda_arch_list())
    return cpp_extension.load(name=name, sources=srcs, extra_cflags=cflags, extra_cuda_cflags=cuda_cflags,
                              extra_ldflags=ldflags, extra_include_paths=[str(source_dir())],
                              build_directory=str(build_dir), with_cuda=True, verbose=verbose)


def load(backend: str = "cpu") -> ModuleType:
    """The backend's extension module, built on first call; raises RuntimeError with the reason if
    it cannot be."""
    state = _STATE[_check_backend(backend)]
    if state.module is not None:
        return state.module
    with state.lock:
        if state.module is None and state.error is None:
            state.error = _precheck(backend)
            if state.error is None:
                name = extension_name(backend)
                if backend == "cuda" and not any(build_directory(name).glob(f"{name}*.so")):
                    # minutes the first time: say why the first op on a CUDA tensor is slow
                    print(f"gptfast: compiling the cuda backend ({name}, once, about a minute on 2 "
                          f"cores; `gptfast build --cuda` does it ahead of time)", file=sys.stderr)
                try:
                    state.module = _compile(backend, verbose=False)
                except Exception as exc:  # compiler errors, linker errors, import errors
                    state.error = f"native {backend} extension failed to build ({_one_line(exc)})"
    if state.module is None:
        raise RuntimeError(state.error)
    return state.module


def unavailable_reason(backend: str = "cpu") -> str | None:
    """None when the backend's extension loads, else one line saying why not (cached: tried once)."""
    state = _STATE[_check_backend(backend)]
    if state.module is not None:
        return None
    if state.error is not None:
        return state.error
    try:
        load(backend)
    except RuntimeError as exc:
        return str(exc)
    return None


def _describe(module: ModuleType) -> str:
    if module.backend == "cpu":
        return f"attention GEMMs: {module.blas_source()}"
    return f"CUDA archs: {cuda_arch_list()}"


def build(verbose: bool = True, backend: str = "cpu") -> ModuleType:
    """Compile (or find in the cache) and load the backend's extension now; raises on failure.

    This is what ``gptfast build`` runs; unlike :func:`load` it retries after an earlier failure
    and prints the compiler's output when ``verbose`` (for cuda: ptxas' registers and spills).
    """
    state = _STATE[_check_backend(backend)]
    name = extension_name(backend)
    if state.module is not None:  # already built and imported by this process: nothing to redo
        if verbose:
            print(f"gptfast: native extension {name} ready in 0.0 s (already loaded: "
                  f"{state.module.__file__}); {_describe(state.module)}")
        return state.module
    reason = _precheck(backend)
    if reason is not None:
        raise RuntimeError(reason)
    start = time.perf_counter()
    with state.lock:
        state.module = _compile(backend, verbose=verbose)
        state.error = None
    if verbose:
        print(f"gptfast: native extension {name} ready in {time.perf_counter() - start:.1f} s "
              f"({state.module.__file__}); {_describe(state.module)}")
    return state.module


# --- resource usage of the CUDA kernels (registers, stack/spills, shared memory) ------------------

# Kernels whose main loops must not touch local memory (issue 7): a register spill there costs a
# round trip to L1/L2 per use inside the innermost loop.
SPILL_FREE_KERNELS = ("attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel")


def _cuobjdump() -> str | None:
    home = cuda_home()
    candidates = [shutil.which("cuobjdump")]
    if home:
        candidates.append(str(Path(home, "bin", "cuobjdump")))
    try:  # triton wheels ship one
        import triton
        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except Exception:
        pass
    return next((c for c in candidates if c and Path(c).is_file()), None)


def _short_kernel_names(mangled: list[str]) -> list[str]:
    """``attention_fwd_kernel<__half, 64>`` for each mangled name (one c++filt call for all)."""
    import subprocess

    names = mangled
    if mangled and shutil.which("c++filt"):
        out = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True).stdout
        if len(out.splitlines()) == len(mangled):
            names = out.splitlines()
    short = []
    for name in names:
        name = name.replace("(anonymous namespace)::", "").replace("gptfast::cuda::", "")
        name = re.sub(r"\([^()]*\)$", "", name)  # the parameter list
        head, sep, args = name.partition("<")
        short.append(head.split()[-1].rsplit("::", 1)[-1] + sep + args)
    return short


def resource_usage(path: str | None = None) -> list[dict]:
    """Per kernel and architecture: registers, stack bytes (spills land there), static shared and
    local memory, read with ``cuobjdump --dump-resource-usage`` from the CUDA extension (built now
    if needed) or from ``path``. Attention kernels also get their dynamic shared memory."""
    import subprocess

    module = None
    if path is None:
        module = load("cuda")
        path = module.__file__
    tool = _cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit bin/ or the triton wheel)")
    text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                          check=True).stdout
    rows, arch = [], "?"
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if not m or i + 1 >= len(lines):
            continue
        fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", lines[i + 1]))
        row = dict(kernel=m.group(1), arch=arch, registers=int(fields.get("REG", 0)),
                   stack=int(fields.get("STACK", 0)), local=int(fields.get("LOCAL", 0)),
                   shared_static=int(fields.get("SHARED", 0)), shared_dynamic=None)
        rows.append(row)
    for row, name in zip(rows, _short_kernel_names([r["kernel"] for r in rows])):
        row["kernel"] = name
        hd = re.search(r"attention_(fwd|bwd_dkdv|bwd_dq)_kernel<[^,]+, ?(\d+)(?:, ?(true|false))?>", name)
        if hd and module is not None:  # kernel codes of attention_smem_bytes (csrc/cuda/attention.h)
            kernel = 0 if hd.group(1) == "fwd" else 2 if hd.group(3) == "true" else 1
            row["shared_dynamic"] = module.attention_smem_bytes(int(hd.group(2)), kernel)
    return sorted(rows, key=lambda r: (r["kernel"], r["arch"]))


def is_spill_checked(kernel: str) -> bool:
    """Whether a kernel (short or, without c++filt, mangled name) is one of SPILL_FREE_KERNELS."""
    return any(name in kernel for name in SPILL_FREE_KERNELS)


def spills(rows: list[dict]) -> list[dict]:
    """The rows of SPILL_FREE_KERNELS that use stack or local memory."""
    return [r for r in rows if is_spill_checked(r["kernel"]) and (r["stack"] or r["local"])]
