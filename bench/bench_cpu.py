"""Benchmark of the native ``cpu`` backend against PyTorch on the CPU.

For each op at GPT-2-like sizes (fp32): forward and forward+backward (and backward alone for
LayerNorm and GELU-FFN), the ``cpu`` backend against PyTorch eager and ``torch.compile`` of the
same eager code; attention eager is both ``F.scaled_dot_product_attention`` and the naive
matmul-softmax-matmul. Then peak memory of attention at T = 4096, and one training step of the
``tiny`` and ``small`` presets with the ``cpu`` and ``reference`` backends.

Every variant's result is first checked against the reference backend; times are
``torch.utils.benchmark`` medians; ratios (eager time / variant time, > 1 is faster than eager)
compare numbers from the same run. Results go to stdout and ``bench/results/cpu_<date>.md``.

    python bench/bench_cpu.py                # everything (~5-10 min on 2 cores)
    python bench/bench_cpu.py --no-compile   # skip torch.compile (its compilation is slow)
    python bench/bench_cpu.py --quick        # shorter timing runs
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import gptfast
from gptfast.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- helpers

def median_ms(fn, min_run_time: float) -> float:
    fn()  # warm-up (and compilation for torch.compile variants)
    t = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return t.median * 1e3


def check(name: str, got, want, atol: float) -> None:
    """Refuse to time a variant whose result differs from the reference backend."""
    got = got if isinstance(got, (list, tuple)) else [got]
    want = want if isinstance(want, (list, tuple)) else [want]
    for i, (a, b) in enumerate(zip(got, want)):
        err = (a.detach().double() - b.detach().double()).abs().max().item()
        scale = max(1.0, b.detach().abs().max().item())
        if not err <= atol * scale:
            raise SystemExit(f"{name}: result {i} differs from the reference by {err:.3e} "
                             f"(> {atol:.1e} x {scale:.3g}); not timing a wrong answer")


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def grads_of(fn, inputs, g):
    out = fn(*inputs)
    return [out] + list(torch.autograd.grad(out, inputs, g))


class Table:
    def __init__(self, title: str, columns: list[str]):
        self.title, self.columns, self.rows = title, columns, []

    def add(self, *row):
        self.rows.append([str(c) for c in row])
        print("  " + " | ".join(self.rows[-1]), flush=True)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join(" --- " for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the ops' eager code

def attention_sdpa(q, k, v):  # (B, T, H, D)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def attention_naive(q, k, v):  # nanoGPT's manual path
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    t = q.shape[1]
    att = (qt @ kt.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (att @ vt).transpose(1, 2)


def layer_norm_eager(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def ffn_eager(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


# --------------------------------------------------------------------------- op benchmarks

def bench_op(table, op, variants, inputs, flops_or_bytes, unit, run_time, atol, bwd_only=False):
    """variants: name -> callable(*inputs) returning the output; the first is the eager baseline."""
    g = None
    ref_fn = variants["reference"]
    ref_inputs = leaves(*inputs)
    ref_out = ref_fn(*ref_inputs)
    g = torch.randn_like(ref_out)
    ref_all = [ref_out] + list(torch.autograd.grad(ref_out, ref_inputs, g))
    results = {}
    for name, fn in variants.items():
        if name == "reference":
            continue
        xs = leaves(*inputs)
        check(f"{op} {name}", grads_of(fn, xs, g), ref_all, atol)

        def fwd(fn=fn):
            with torch.no_grad():
                fn(*inputs)

        def fwd_bwd(fn=fn, xs=xs):
            out = fn(*xs)
            torch.autograd.grad(out, xs, g)

        res = {"fwd": median_ms(fwd, run_time), "fwd+bwd": median_ms(fwd_bwd, run_time)}
        if bwd_only:
            out = fn(*xs)

            def bwd(out=out, xs=xs):
                torch.autograd.grad(out, xs, g, retain_graph=True)

            res["bwd"] = median_ms(bwd, run_time)
        results[name] = res
    base = results["eager"] if "eager" in results else next(iter(results.values()))
    for name, res in results.items():
        for phase, ms in res.items():
            work = flops_or_bytes[phase]
            rate = work / (ms * 1e-3) / 1e9
            table.add(op, name, phase, f"{ms:.2f}", f"{rate:.1f} {unit}", f"{base[phase] / ms:.2f}x")
    return results


def bench_ops(args, tables):
    torch.manual_seed(0)
    run_time = args.run_time
    table = Table("Ops, fp32 (ratio = eager time / this time; > 1 is faster than eager)",
                  ["op", "variant", "phase", "median ms", "rate", "vs eager"])
    tables.append(table)
    print(f"\n== {table.title}")
    compile_on = not args.no_compile
    if compile_on:
        # timing backward alone replays it with retain_graph=True, which donated buffers forbid
        import torch._functorch.config as functorch_config
        functorch_config.donated_buffer = False

    def gf(name):  # the gptfast op on one backend
        return {
            "attention": lambda q, k, v, be=None: gptfast.attention(q, k, v, causal=True, backend=be),
            "layer_norm": lambda x, w, b, be=None: gptfast.layer_norm(x, w, b, backend=be),
            "gelu_ffn": lambda *a, be=None: gptfast.gelu_ffn(*a, approximate="tanh", backend=be),
        }[name]

    summary = {}
    # attention (4, 512, 12, 64) causal
    b, t, h, d = 4, 512, 12, 64
    qkv = [torch.randn(b, t, h, d) for _ in range(3)]
    fl = 4 * b * h * t * t * d * 0.5  # causal: half the scores
    variants = {
        "reference": lambda *a: gf("attention")(*a, be="reference"),
        "eager": attention_sdpa,
        "eager naive": attention_naive,
        "cpu": lambda *a: gf("attention")(*a, be="cpu"),
    }
    if compile_on:
        variants["compile naive"] = torch.compile(attention_naive)
    summary["attention"] = bench_op(table, f"attention {b}x{t}x{h}x{d} causal", variants, qkv,
                                    {"fwd": fl, "fwd+bwd": 3.5 * fl}, "GFLOP/s", run_time, 1e-4)

    # layer_norm x (8*512, 768)
    m, n = 8 * 512, 768
    ln_in = [torch.randn(m, n) * 2 + 1, torch.randn(n), torch.randn(n)]
    variants = {
        "reference": lambda *a: gf("layer_norm")(*a, be="reference"),
        "eager": layer_norm_eager,
        "cpu": lambda *a: gf("layer_norm")(*a, be="cpu"),
    }
    if compile_on:
        variants["compile"] = torch.compile(layer_norm_eager)
    byt = 4 * m * n
    summary["layer_norm"] = bench_op(table, f"layer_norm {m}x{n}", variants, ln_in,
                                     {"fwd": 2 * byt, "fwd+bwd": 5 * byt, "bwd": 3 * byt}, "GB/s",
                                     run_time, 1e-4, bwd_only=True)

    # gelu_ffn x (8*512, 768) -> 3072 -> 768
    hid = 4 * n
    ffn_in = [torch.randn(m, n), torch.randn(hid, n) / n ** 0.5, torch.randn(hid) * 0.1,
              torch.randn(n, hid) / hid ** 0.5, torch.randn(n) * 0.1]
    variants = {
        "reference": lambda *a: gf("gelu_ffn")(*a, be="reference"),
        "eager": ffn_eager,
        "cpu": lambda *a: gf("gelu_ffn")(*a, be="cpu"),
    }
    if compile_on:
        variants["compile"] = torch.compile(ffn_eager)
    fl = 2 * 2 * m * n * hid
    summary["gelu_ffn"] = bench_op(table, f"gelu_ffn {m}x{n}x{hid}", variants, ffn_in,
                                   {"fwd": fl, "fwd+bwd": 3 * fl, "bwd": 2 * fl}, "GFLOP/s",
                                   run_time, 1e-4, bwd_only=True)
    return summary


# --------------------------------------------------------------------------- peak memory

MEM_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.nn.functional as F, gptfast
    def status_kib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])
    variant = sys.argv[1]
    torch.manual_seed(0)
    b, t, h, d = 1, 4096, 2, 64
    q, k, v = (torch.randn(b, t, h, d, requires_grad=True) for _ in range(3))
    def run(q, k, v):
        if variant == "eager sdpa":
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2), is_causal=True).transpose(1, 2)
        return gptfast.attention(q, k, v, causal=True, backend=variant)
    small = [x[:, :64].detach().requires_grad_() for x in (q, k, v)]
    run(*small).sum().backward()  # load the backend, start the threads
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM)
    before = status_kib("VmRSS")
    out = run(q, k, v)
    out.backward(torch.ones_like(out))
    after = status_kib("VmHWM")
    print(json.dumps({"peak_growth_mib": (after - before) / 1024}))
""")


