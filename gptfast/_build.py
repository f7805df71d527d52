"""Build and load the native extensions (``csrc/``) behind the ``cpu`` and ``cuda`` backends.

One set of bindings and argument checks (``csrc/bindings.cpp``, ``csrc/<op>.cpp``) is compiled
into two extension modules, each with its own kernels: ``cpu`` (``csrc/cpu/``, the host
compiler, ~30 s) and ``cuda`` (``csrc/cuda/``, nvcc + cuBLASLt, ~1 min). They are separate so that
the cpu backend never waits for nvcc and a machine without a CUDA toolkit still has it.

Each is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja, JIT) and cached:
in ``$GPTFAST_BUILD_DIR/<name>`` when set, else in ``gptfast/<name>`` under torch's extension
cache (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``). ``gptfast build [--cuda]`` (or
:func:`build`) compiles ahead of time. Building at install time is avoided on purpose: pip's
build isolation would pull a second multi-GB torch into the build environment, whose ABI need not
match the torch that imports the extension.

The cache key. ``<name>`` (the module name and its folder, e.g. ``gptfast_C_torch2_14_1_cu130_
3f09c2a1b4de``) ends in a digest of everything that changes the binary: torch (version, git
version, CUDA/HIP version, C++ ABI, install path) and the Python ABI, every argument given to
cpp_extension (flags, cuBLASLt, the CUDA arch list), the contents and location of ``csrc/``, and
the toolchain: the resolved path and ``--version`` of ``$CXX`` (else ``c++``) and, for cuda, of
nvcc. Two environments therefore never share, nor invalidate, each other's build. Nothing in it
depends on time or the process: ``gptfast build`` and every later process of the same environment
compute the same name. Its inputs are computed once per process (one ``--version`` per compiler).

The stamp. After a build imports, ``gptfast-build.json`` is written next to the ``.so`` with its
size and sha256 (and the key's inputs, for people). A build counts as cached only when the stamp
matches: a truncated ``.so`` keeps its mtime, so ninja would call it up to date, and dlopen of a
truncated file dies of SIGBUS. A ``.so`` that does not match its stamp is deleted and relinked
(and, if that fails, its folder is rebuilt from scratch); when it cannot be rebuilt (no compiler,
read-only folder) the error says so. ``gptfast build`` goes through the same check and repair. A
(re)build holds ``gptfast-build.lock`` from that check to the new stamp, so concurrent processes
(DDP ranks) build once and never delete each other's fresh ``.so``.

Loading. A build whose stamp matches is imported directly (``importlib``, as cpp_extension itself
imports it), without ninja, a compiler, a lock file or any write, so a prebuilt cache also works
from a read-only folder on a machine without compilers. Where no compiler is found at all, the
toolchain part of the key is unknown: then the newest stamped build with the same other inputs is
used. Only a missing or damaged build goes through cpp_extension (ninja, and its own lock file).
Moving a cache folder is fine for loading; rebuilding a moved one recompiles the nested sources
(the shims' paths are in ninja's commands).

The CUDA build targets ``$TORCH_CUDA_ARCH_LIST`` or, when unset, ``8.0;9.0+PTX`` (sm_80 and sm_90
machine code, and PTX for newer GPUs). It needs no GPU, only a CUDA build of torch, nvcc (``$CUDA_HOME``, else
``/usr/local/cuda``, else nvcc on PATH) and cuBLASLt's header and library (the toolkit's, or the
``nvidia-cublas`` wheel that CUDA builds of torch install).

The sources ship inside the package as ``gptfast/csrc`` (a wheel) or are found in the repository's
``csrc/`` (editable install); ``$GPTFAST_SOURCE_DIR`` overrides both (tests build mutated copies).
If a build cannot start or fails, the failure is remembered: :func:`unavailable_reason` returns
one line (``gptfast info`` shows it; a compile error shows the compiler's own ``error:`` line),
the build is not retried in this process, and ``auto`` falls back to the next backend.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, TypeVar

__all__ = ["build", "load", "unavailable_reason", "sources", "source_dir", "extension_name",
           "build_directory", "BuildError", "BACKENDS", "DEFAULT_CUDA_ARCH_LIST", "STAMP"]

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

_COMMON = ("bindings.cpp", "attention.cpp", "layer_norm.cpp", "gelu_ffn.cpp", "linear_cross_entropy.cpp",
           "gated_ffn.cpp")
_SOURCES = {
    "cpu": _COMMON + ("cpu/attention.cpp", "cpu/layer_norm.cpp", "cpu/gelu_ffn.cpp", "cpu/kvcache.cpp",
            "cpu/linear_cross_entropy.cpp", "cpu/gated_ffn.cpp"),
    "cuda": _COMMON + ("cuda/attention.cpp", "cuda/attention.cu", "cuda/layer_norm.cpp",
                       "cuda/layer_norm.cu", "cuda/gelu_ffn.cpp", "cuda/gelu_ffn.cu", "cuda/rms_norm.cpp",
                       "cuda/rms_norm.cu", "cuda/linear_cross_entropy.cpp", "cuda/linear_cross_entropy.cu",
                       "cuda/gated_ffn.cpp", "cuda/gated_ffn.cu"),
}
# Files of csrc/ that can reach a binary (the key hashes all of them, headers included).
_SOURCE_SUFFIXES = (".c", ".cc", ".cpp", ".cu", ".cuh", ".h", ".hpp", ".inl")
_PREFIX = {"cpu": "gptfast_C", "cuda": "gptfast_cuda"}
STAMP = "gptfast-build.json"
_LOCK = "gptfast-build.lock"  # held while (re)building; cpp_extension holds its own "lock" inside


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    module: ModuleType | None = None
    error: str | None = None


_STATE = {backend: _State() for backend in BACKENDS}
# Per-process memo of the key's inputs (torch, source digests, compiler --version): computing
# them is the only work a cached load does besides hashing the .so.
_CACHE: dict = {}
_T = TypeVar("_T")


def _memo(key: tuple, compute: Callable[[], _T]) -> _T:
    if key not in _CACHE:
        _CACHE[key] = compute()
    return _CACHE[key]


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown native backend {backend!r}; choose one of {BACKENDS}")
    return backend


def source_dir() -> Path:
    """The ``csrc`` folder: ``$GPTFAST_SOURCE_DIR``, else inside the installed package, else the
    repository's."""
    override = os.environ.get("GPTFAST_SOURCE_DIR")
    here = Path(__file__).resolve().parent
    candidates = [Path(override).expanduser().resolve()] if override else [here / "csrc", here.parent / "csrc"]
    for candidate in candidates:
        if (candidate / "bindings.cpp").is_file():
            return candidate
    raise FileNotFoundError("gptfast C++ sources not found (looked in "
                            f"{' and '.join(str(c) for c in candidates)})")


