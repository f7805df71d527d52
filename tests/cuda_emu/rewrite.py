"""Copy csrc/cuda kernel sources into a build directory, rewritten for the CPU emulation.

    python rewrite.py SRC_DIR DST_DIR        (SRC_DIR: csrc/cuda)

What is rewritten (everything else compiles unchanged against include/emu_shim.h):
- inline PTX: mma.sync m16n8k16 -> emu_mma, ldmatrix (x2/x4, .trans) -> emu_ldmatrix,
  cp.async(.commit_group/.wait_group) -> emu_cp_*, ex2.approx -> emu_ex2; any other asm statement
  is an error (the emulator would not know it);
- `extern __shared__` -> the emulated block's dynamic shared memory; `__shared__ T a[N]` (and
  [N][M]) -> checked arrays in the block's static shared memory; `float* sName` (shared-memory
  float views, named s* by convention) and helper parameters that receive a static array ->
  checked pointers;
- 32-bit loads/stores through reinterpret_cast<uint32_t*> and 16-byte ones through
  reinterpret_cast<uint4*> -> checked accesses (race detector for shared memory, bounds and
  alignment for global memory);
- `#include "cuda/x.h"` (paths relative to csrc/) -> `#include "x.h"`: the copies sit side by side;
- `kernel<<<cfg>>>(args)` -> emu_launch_impl("kernel", kernel, EmuCfg(cfg), args).
Line numbers are preserved, so the emulator's findings point at csrc/cuda lines.
A pattern that no longer matches raises RewriteError: update this script with the kernel.
"""
import re
import sys
from pathlib import Path

# Inputs of each emulated library: the .cu file and the headers it includes from csrc/cuda.
SOURCES = {
    "attention": ["attention.cu", "attention.h", "common.cuh", "static_switch.h", "types.h"],
    "layer_norm": ["layer_norm.cu", "layer_norm.h", "norm.cuh", "common.cuh", "static_switch.h", "types.h"],
    "rms_norm": ["rms_norm.cu", "rms_norm.h", "norm.cuh", "common.cuh", "static_switch.h", "types.h"],
    "linear_cross_entropy": ["linear_cross_entropy.cu", "linear_cross_entropy.h", "common.cuh", "static_switch.h",
                             "types.h"],
    "gelu_ffn": ["gelu_ffn.cu", "gelu_ffn.h", "ffn_common.cuh", "common.cuh", "static_switch.h", "types.h"],
    "gated_ffn": ["gated_ffn.cu", "gated_ffn.h", "gelu_ffn.h", "ffn_common.cuh", "common.cuh", "static_switch.h",
                  "types.h"],
}
# Helpers that record their call-site line (emu_site) for the emulator's findings.
SITE_HELPERS = ["load_a", "load_a_trans", "load_b_rows", "load_b_cols", "load_tile", "load_row_stats", "load_vec",
                "store_vec"]


class RewriteError(RuntimeError):
    pass


def _keep_lines(old, new):
    n = old.count("\n") - new.count("\n")
    if n < 0:
        raise RewriteError(f"replacement adds lines: {old!r} -> {new!r}")
    return new + "\n" * n


def _sub(pat, repl, s, what, count=None, flags=re.S):
    """re.sub keeping line numbers; `count` None: at least one match, else exactly `count`."""
    new, n = re.subn(pat, lambda m: _keep_lines(m.group(0), repl(m) if callable(repl) else m.expand(repl)), s,
                     flags=flags)
    if (count is None and n == 0) or (count is not None and n != count):
        raise RewriteError(f"{what}: pattern matched {n} times, expected {count or '>= 1'}; "
                           "the kernel source changed, update tests/cuda_emu/rewrite.py")
    return new


def rewrite_common(s):
    s = _sub(r'asm\("ex2\.approx\.ftz\.f32 %0, %1;" : "=f"\(y\) : "f"\(x\)\);', "y = emu_ex2(x);", s, "ex2.approx",
             count=1)
    return s