def bench_memory(tables):
    table = Table("Attention peak memory, fwd+bwd, (1, 4096, 2, 64) fp32 causal "
                  "(peak RSS, VmHWM, minus RSS before the call; one fp32 T x T matrix for both heads = 128 MiB)",
                  ["variant", "peak MiB above baseline", "vs reference"])
    tables.append(table)
    print(f"\n== {table.title}")
    res = {}
    for variant in ("reference", "eager sdpa", "cpu"):
        out = subprocess.run([sys.executable, "-c", MEM_SCRIPT, variant], capture_output=True,
                             text=True, timeout=900)
        if out.returncode != 0:
            raise SystemExit(f"memory benchmark {variant} failed:\n{out.stderr[-2000:]}")
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"]
    for variant, mib in res.items():
        table.add(variant, f"{mib:.1f}", f"{mib / res['reference']:.3f}")
    return res


# --------------------------------------------------------------------------- training step

def bench_training(args, tables):
    table = Table("Training step (forward + backward + AdamW), fp32",
                  ["preset", "batch x seqlen", "backend", "median ms/step", "tokens/s", "vs reference"])
    tables.append(table)
    print(f"\n== {table.title}")
    res = {}
    for preset, batch in (("tiny", 8), ("small", 8)):
        config = GPTConfig.from_preset(preset)
        t = config.block_size
        gen = torch.Generator().manual_seed(0)
        data = torch.randint(0, config.vocab_size, (batch, t + 1), generator=gen)
        losses, times = {}, {}
        for backend in ("reference", "cpu"):
            torch.manual_seed(0)
            model = GPT(config)
            opt = model.configure_optimizer(0.1, 1e-3)

            def step(model=model, opt=opt, backend=backend):
                with gptfast.use_backend(backend):
                    _, loss = model(data[:, :-1], data[:, 1:])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                return loss

            losses[backend] = step().item()  # first step: the check below
            times[backend] = median_ms(step, args.run_time * 2)
        if abs(losses["cpu"] - losses["reference"]) > 1e-3:
            raise SystemExit(f"{preset}: first-step loss cpu {losses['cpu']} != reference {losses['reference']}")
        for backend, ms in times.items():
            table.add(preset, f"{batch} x {t}", backend, f"{ms:.1f}", f"{batch * t / ms * 1e3:.0f}",
                      f"{times['reference'] / ms:.2f}x")
        res[preset] = times
    return res