def sources(backend: str = "cpu") -> list[str]:
    root = source_dir()
    return [str(root / s) for s in _SOURCES[_check_backend(backend)]]


# --- the cache key ---------------------------------------------------------------------------------

def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _torch_identity() -> dict:
    """What identifies the torch (and Python) the extension links against. The install path is
    part of it: two virtualenvs with the same torch version are two different libtorch files."""
    import torch

    def compute():
        return {"version": torch.__version__, "git": torch.version.git_version,
                "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
                "cxx11_abi": getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None),
                "path": os.path.realpath(os.path.dirname(torch.__file__)),
                "python": f"{sys.version} {sysconfig.get_config_var('EXT_SUFFIX')}"}
    return _memo(("torch", torch.__file__), compute)


def _source_digest(root: Path) -> str:
    """sha256 over the relative path and bytes of every source and header under ``root``."""
    def compute():
        h = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.suffix in _SOURCE_SUFFIXES and p.is_file()):
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
        return h.hexdigest()
    return _memo(("sources", str(root)), compute)


def _tool_identity(command: str) -> str | None:
    """``<resolved path>\\n<command --version>`` for a compiler command, None when it is not found."""
    def compute():
        argv = shlex.split(command)
        path = shutil.which(argv[0]) if argv else None
        if path is None:
            return None
        try:
            out = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=60)
            version = out.stdout.strip() or f"--version exited {out.returncode}"
        except (OSError, subprocess.SubprocessError) as exc:
            version = f"--version failed: {type(exc).__name__}"
        return f"{os.path.realpath(path)}\n{version}"
    return _memo(("tool", command), compute)


@dataclass(frozen=True)
class _Key:
    name: str            # module name and folder name: <prefix>_torch<version>_<digest[:12]>
    base: str            # digest of every input except the toolchain (see _find_cached)
    toolchain_found: bool
    inputs: dict         # everything that went into the digest, written into the stamp


