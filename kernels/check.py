"""Ahead-of-time compile check for the Triton kernels: no GPU needed.

    python -m gptfast.kernels.check --arch 90        # H100/H200
    python -m gptfast.kernels.check --arch 80 90     # both

Compiles every kernel in every autotune config it can select on the target (the same pruning the
autotuner applies at run time), with the pointer/stride specialisations the JIT would see for
typical shapes (16-byte aligned pointers and strides, unit inner strides), and prints one row per
compile: shared memory, registers and stack (from ``cuobjdump --dump-resource-usage`` on the
cubin; "n/a" if cuobjdump is missing), and the tensor-core instruction found in the PTX
(``wgmma`` on sm_90, ``mma`` on sm_80). Exits non-zero when a config needs more shared memory than
the chip has, or when an attention/matmul kernel on sm_90 has no ``wgmma`` for fp16/bf16.

Triton's on-disk cache (~/.triton/cache) makes reruns fast; the first run compiles everything.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter replaces kernels with Python callables that cannot be compiled.
    raise SystemExit("gptfast.kernels.check: unset TRITON_INTERPRET (AOT compilation needs real kernels)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gptfast.kernels import attention as _att  # noqa: E402
from gptfast.kernels import gated_ffn as _gffn  # noqa: E402
from gptfast.kernels import gelu_ffn as _ffn  # noqa: E402
from gptfast.kernels import _reduce  # noqa: E402
from gptfast.kernels import layer_norm as _ln  # noqa: E402
from gptfast.kernels import linear_cross_entropy as _lce  # noqa: E402
from gptfast.kernels import rms_norm as _rms  # noqa: E402

SMEM_BYTES = {80: 163 * 1024, 90: 227 * 1024}
DT = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass
class Job:
    kernel: str  # display name
    fn: object  # JITFunction
    signature: dict  # name -> type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict  # name -> value
    num_warps: int
    num_stages: int
    label: str  # config shown in the table
    needs_tc: bool  # must use tensor cores (wgmma on sm_90)
    aligned: list = field(default_factory=list)  # args hinted 16-divisible


def _jit(fn):
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    return fn


def _sig(fn, types: dict, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else types[name]
    return sig


def _attention_jobs(arch: int) -> list[Job]:
    jobs = []
    shapes = [(64, "fp16"), (128, "fp16"), (256, "fp16"), (40, "fp16"), (128, "bf16"), (64, "fp32")]
    for head_dim, dt in shapes:
        block_d = _att._block_d(head_dim)
        esize = DT[dt]
        # fp16 at the power-of-two dims gets every config; the others one config each (layout
        # variants of code already covered), to keep the check to a couple of minutes.
        all_cfg = dt == "fp16" and head_dim == block_d
        prec = "ieee" if dt == "fp32" else "tf32"
        strides = lambda pre: [f"stride_{pre}{s}" for s in ("b", "t", "h")]  # noqa: E731
        # Each kernel in its plain causal form (every config it may select; GROUP = 1 is a
        # constexpr there, as the JIT specialises an int argument equal to 1) and, on the first
        # config, with every option on (a two-sided window, softcap, ALiBi, dropout: the
        # constexpr variants; GQA group, window sides and lengths are runtime arguments), dense
        # and packed (varlen: per-sequence lengths and row offsets read from cu_seqlens).
        off = dict(HAS_LEFT=False, HAS_RIGHT=True, HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_DROPOUT=False,
                   GROUP=1, IS_VARLEN=False)
        on = dict(HAS_LEFT=True, HAS_RIGHT=True, HAS_SOFTCAP=True, HAS_ALIBI=True, HAS_DROPOUT=True,
                  IS_VARLEN=False)
        on_varlen = dict(on, IS_VARLEN=True)
        scalars = dict(Alibi="*fp32", Cu_q="*i32", Cu_k="*i32", stride_ab="i32", Tq="i32", Tk="i32", H="i32",
                       GROUP="i32", left="i32",
                       right="i32", qk_scale="fp32", softmax_scale="fp32", softcap_scale="fp32",
                       softcap2="fp32", Rng="*i64", threshold="i64", drop_scale="fp32",
                       T_BUCKET="i32", TK_BUCKET="i32")

        def variants(cfgs):
            picked = cfgs if all_cfg else cfgs[:1]
            return [(c, off, "") for c in picked] + [(cfgs[0], on, " +opts"), (cfgs[0], on_varlen, " +opts varlen")]

        # forward
        fn = _jit(_att._attention_fwd_kernel)
        for c, flags, tag in variants(_att.fwd_configs(arch, block_d, esize)):
            ce = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, EVEN_D=head_dim == block_d, DOT_PREC=prec,
                      **flags, **c.kwargs)
            types = {n: f"*{dt}" for n in ("Q", "K", "V", "Out")}
            types.update(Lse="*fp32", **scalars)
            for p in ("q", "k", "v", "o"):
                types.update({s: "i32" for s in strides(p)})
            jobs.append(Job("attn_fwd", fn, _sig(fn, types, ce), ce, c.num_warps, c.num_stages,
                            f"{dt} d={head_dim} M{c.kwargs['BLOCK_M']} N{c.kwargs['BLOCK_N']} "
                            f"w{c.num_warps} s{c.num_stages}{tag}", dt != "fp32",
                            ["Q", "K", "V", "Out", "Lse", "Cu_q", "Cu_k"] + sum((strides(p) for p in "qkvo"), [])))
        # backward dK/dV and dQ
        cfgs = _att.bwd_configs(arch, block_d, esize)
        for kern, name in ((_att._attention_bwd_dkdv_kernel, "attn_bwd_dkdv"),
                           (_att._attention_bwd_dq_kernel, "attn_bwd_dq")):
            fn = _jit(kern)
            for c, flags, tag in variants(cfgs):
                ce = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PREC=prec, **flags, **c.kwargs)
                types = {n: f"*{dt}" for n in ("Q", "K", "V", "DO", "DK", "DV", "DQ")}
                types.update(Lse="*fp32", Delta="*fp32", **scalars)
                for p in ("q", "k", "v", "do", "g"):
                    types.update({s: "i32" for s in strides(p)})
                ptrs = [n for n in fn.arg_names if n[0].isupper() and n not in ce]
                jobs.append(Job(name, fn, _sig(fn, types, ce), ce, c.num_warps, c.num_stages,
                                f"{dt} d={head_dim} M{c.kwargs['BLOCK_M']} N{c.kwargs['BLOCK_N']} "
                                f"w{c.num_warps} s{c.num_stages}{tag}", dt != "fp32",
                                ptrs + sum((strides(p) for p in ("q", "k", "v", "do", "g")), [])))
        if dt == "fp16":
            fn = _jit(_att._attention_bwd_preprocess_kernel)
            bm = max(16, min(128, 2048 // block_d))
            ce = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=bm)
            types = {"Out": "*fp16", "DO": "*fp16", "Delta": "*fp32", "T": "i32", "H": "i32"}
            types.update({s: "i32" for s in strides("o") + strides("do")})
            jobs.append(Job("attn_bwd_pre", fn, _sig(fn, types, ce), ce, 4, 1, f"fp16 d={head_dim} M{bm}",
                            False, ["Out", "DO", "Delta"]))
    return jobs


def _layer_norm_jobs(arch: int) -> list[Job]:
    jobs = []
    # each width plain and with the fused residual add (+res: HAS_RESIDUAL / HAS_DRESIDUAL)
    for n, res in [(n, res) for n in (1024, 8192, 65536) for res in (False, True)]:
        block, one_tile, warps = _ln._settings(n)
        tag = " +res" if res else ""
        fn = _jit(_ln._layer_norm_fwd_kernel)
        ce = dict(HAS_WEIGHT=True, HAS_BIAS=True, HAS_RESIDUAL=res, BLOCK_N=block, ONE_TILE=one_tile)
        types = {n_: "*bf16" for n_ in ("X", "Y", "W", "B", "R", "S")}
        types.update(Mean="*fp32", Rstd="*fp32", stride_x="i32", stride_y="i32", stride_r="i32", stride_s="i32",
                     N="i32", eps="fp32")
        jobs.append(Job("ln_fwd", fn, _sig(fn, types, ce), ce, warps, 1, f"bf16 N={n} w{warps}{tag}", False,
                        ["X", "Y", "W", "B", "Mean", "Rstd", "R", "S", "stride_x", "stride_y", "stride_r",
                         "stride_s"]))
        fn = _jit(_ln._layer_norm_bwd_kernel)
        ce = dict(HAS_WEIGHT=True, HAS_DBIAS=True, HAS_DRESIDUAL=res, BLOCK_N=block, ONE_TILE=one_tile)
        types = {n_: "*bf16" for n_ in ("X", "W", "DY", "DX", "DRES")}
        types.update({n_: "*fp32" for n_ in ("Mean", "Rstd", "DW_partial", "DB_partial")})
        types.update(stride_x="i32", stride_dy="i32", stride_dx="i32", stride_dres="i32", M="i32", N="i32",
                     rows_per_program="i32")
        jobs.append(Job("ln_bwd", fn, _sig(fn, types, ce), ce, warps, 1, f"bf16 N={n} w{warps}{tag}", False,
                        ["X", "W", "DY", "DX", "Mean", "Rstd", "DW_partial", "DB_partial", "DRES"]))
    fn = _jit(_reduce._colsum_kernel)  # dW/dB partials of LayerNorm, db1/db2 of GELU-FFN
    ce = dict(BLOCK_R=32, BLOCK_N=128)
    jobs.append(Job("colsum", fn, _sig(fn, {"X": "*fp32", "Out": "*bf16", "R": "i32", "N": "i32",
                                            "stride_r": "i32"}, ce), ce, 4, 1, "R32 N128", False, ["X", "Out"]))
    return jobs


def _rms_norm_jobs(arch: int) -> list[Job]:
    jobs = []
    # each width with weight, plain and with the fused residual add (+res); the narrowest and the
    # chunked widest also without weight (-w). The dW partials' colsum is in _layer_norm_jobs.
    variants = [(n, res, True) for n in (1024, 8192, 65536) for res in (False, True)]
    variants += [(1024, True, False), (65536, True, False)]
    for n, res, weight in variants:
        block, one_tile, warps = _ln._settings(n)
        tag = (" +res" if res else "") + ("" if weight else " -w")
        fn = _jit(_rms._rms_norm_fwd_kernel)
        ce = dict(HAS_WEIGHT=weight, HAS_RESIDUAL=res, BLOCK_N=block, ONE_TILE=one_tile)
        types = {n_: "*bf16" for n_ in ("X", "Y", "W", "R", "S")}
        types.update(Rstd="*fp32", stride_x="i32", stride_y="i32", stride_r="i32", stride_s="i32",
                     N="i32", eps="fp32", offset="fp32")
        jobs.append(Job("rms_fwd", fn, _sig(fn, types, ce), ce, warps, 1, f"bf16 N={n} w{warps}{tag}", False,
                        ["X", "Y", "W", "Rstd", "R", "S", "stride_x", "stride_y", "stride_r", "stride_s"]))
        fn = _jit(_rms._rms_norm_bwd_kernel)
        ce = dict(HAS_WEIGHT=weight, HAS_DRESIDUAL=res, BLOCK_N=block, ONE_TILE=one_tile)
        types = {n_: "*bf16" for n_ in ("X", "W", "DY", "DX", "DRES")}
        types.update(Rstd="*fp32", DW_partial="*fp32", stride_x="i32", stride_dy="i32", stride_dx="i32",
                     stride_dres="i32", M="i32", N="i32", offset="fp32", rows_per_program="i32")
        jobs.append(Job("rms_bwd", fn, _sig(fn, types, ce), ce, warps, 1, f"bf16 N={n} w{warps}{tag}", False,
                        ["X", "W", "DY", "DX", "Rstd", "DW_partial", "DRES"]))
    return jobs


def _lce_jobs(arch: int) -> list[Job]:
    # the logits epilogue at GPT-2's and Llama-3's vocabularies (both tiled at MAX_BLOCK_V) and a
    # one-tile one; loss only, gradient, and gradient with softcap and smoothing (Gemma-2)
    jobs = []
    fn = _jit(_lce._ce_logits_kernel)
    for v, scale, softcap, smooth in ((50304, False, False, False), (50304, True, False, False),
                                      (128256, True, True, True), (1000, True, False, True)):
        block, warps = _lce.settings(v)
        ce = dict(HAS_SCALE=scale, HAS_SOFTCAP=softcap, HAS_SMOOTHING=smooth, BLOCK_V=block)
        types = dict(Z="*fp32", T="*i64", Scale="*fp32", Loss="*fp32", stride_z="i32", V="i32", ignore_index="i32",
                     eps="fp32", softcap="fp32")
        tag = ("+grad" if scale else "loss") + (" softcap" if softcap else "") + (" smooth" if smooth else "")
        jobs.append(Job("lce_logits", fn, _sig(fn, types, ce), ce, warps, 1, f"fp32 V={v} w{warps} {tag}", False,
                        ["Z", "T", "Scale", "Loss", "stride_z"]))
    return jobs


def _ffn_jobs(arch: int) -> list[Job]:
    jobs = []
    fn = _jit(_ffn._ffn_matmul_kernel)
    # (display, dtype, epilogue, b_gelu, colsum, has_bias, unit strides): the forward's first
    # matmul (x @ w1.T, row-major A, B = w1.T has unit K stride), the backward's dh (dout @ w2:
    # B has unit N stride) and dw2 (dout.T @ GELU(h): A has unit M stride, GELU prologue on B).
    variants = [
        ("fwd_gelu", "fp16", 1, False, False, True, ("stride_ak", "stride_bk", "stride_cn", "stride_xn")),
        ("fwd_gelu", "bf16", 1, False, False, True, ("stride_ak", "stride_bk", "stride_cn", "stride_xn")),
        ("bwd_dh", "fp16", 2, False, True, False, ("stride_ak", "stride_bn", "stride_cn", "stride_xn")),
        ("bwd_dw2", "fp16", 0, True, False, False, ("stride_am", "stride_bn", "stride_cn", "stride_xn")),
        ("fwd_gelu", "fp32", 1, False, False, True, ("stride_ak", "stride_bk", "stride_cn", "stride_xn")),
    ]
    for i, (name, dt, epi, b_gelu, colsum, bias, units) in enumerate(variants):
        cfgs = _ffn.matmul_configs(arch, DT[dt])
        for c in (cfgs if i == 0 else cfgs[:1]):
            ce = dict(HAS_BIAS=bias, EPILOGUE=epi, B_GELU=b_gelu, COLSUM=colsum, APPROX_TANH=True,
                      DOT_PREC="ieee" if dt == "fp32" else "tf32", EVEN_K=True, **c.kwargs)
            ce.update({u: 1 for u in units})  # the JIT specialises unit strides the same way
            types = {n: f"*{dt}" for n in ("A", "B", "C", "Bias", "Aux")}
            types.update(ColSum="*fp32", M="i32", N="i32", K="i32")
            types.update({s: "i32" for s in ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm",
                                            "stride_cn", "stride_xm", "stride_xn")})
            aligned = ["A", "B", "C", "Bias", "Aux", "ColSum", "M", "N", "K"] + \
                [s for s in ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_xm")
                 if s not in units]
            kw = c.kwargs
            jobs.append(Job(f"ffn_mm_{name}", fn, _sig(fn, types, ce), ce, c.num_warps, c.num_stages,
                            f"{dt} {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{c.num_warps} s{c.num_stages}",
                            dt != "fp32", aligned))
    return jobs


def _gated_ffn_jobs(arch: int) -> list[Job]:
    jobs = []
    fn = _jit(_gffn._gated_ffn_matmul_kernel)
    strides = ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_b2k", "stride_b2n", "stride_cm",
               "stride_cn", "stride_xm", "stride_xn", "stride_x2m", "stride_x2n")
    # (display, mode, activation, unit strides): the forward (x, w_gate.T, w_up.T: unit K strides),
    # da with the dgate epilogue (dout, w_down: unit N stride; g, u aux), dw_down (dout.T: unit M
    # stride; g, u B tiles with act(g) * u), dw_gate/dw_up (dg.T, du.T against x) and dx (dg, du
    # against w_gate, w_up). Unused pointers are the output, so their strides are C's.
    modes = [
        ("fwd", 1, 0, ("stride_ak", "stride_bk", "stride_b2k", "stride_cn", "stride_xn", "stride_x2n")),
        ("bwd_da", 2, 1, ("stride_ak", "stride_bn", "stride_b2n", "stride_cn", "stride_xn", "stride_x2n")),
        ("bwd_dwd", 0, 2, ("stride_am", "stride_bn", "stride_b2n", "stride_cn", "stride_xn", "stride_x2n")),
        ("bwd_dwgu", 4, 0, ("stride_am", "stride_bn", "stride_b2n", "stride_cn", "stride_xn", "stride_x2n")),
        ("bwd_dx", 3, 0, ("stride_ak", "stride_bn", "stride_b2n", "stride_cn", "stride_xn", "stride_x2n")),
    ]
    # fp16 and fp32: every config of every mode; bf16: the forward's first
    variants = [(m, dt, True) for dt in ("fp16", "fp32") for m in modes]
    variants += [(modes[0], "bf16", False)]
    for (name, mode, act, units), dt, every in variants:
        cfgs = _gffn.matmul_configs(arch, DT[dt], mode)
        for c in (cfgs if every else cfgs[:1]):
            ce = dict(MODE=mode, HAS_BIAS=mode == 1, HAS_BIAS2=mode == 1, COLSUM=mode == 2, COLSUM2=mode == 2,
                      ACT=act, DOT_PREC="ieee" if dt == "fp32" else "tf32", EVEN_K=True, **c.kwargs)
            ce.update({u: 1 for u in units})
            types = {n: f"*{dt}" for n in ("A", "A2", "B", "B2", "C", "C2", "C3", "Bias", "Bias2", "Aux", "Aux2")}
            types.update(ColSum="*fp32", ColSum2="*fp32", M="i32", N="i32", K="i32")
            types.update({s: "i32" for s in strides})
            aligned = [n for n in types if n[0].isupper() and n not in ("M", "N", "K")] + ["M", "N", "K"]
            aligned += [s for s in strides if s not in units]
            kw = c.kwargs
            jobs.append(Job(f"gffn_{name}", fn, _sig(fn, types, ce), ce, c.num_warps, c.num_stages,
                            f"{dt} {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{c.num_warps} s{c.num_stages}",
                            dt != "fp32", aligned))
    return jobs


def _resources(cubin: bytes) -> tuple[str, str]:
    tool = shutil.which("cuobjdump") or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                                     "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "n/a", "n/a"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                  timeout=60).stdout
        except Exception:
            return "n/a", "n/a"
    reg = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return (reg.group(1) if reg else "n/a"), (stack.group(1) if stack else "n/a")


def compile_job(job: Job, arch: int):
    attrs = {(job.fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in job.aligned
             if n in job.signature and job.signature[n] != "constexpr"}
    src = ASTSource(fn=job.fn, signature=job.signature, constexprs=job.constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target, options={"num_warps": job.num_warps, "num_stages": job.num_stages})


def run(archs: list[int], only: str | None = None) -> int:
    failures = []
    header = (f"{'arch':<5} {'kernel':<18} {'config':<40} {'smem KB':>8} {'regs':>5} {'stack':>5} "
              f"{'tensor core':<12} {'s':>5}")
    print(header)
    print("-" * len(header))
    t_all = time.time()
    for arch in archs:
        jobs = (_attention_jobs(arch) + _layer_norm_jobs(arch) + _rms_norm_jobs(arch) + _lce_jobs(arch)
                + _ffn_jobs(arch) + _gated_ffn_jobs(arch))
        if only:
            jobs = [j for j in jobs if only in j.kernel]
        for job in jobs:
            t0 = time.time()
            try:
                compiled = compile_job(job, arch)
            except Exception as exc:  # a config that does not compile is a failure, not a crash
                failures.append(f"sm_{arch} {job.kernel} [{job.label}]: compile error {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}")
                print(f"sm_{arch:<2} {job.kernel:<18} {job.label:<40} {'ERROR':>8}")
                continue
            smem = compiled.metadata.shared
            ptx = compiled.asm.get("ptx", "")
            if arch >= 90 and "wgmma" in ptx:
                tc = "wgmma"
            elif re.search(r"\bmma\.sync", ptx):
                tc = "mma"
            else:
                tc = "-"
            regs, stack = _resources(compiled.asm.get("cubin", b""))
            print(f"sm_{arch:<2} {job.kernel:<18} {job.label:<40} {smem / 1024:>8.1f} {regs:>5} {stack:>5} "
                  f"{tc:<12} {time.time() - t0:>5.1f}", flush=True)
            if smem > SMEM_BYTES[arch]:
                failures.append(f"sm_{arch} {job.kernel} [{job.label}]: {smem} B shared memory > "
                                f"{SMEM_BYTES[arch]} B")
            if job.needs_tc and tc == "-":
                failures.append(f"sm_{arch} {job.kernel} [{job.label}]: no tensor-core instruction in the PTX")
            if job.needs_tc and arch >= 90 and tc != "wgmma":
                failures.append(f"sm_{arch} {job.kernel} [{job.label}]: no wgmma on sm_90")
    print(f"\n{len(failures)} failure(s); total {time.time() - t_all:.0f} s")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_BYTES))
    ap.add_argument("--only", help="compile only kernels whose name contains this")
    args = ap.parse_args(argv)
    return run(args.arch, args.only)


if __name__ == "__main__":
    sys.exit(main())