# --------------------------------------------------------------------------- main

def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from gptfast.ops import _cpu
    return (f"{cpu}, {os.cpu_count()} logical cores, torch.get_num_threads()={torch.get_num_threads()}, "
            f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}, "
            f"Python {platform.python_version()}; attention tile GEMMs: {_cpu._ext.blas_source()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--quick", action="store_true", help="shorter timing runs")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ops", "memory", "training"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="markdown output (default bench/results/cpu_<date>.md)")
    args = parser.parse_args(argv)
    args.run_time = 0.3 if args.quick else 1.0
    if args.threads:
        torch.set_num_threads(args.threads)
    if "cpu" not in gptfast.available_backends(device="cpu"):
        from gptfast import _build
        raise SystemExit(f"cpu backend unavailable: {_build.unavailable_reason()}")
    start = time.time()
    info = machine()
    print(info)
    tables: list[Table] = []
    if "ops" not in args.skip:
        bench_ops(args, tables)
    if "memory" not in args.skip:
        bench_memory(tables)
    if "training" not in args.skip:
        bench_training(args, tables)
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else ROOT / "results" / f"cpu_{date}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python bench/bench_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = [f"# gptfast cpu backend benchmark, {date}", "", f"Machine: {info}", "",
            f"Command: `{cmd.strip()}` ({time.time() - start:.0f} s). Medians of "
            "torch.utils.benchmark; every variant checked against the reference backend first.", ""]
    text += [t.markdown() for t in tables]
    out.write_text("\n".join(text))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