def _key(backend: str) -> _Key:
    """The cache key of the backend's build in this environment (see the module docstring)."""
    import torch

    root = source_dir()
    base = {"backend": backend, "torch": _torch_identity(), "load_args": _load_args(backend),
            "sources": {"dir": str(root), "sha256": _source_digest(root)}}
    cxx = os.environ.get("CXX", "c++")  # what cpp_extension compiles with
    toolchain = {"cxx": cxx, "cxx_identity": _tool_identity(cxx)}
    if backend == "cuda":
        home = cuda_home()
        toolchain["nvcc_identity"] = _tool_identity(shlex.quote(str(Path(home, "bin", "nvcc")))) if home else None
    found = all(v is not None for k, v in toolchain.items() if k.endswith("_identity"))
    base_digest = _digest(json.dumps(base, sort_keys=True))
    digest = _digest(base_digest + json.dumps(toolchain, sort_keys=True))
    tag = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
    return _Key(name=f"{_PREFIX[backend]}_torch{tag}_{digest[:12]}", base=base_digest,
                toolchain_found=found, inputs={"base": base, "toolchain": toolchain})


def extension_name(backend: str = "cpu") -> str:
    """Module (and build folder) name: the torch version, then a digest of the cache key."""
    return _key(_check_backend(backend)).name


def _build_root() -> Path:
    root = os.environ.get("GPTFAST_BUILD_DIR")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions") / "gptfast"


def build_directory(name: str | None = None) -> Path:
    """``$GPTFAST_BUILD_DIR/<name>``, else ``<torch's extension cache>/gptfast/<name>``. Not created
    here: only a build creates it (a cached build may live in a read-only folder)."""
    return _build_root() / (name or extension_name())


# --- the stamp -------------------------------------------------------------------------------------

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_stamp(build_dir: Path) -> dict | None:
    try:
        stamp = json.loads((build_dir / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _verified_so(build_dir: Path, stamp: dict | None) -> Path | None:
    """The stamped .so when its size and sha256 match the stamp (read, never mapped), else None."""
    if stamp is None or not isinstance(stamp.get("so"), str) or "/" in stamp["so"]:
        return None
    so = build_dir / stamp["so"]
    try:
        if so.stat().st_size != stamp.get("size"):  # cheap first: a truncation changes the size
            return None
        return so if _sha256_file(so) == stamp.get("sha256") else None
    except OSError:
        return None


def _write_stamp(build_dir: Path, key: _Key, so: Path) -> None:
    stamp = {"module": key.name, "so": so.name, "size": so.stat().st_size, "sha256": _sha256_file(so),
             "base": key.base, "inputs": key.inputs}
    tmp = build_dir / f".{STAMP}.{os.getpid()}.tmp"  # atomic: a reader sees no stamp or a whole one
    tmp.write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, build_dir / STAMP)


def _has_outputs(folder: Path) -> bool:
    return folder.is_dir() and any(p.name == STAMP or p.suffix == ".so" for p in folder.iterdir())


def _find_cached(key: _Key) -> tuple[tuple[str, Path] | None, Path | None]:
    """((module name, .so) of a complete cached build for this key or None, a folder holding a
    build that failed verification or None). Without a compiler the toolchain's part of the key
    is unknown (and nothing could be rebuilt anyway): then the newest stamped build of the same
    torch, sources and flags, whichever compiler made it, is used."""
    build_dir = build_directory(key.name)
    so = _verified_so(build_dir, _read_stamp(build_dir))
    if so is not None:
        return (key.name, so), None
    damaged = build_dir if _has_outputs(build_dir) else None
    if key.toolchain_found:
        return None, damaged
    candidates = []
    for folder in _build_root().glob(key.name.rsplit("_", 1)[0] + "_*"):
        stamp = _read_stamp(folder)
        if stamp is not None and stamp.get("base") == key.base and isinstance(stamp.get("module"), str):
            with contextlib.suppress(OSError):
                candidates.append(((folder / STAMP).stat().st_mtime, folder, stamp))
    for _, folder, stamp in sorted(candidates, key=lambda c: c[0], reverse=True):
        so = _verified_so(folder, stamp)
        if so is not None:
            return (stamp["module"], so), None
        damaged = damaged or folder
    return None, damaged


def _import_extension(name: str, so: Path) -> ModuleType:
    """Import a built extension module from its file (what cpp_extension.load does after ninja)."""
    spec = importlib.util.spec_from_file_location(name, so)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {so} as an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- building --------------------------------------------------------------------------------------

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


# gcc/clang `file:line:col: error: ...` and `fatal error:`, nvcc `file(line): error: ...`, ptxas
# `ptxas fatal   : ...`, the linker's `undefined reference` / `cannot find -l`; ninja's
# `[3/8] <command>` and `FAILED: <target>` lines are not errors (the command alone does not say
# what is wrong).
_ERROR_LINE = re.compile(r"\b(?:error|fatal)\b\s*:|undefined reference|cannot find -l", re.IGNORECASE)


def _compiler_errors(text: str) -> list[str]:
    """The compiler's (or linker's) own error lines in a build log, first seen first, no repeats."""
    found: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("[", "FAILED:", "ninja:")) or not _ERROR_LINE.search(line):
            continue
        if line not in found:
            found.append(line[:300])
    # collect2's "ld returned 1 exit status" only says that the lines before it matter
    return sorted(found, key=lambda line: "ld returned" in line)