def rewrite_cu(s):
    nlines = s.count("\n")
    # Inline PTX.
    if "mma.sync" in s:
        s = _sub(r'asm\("mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.f16\.f16\.f32.*?\);', "emu_mma<false>(d, a, b);",
                 s, "mma f16", count=1)
        s = _sub(r'asm\("mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32.*?\);', "emu_mma<true>(d, a, b);",
                 s, "mma bf16", count=1)
    if "ldmatrix" in s:
        for x, trans in (("x4", False), ("x4", True), ("x2", False), ("x2", True)):
            name = f"ldmatrix {x}{'.trans' if trans else ''}"
            s = _sub(r'asm volatile\("ldmatrix\.sync\.aligned\.m8n8\.' + x + (r"\.trans" if trans else "")
                     + r'\.shared\.b16 .*?\);', f"(void)addr; emu_ldmatrix<{x[1]}, {str(trans).lower()}>(r, row);",
                     s, name, count=1)
    if "cp.async" in s:
        s = _sub(r'asm volatile\("cp\.async\.cg\.shared\.global \[%0\], \[%1\], 16, %2;\\n" ::"r"\(dst\), '
                 r'"l"\(gmem\), "r"\(src_bytes\)\);', "(void)dst; emu_cp_async(smem, gmem, src_bytes);", s,
                 "cp.async", count=1)
        s = _sub(r'asm volatile\("cp\.async\.commit_group;\\n" ::\);', "emu_cp_commit();", s, "commit_group", count=1)
        s = _sub(r'asm volatile\("cp\.async\.wait_group %0;\\n" ::"n"\(N\)\);', "emu_cp_wait(N);", s, "wait_group",
                 count=1)
    code = re.sub(r"//[^\n]*", "", s)
    if re.search(r"\basm\b", code):
        raise RewriteError("an inline asm statement the emulator does not know: extend rewrite.py and emu_shim.h")

    # Shared memory.
    s = re.sub(r"extern __shared__ (?:__align__\(\d+\) )?unsigned char (\w+)\[\];",
               r"unsigned char* \1 = emu_smem();", s)
    static_names = set()  # (element type, name)

    def static2(m):
        static_names.add((m.group(1), m.group(2)))
        return f"EmuShArr2<{m.group(1)}, ({m.group(3)}), ({m.group(4)})> {m.group(2)}(__LINE__);"

    def static1(m):
        static_names.add((m.group(1), m.group(2)))
        return f"EmuShArr<{m.group(1)}, ({m.group(3)})> {m.group(2)}(__LINE__);"

    s = re.sub(r"__shared__ (\w+) (\w+)\[([^\]]+)\]\[([^\]]+)\];", static2, s)
    s = re.sub(r"__shared__ (\w+) (\w+)\[([^\]]+)\];", static1, s)
    if "__shared__" in re.sub(r"//[^\n]*", "", s):
        raise RewriteError("a __shared__ declaration rewrite.py does not understand")
    for ty, name in sorted(static_names):  # helper parameters receiving the array: `float* red`
        s = re.sub(rf"\b{ty}\* {name}\b", f"EmuShPtr<{ty}> {name}", s)
    s = re.sub(r"\bfloat\* (s[A-Z]\w*)\b", r"EmuShPtr<float> \1", s)  # float views of dynamic smem

    # 32-bit loads and stores through reinterpret_cast.
    s = re.sub(r"\*reinterpret_cast<const uint32_t\*>\(([^;]*?)\);", r"emu_ld32(\1);", s)
    s = re.sub(r"\*reinterpret_cast<uint32_t\*>\(([^;]*?)\) = ", r"emu_st32(\1, __LINE__) = ", s)
    s = re.sub(r"\*reinterpret_cast<const uint4\*>\(([^;]*?)\);", r"emu_ld128(\1);", s)
    s = re.sub(r"\*reinterpret_cast<uint4\*>\(([^;]*?)\) = ", r"emu_st128(\1, __LINE__) = ", s)
    if re.search(r"reinterpret_cast<(?:const )?uint4\*>", re.sub(r"//[^\n]*", "", s)):
        raise RewriteError("a 16-byte access rewrite.py does not understand")
    for fn in SITE_HELPERS:
        if f"void {fn}(" in s:
            s = _sub(r"(void " + fn + r"\(.*?)\) \{", r"\1, int emu_line = __builtin_LINE()) { emu_site = emu_line;",
                     s, fn, count=1)

    # Launches.
    def launch(m):
        line = s.count("\n", 0, m.start()) + 1
        return _keep_lines(m.group(0), f'emu_launch_impl("{m.group(1)} (line {line})", {m.group(1)}, '
                                       f"EmuCfg({m.group(2)}), {m.group(3)});")

    s = re.sub(r"([\w:]+(?:<[\w, ]*>)?)\s*<<<(.+?)>>>\((.*?)\);", launch, s, flags=re.S)
    if "<<<" in s:
        raise RewriteError("a kernel launch rewrite.py does not understand")
    if s.count("\n") != nlines:
        raise RewriteError("line numbers changed")
    return s


def rewrite_includes(s):
    """`#include "cuda/x"` -> `#include "x"` (the rewritten copies of one library share a directory)."""
    return re.sub(r'^#include "cuda/([\w.]+)"', r'#include "\1"', s, flags=re.M)


def rewrite(src_dir, dst_dir, lib):
    """Writes the rewritten sources of `lib` (a key of SOURCES) into dst_dir; returns the .cu path."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in SOURCES[lib]:
        text = rewrite_includes((src_dir / name).read_text())
        if name == "common.cuh":
            text = rewrite_common(text)
        elif name.endswith((".cu", ".cuh")):  # norm.cuh, ffn_common.cuh: kernels and launches shared by two .cu files
            text = rewrite_cu(text)
        (dst_dir / name).write_text(text)
    return dst_dir / SOURCES[lib][0]


if __name__ == "__main__":
    for lib in SOURCES:
        print(rewrite(sys.argv[1], Path(sys.argv[2]) / lib, lib))
