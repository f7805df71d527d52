"""The native-extension build cache (gptfast/_build.py, issue 11 items 3-5).

- a truncated cached .so with its original mtime is detected by its stamp before dlopen (which
  would die of SIGBUS): an op rebuilds it, ``build()`` repairs it, and without a compiler the
  error says so;
- the build folder is keyed on torch (install path included), the compiler, the flags and the
  sources, and the key is the same in every process of one environment;
- a complete cache loads without a compiler or ninja, from a read-only folder, writing nothing;
- a compile error shows the compiler's own ``error:`` line.

The cpu extension is built once for the module (30-60 s on 2 cores) into a temporary
GPTFAST_BUILD_DIR; each test restores or copies that build. Every scenario that could crash runs
in a subprocess, so a signal fails the test instead of killing pytest.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gptfast
from gptfast import _build

REPO = Path(gptfast.__file__).resolve().parent.parent
# Without PATH, CC or CXX pointing anywhere useful: no compiler, no ninja.
NO_TOOLS = {"PATH": "/nonexistent", "CC": "/nonexistent/cc", "CXX": "/nonexistent/c++"}

# Runs an op on the cpu backend and checks it against torch; prints OK and the loaded file.
OP_SCRIPT = """
import sys, torch, gptfast
from gptfast import _build
x = torch.randn(2, 8)
y = gptfast.layer_norm(x, None, None, backend="cpu")
torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,)))
print("OK", _build.load("cpu").__file__)
print("cpp_extension imported:", "torch.utils.cpp_extension" in sys.modules)
"""


def run_python(code: str, build_dir: Path, timeout: float = 600,
               **env_overrides) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter with GPTFAST_BUILD_DIR=build_dir; fails on a signal."""
    env = {k: v for k, v in os.environ.items() if k not in ("GPTFAST_SOURCE_DIR", "CC", "CXX")}
    env.update(GPTFAST_BUILD_DIR=str(build_dir), PYTHONPATH=str(REPO), **env_overrides)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode < 0:  # SIGBUS is what a truncated .so did
        pytest.fail(f"the subprocess died of {signal.Signals(-proc.returncode).name}\n"
                    f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def listing(root: Path) -> list[tuple]:
    """Every folder and file under root with its size and mtime: shows any write, lock file or mkdir."""
    rows = []
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rows.append((path.relative_to(root).as_posix(), stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns))
    return rows


def set_writable(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        os.chmod(path, (mode | stat.S_IWUSR) if writable else (mode & ~0o222))


def truncate_keeping_mtime(path: Path) -> None:
    """What a full disk or an interrupted copy leaves: half the file, the old mtime."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.truncate(st.st_size // 2)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def stamp_matches(folder: Path) -> bool:
    stamp = json.loads((folder / _build.STAMP).read_text())
    so = folder / stamp["so"]
    return so.stat().st_size == stamp["size"] and _build._sha256_file(so) == stamp["sha256"]


class Built:
    """The module's cpu build: ``root`` (GPTFAST_BUILD_DIR) and a pristine copy of it."""

    def __init__(self, root: Path, pristine: Path):
        self.root, self.pristine = root, pristine

    def so(self, root: Path | None = None) -> Path:
        (so,) = (root or self.root).glob("*/*.so")
        return so


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    reason = _build._precheck("cpu")
    if reason is not None:
        pytest.skip(f"the cpu extension cannot be built here: {reason}")
    base = tmp_path_factory.mktemp("build_cache")
    root = base / "root"
    proc = run_python("from gptfast import _build; _build.build(verbose=False, backend='cpu')", root)
    assert proc.returncode == 0, proc.stderr[-5000:]
    shutil.copytree(root, base / "pristine", symlinks=True)  # copy2: mtimes (and the stamp) kept
    return Built(root, base / "pristine")


@pytest.fixture
def cache(built):
    """The build at the path it was built in, as it was right after the build. In place, not a
    copy: ninja's commands name the build folder (the shims), so a relink of a moved folder would
    recompile the kernels."""
    shutil.rmtree(built.root)
    shutil.copytree(built.pristine, built.root, symlinks=True)
    return built


@pytest.fixture
def fresh_state(monkeypatch):
    """No memoised key inputs and no loaded module: as in a new process."""
    monkeypatch.setattr(_build, "_CACHE", {}, raising=False)
    monkeypatch.setattr(_build, "_STATE", {b: _build._State() for b in _build.BACKENDS})


# --- (a) a truncated .so with its original mtime -------------------------------------------------

@pytest.mark.slow
def test_truncated_so_is_rebuilt_by_an_op_not_dlopened(cache):
    so = cache.so()
    truncate_keeping_mtime(so)
    proc = run_python(OP_SCRIPT, cache.root)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert proc.stdout.startswith(f"OK {so}")
    assert stamp_matches(so.parent)


@pytest.mark.slow
def test_build_repairs_a_truncated_so(cache):
    so = cache.so()
    truncate_keeping_mtime(so)
    proc = run_python("from gptfast import _build; _build.build(verbose=True, backend='cpu')\n" + OP_SCRIPT,
                      cache.root)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "ready in" in proc.stdout and "built" in proc.stdout
    assert f"OK {so}" in proc.stdout
    assert stamp_matches(so.parent)


@pytest.mark.slow
def test_truncated_so_without_compiler_is_a_clear_error(built, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(built.pristine, root, symlinks=True)
    truncate_keeping_mtime(built.so(root))
    # `gptfast info` used to die of SIGBUS here; now the cpu rows say why the backend is missing
    proc = run_python("from gptfast.cli import main; main(['info'])", root, **NO_TOOLS)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "is incomplete or damaged and cannot be rebuilt: no C++ compiler" in proc.stdout
    proc = run_python("from gptfast import _build; _build.build(verbose=False, backend='cpu')", root, **NO_TOOLS)
    assert proc.returncode == 1
    assert "cannot be rebuilt: no C++ compiler" in proc.stderr.splitlines()[-1]


# --- (b) the key: everything that changes the binary, nothing that changes per process -----------

def test_key_covers_torch_compiler_flags_and_sources(tmp_path, monkeypatch, fresh_state):
    monkeypatch.setenv("GPTFAST_BUILD_DIR", str(tmp_path / "root"))
    monkeypatch.delenv("GPTFAST_SOURCE_DIR", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    if shutil.which("c++") is None:
        pytest.skip("no c++ on PATH")

    def folder():
        monkeypatch.setattr(_build, "_CACHE", {}, raising=False)  # a new process, as far as the key goes
        return _build.build_directory(_build.extension_name("cpu"))

    here = folder()
    assert here.parent == tmp_path / "root" and here.name.isidentifier()
    assert here.name.startswith("gptfast_C_torch")
    assert folder() == here

    seen = {here}
    with monkeypatch.context() as m:  # a second virtualenv with the same torch version
        m.setattr(torch, "__file__", str(tmp_path / "venv2" / "torch" / "__init__.py"))
        seen.add(folder())
    with monkeypatch.context() as m:  # another compiler (the same g++ behind another path)
        wrapper = tmp_path / "bin" / "c++"
        wrapper.parent.mkdir()
        wrapper.write_text('#!/bin/sh\nexec c++ "$@"\n')
        wrapper.chmod(0o755)
        m.setenv("CXX", str(wrapper))
        seen.add(folder())
    with monkeypatch.context() as m:
        m.setattr(_build, "CFLAGS", _build.CFLAGS + ["-g"])
        seen.add(folder())
    with monkeypatch.context() as m:  # a header edited (headers reach the binary too)
        src = tmp_path / "csrc"
        shutil.copytree(_build.source_dir(), src)
        header = src / "common" / "checks.h"
        header.write_text(header.read_text() + "\n// edited\n")
        m.setenv("GPTFAST_SOURCE_DIR", str(src))
        seen.add(folder())
    assert len(seen) == 5, seen
    assert folder() == here
    assert not (tmp_path / "root").exists(), "computing the key must not create folders"

    # cuda: the arch list is part of its key, and its name never collides with the cpu build's
    cuda = _build.extension_name("cuda")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    monkeypatch.setattr(_build, "_CACHE", {}, raising=False)
    assert _build.extension_name("cuda") != cuda and cuda.startswith("gptfast_cuda_torch")


def test_key_is_the_same_in_every_process(tmp_path, monkeypatch, fresh_state):
    root = tmp_path / "root"
    monkeypatch.setenv("GPTFAST_BUILD_DIR", str(root))
    monkeypatch.delenv("GPTFAST_SOURCE_DIR", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    code = ("from gptfast import _build; "
            "print(_build.build_directory(_build.extension_name('cpu')), _build.extension_name('cuda'))")
    outs = [run_python(code, root).stdout.split() for _ in range(2)]
    assert outs[0] == outs[1]
    assert outs[0] == [str(_build.build_directory(_build.extension_name("cpu"))), _build.extension_name("cuda")]


# --- (c) a complete cache needs no compiler, no ninja and no write -------------------------------

@pytest.mark.slow
def test_cached_build_loads_read_only_without_compiler_or_ninja(built, tmp_path):
    root = tmp_path / "prebuilt"
    shutil.copytree(built.pristine, root, symlinks=True)  # moved: the load must not care
    before = listing(root)
    set_writable(root, False)
    try:
        # no compiler at all: the toolchain part of the key is unknown, the stamped build is used
        proc = run_python(OP_SCRIPT, root, **NO_TOOLS)
        assert proc.returncode == 0, proc.stderr[-5000:]
        assert proc.stdout.startswith(f"OK {built.so(root)}")
        assert "cpp_extension imported: False" in proc.stdout
        # the compiler there, the folder read-only: the exact key, still no ninja and no lock file
        proc = run_python(OP_SCRIPT, root)
        assert proc.returncode == 0, proc.stderr[-5000:]
        assert proc.stdout.startswith(f"OK {built.so(root)}")
        assert "cpp_extension imported: False" in proc.stdout
    finally:
        set_writable(root, True)
    # root ignores the read-only bits: check that nothing was written, created or locked
    assert listing(root) == before


# --- (d) a compile error shows the compiler's error line -----------------------------------------

def test_compiler_error_lines_are_picked_from_the_build_log():
    log = textwrap.dedent("""\
        [1/3] c++ -MMD -MF a.o.d -Werror=return-type -c /src/csrc/error_handling.cpp -o a.o
        FAILED: a.o
        c++ -MMD -MF a.o.d -c /src/csrc/a.cpp -o a.o
        In file included from /src/csrc/a.cpp:2:
        /src/csrc/common/backend.h:10:1: error: 'oops' does not name a type
           10 | oops;
        /src/csrc/cuda/a.cu(12): error: identifier "bar" is undefined
        ptxas fatal   : Unresolved extern function 'baz'
        collect2: error: ld returned 1 exit status
        /usr/bin/ld: a.o: in function `f': undefined reference to `qux'
        /src/csrc/common/backend.h:10:1: error: 'oops' does not name a type
        ninja: build stopped: subcommand failed.
        """)
    assert _build._compiler_errors(log) == [
        "/src/csrc/common/backend.h:10:1: error: 'oops' does not name a type",
        '/src/csrc/cuda/a.cu(12): error: identifier "bar" is undefined',
        "ptxas fatal   : Unresolved extern function 'baz'",
        "/usr/bin/ld: a.o: in function `f': undefined reference to `qux'",
        "collect2: error: ld returned 1 exit status",  # last: it only says that the others matter
    ]
    exc = RuntimeError(f"Error building extension 'gptfast_C_x': {log}")
    assert _build._failure("cpu", exc) == ("native cpu extension failed to build: /src/csrc/common/backend.h:10:1: "
                                           "error: 'oops' does not name a type (+4 more error lines)")
    # no compiler line (an import error after linking): the exception's own first line
    assert _build._failure("cpu", ImportError("x.so: undefined symbol: foo")) == \
        "native cpu extension failed to build (ImportError: x.so: undefined symbol: foo)"


def mutated_sources(tmp_path: Path, name: str, text: str) -> Path:
    """A copy of csrc/ with ``text`` inserted at the top of common/backend.h, which every
    translation unit includes (the first one compiled fails)."""
    src = tmp_path / name
    shutil.copytree(_build.source_dir(), src)
    header = src / "common" / "backend.h"
    header.write_text(header.read_text().replace("#pragma once\n", f"#pragma once\n{text}\n", 1))
    return src


@pytest.mark.slow
def test_compile_error_shows_the_compilers_error_line(tmp_path):
    if _build._precheck("cpu") is not None:
        pytest.skip(f"the cpu extension cannot be built here: {_build._precheck('cpu')}")
    # unavailable_reason (what `gptfast info` and auto show): cpp_extension's exception text
    # holds the build log. A syntax error: the compiler parses the whole unit (~25 s, MAX_JOBS=1).
    src = mutated_sources(tmp_path, "syntax_error", "gptfast_injected_syntax_error;")
    code = 'from gptfast import _build; print("REASON:", _build.unavailable_reason("cpu"))'
    proc = run_python(code, tmp_path / "root", GPTFAST_SOURCE_DIR=str(src), MAX_JOBS="1")
    assert proc.returncode == 0, proc.stderr[-5000:]
    (reason,) = [line for line in proc.stdout.splitlines() if line.startswith("REASON:")]
    assert "failed to build: " in reason and "error:" in reason, reason
    assert re.search(r"backend\.h:\d+:\d+: error: .gptfast_injected_syntax_error. does not name a type", reason), reason

    # build(verbose=True) (`gptfast build`): the log went to stdout, not into the exception. A
    # missing header stops the compiler at once.
    src = mutated_sources(tmp_path, "fatal_error", '#include "gptfast_injected_missing.h"')
    code = """
    from gptfast import _build
    try:
        _build.build(verbose=True, backend="cpu")
    except RuntimeError as e:
        print("BUILD:", e)
    """
    proc = run_python(code, tmp_path / "root", GPTFAST_SOURCE_DIR=str(src), MAX_JOBS="1")
    assert proc.returncode == 0, proc.stderr[-5000:]
    lines = proc.stdout.splitlines()
    (raised,) = [line for line in lines if line.startswith("BUILD:")]
    assert "failed to build: " in raised and "backend.h" in raised, raised
    assert "fatal error: gptfast_injected_missing.h: No such file or directory" in raised, raised
    # and the compiler's output itself was still shown
    assert any("fatal error:" in line and not line.startswith("BUILD:") for line in lines)