def _failure(backend: str, exc: BaseException, log: str = "") -> str:
    """One line: the compiler's first error line (and how many more) when there is one."""
    errors = _compiler_errors(f"{log}\n{exc}")
    if not errors:
        return f"native {backend} extension failed to build ({_one_line(exc)})"
    more = f" (+{len(errors) - 1} more error lines)" if len(errors) > 1 else ""
    return f"native {backend} extension failed to build: {errors[0]}{more}"


@contextlib.contextmanager
def _tee_stdout(log: list[bytes]):
    """Copy what is written to fd 1 into ``log`` while still showing it: a verbose cpp_extension
    build hands fd 1 to ninja, and its exception then carries no output to find the errors in."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 to copy: nothing is shown either
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.close(write_end)

    def pump():
        while chunk := os.read(read_end, 1 << 16):
            os.write(saved, chunk)
            log.append(chunk)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)  # closes the last write end of the pipe: pump() reads EOF
        thread.join(timeout=10)
        os.close(read_end)
        os.close(saved)


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


def _load_args(backend: str) -> dict:
    """cpp_extension.load's arguments besides the name, sources and folder: every flag. The key
    hashes them, so no flag changes without changing the build folder."""
    args = {"extra_include_paths": [str(source_dir())], "with_cuda": backend == "cuda"}
    if backend == "cpu":
        # copies: cpp_extension appends torch's own flags to these lists in place
        return {**args, "extra_cflags": list(CFLAGS), "extra_ldflags": list(LDFLAGS)}
    inc, lib = cublaslt() or ("", "")  # none: _precheck stops the build, the key still needs a value
    libdir = str(Path(lib).parent)
    return {**args,
            # -idirafter: the wheel's include dir also carries CUDA runtime headers; the toolkit's win.
            "extra_cflags": ["-O3", "-DGPTFAST_CUDA", "-idirafter", inc],
            "extra_ldflags": [f"-L{libdir}", f"-l:{Path(lib).name}", f"-Wl,-rpath,{libdir}"],
            # Explicit -gencode flags: cpp_extension then adds none of its own, and
            # TORCH_CUDA_ARCH_LIST is read here without being set for the rest of the process.
            "extra_cuda_cflags": CUDA_CFLAGS + gencode_flags(cuda_arch_list())}


def _compile(backend: str, name: str, build_dir: Path, verbose: bool) -> ModuleType:
    """cpp_extension.load into build_dir (ninja; takes cpp_extension's lock file there)."""
    cpp_extension = _cpp_extension()
    if backend == "cuda":
        # cpp_extension resolved CUDA_HOME when it was imported (it may have picked a wrapper
        # script's folder); point it, and nvcc's children, at the toolkit found here.
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = cuda_home()
    # cpp_extension skips ninja for a name it has already built in this process (its in-memory
    # versioner) and would only re-import: a retry or a repair must run ninja.
    cpp_extension.JIT_EXTENSION_VERSIONER.entries.pop(name, None)
    return cpp_extension.load(name=name, sources=_shimmed_sources(build_dir, backend),
                              build_directory=str(build_dir), verbose=verbose, **_load_args(backend))


class BuildError(RuntimeError):
    """A native extension that can neither be loaded from the cache nor built; one-line message."""


def _clear_outputs(build_dir: Path, everything: bool) -> None:
    """Remove the stamp and the linked .so (ninja would take a damaged .so with its old mtime for
    up to date) or, with ``everything``, all build products. The lock files stay: a process may
    be holding them."""
    for path in build_dir.iterdir():
        if path.name in ("lock", _LOCK):
            continue
        if everything or path.name == STAMP or path.suffix == ".so":
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _rebuild(backend: str, key: _Key, verbose: bool, announce: bool,
             damaged: Path | None) -> tuple[ModuleType, bool]:
    """(module, whether it was compiled now) from the key's folder, building it there
    (``damaged``: a folder whose build failed verification, for the message)."""
    what = f"the cached build in {damaged} is incomplete or damaged and cannot be rebuilt" if damaged else None
    reason = _precheck(backend)
    if reason is not None:
        raise BuildError(f"{what}: {reason}" if what else reason)
    from filelock import FileLock  # a dependency of torch (cpp_extension's own lock uses it)

    build_dir = build_directory(key.name)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(build_dir / _LOCK))
        lock.acquire()
    except OSError as exc:
        raise BuildError(f"{what or f'cannot build in {build_dir}'} ({type(exc).__name__}: {exc})") from None
    # Held from the check to the stamp: without it a second process (another DDP rank) could
    # delete the .so that this one has just linked and not yet stamped.
    try:
        so = _verified_so(build_dir, _read_stamp(build_dir))
        if so is not None:  # built or repaired by another process while this one waited
            return _import_extension(key.name, so), False
        repair = _has_outputs(build_dir)
        if announce and backend == "cuda":  # minutes: say why the first op on a CUDA tensor is slow
            print(f"gptfast: compiling the cuda backend ({key.name}, once, about a minute on 2 cores; "
                  f"`gptfast build --cuda` does it ahead of time)", file=sys.stderr)
        try:
            _clear_outputs(build_dir, everything=False)
        except OSError as exc:
            raise BuildError(f"{what or f'cannot build in {build_dir}'} ({type(exc).__name__}: {exc})") from None
        # A relink first (cheap); if the folder held a damaged build and that fails, its objects
        # may be damaged as well (with their old mtimes too): then once more from scratch.
        for clean in (False, True) if repair else (False,):
            if clean:
                _clear_outputs(build_dir, everything=True)
            log: list[bytes] = []
            try:
                with _tee_stdout(log) if verbose else contextlib.nullcontext():
                    module = _compile(backend, key.name, build_dir, verbose)
                break
            except Exception as exc:  # compiler errors, linker errors, import errors
                if clean or not repair:
                    raise BuildError(_failure(backend, exc, b"".join(log).decode(errors="replace"))) from exc
        _write_stamp(build_dir, key, Path(module.__file__))
        return module, True
    finally:
        lock.release()


def _load_or_build(backend: str, verbose: bool, announce: bool) -> tuple[ModuleType, bool]:
    """(module, whether it was compiled now): the verified cached build, else a (re)build."""
    key = _key(backend)
    cached, damaged = _find_cached(key)
    if cached is not None:
        return _import_extension(*cached), False
    return _rebuild(backend, key, verbose, announce, damaged)


def load(backend: str = "cpu") -> ModuleType:
    """The backend's extension module, built on first call; raises RuntimeError with the reason if
    it cannot be."""
    state = _STATE[_check_backend(backend)]
    if state.module is not None:
        return state.module
    with state.lock:
        if state.module is None and state.error is None:
            try:
                state.module, _ = _load_or_build(backend, verbose=False, announce=True)
            except BuildError as exc:
                state.error = str(exc)
            except Exception as exc:  # no sources, an import error of a verified build, ...
                state.error = f"native {backend} extension failed to load ({_one_line(exc)})"
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
    """Compile (or find, verified, in the cache) and load the backend's extension now; raises
    RuntimeError (:class:`BuildError`) on failure.

    This is what ``gptfast build`` runs; unlike :func:`load` it retries after an earlier failure
    and prints the compiler's output when ``verbose`` (for cuda: ptxas' registers and spills). A
    cached build that does not match its stamp is rebuilt.
    """
    state = _STATE[_check_backend(backend)]
    if state.module is not None:  # already built and imported by this process: nothing to redo
        if verbose:
            print(f"gptfast: native extension {state.module.__name__} ready in 0.0 s (already loaded: "
                  f"{state.module.__file__}); {_describe(state.module)}")
        return state.module
    start = time.perf_counter()
    with state.lock:
        state.module, built = _load_or_build(backend, verbose=verbose, announce=False)
        state.error = None
    if verbose:
        how = "built" if built else "cached build, verified"
        print(f"gptfast: native extension {state.module.__name__} ready in {time.perf_counter() - start:.1f} s "
              f"({how}: {state.module.__file__}); {_describe(state.module)}")
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
