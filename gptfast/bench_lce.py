"""``gptfast bench linear_cross_entropy``: the lm_head + cross-entropy of a training step, fused
(``gptfast.linear_cross_entropy``, chunked: the logits never exist whole) against eager PyTorch
(``F.cross_entropy(F.linear(x, w), targets)``: (M, V) fp32 logits, their log-softmax and gradient),
``torch.compile`` of the same, and Liger-Kernel's fused linear cross-entropy when installed (CUDA).

Sizes M,K,V (rows = batch x seqlen tokens, hidden width, vocabulary); the default is GPT-2 124M's
lm_head at batch 8 x 1024: 8192,768,50304. Reported per backend: the median time of a call
(forward + backward of the mean loss by default; ``--fwd``: the loss alone under no_grad), its
ratio to eager's from the same run, the peak memory the call needs above its inputs
(gptfast.bench.peak_mib: CUDA's allocator peak, the CPU's resident-set high-water mark) and its
ratio to eager's, TFLOP/s (2MKV per GEMM: one forward, three for forward + backward), and the
size each backend was checked at against a float64 ground truth (DESIGN.md's rule).

Timing: ``--repeats`` rounds (default 3); in each round every backend runs one call, in turn, so
a shared machine's load drifts across all of them alike; the median of the rounds is kept.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

__all__ = ["run_linear_cross_entropy", "DEFAULT_SIZE"]

DEFAULT_SIZE = (8192, 768, 50304)
CHECK_SIZE = (96, 48, 1000)  # the float64 check: small, V not a power of two, several chunks


def _eager(x, w, t):
    return F.cross_entropy(F.linear(x, w).float(), t)


def _variants(names: list[str], device: torch.device) -> dict:
    import gptfast
    from .bench import _compile, _importable
    out = {}
    for name in names:
        if name == "eager":
            out[name] = (_eager, "")
        elif name == "compile":
            out[name] = (_compile(_eager), "")
        elif name == "liger":
            why = _importable("liger_kernel")
            if why or device.type != "cuda":
                out[name] = (None, why or "Liger-Kernel runs on CUDA only")
                continue
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            loss = LigerFusedLinearCrossEntropyLoss()
            out[name] = (lambda x, w, t: loss(w, x, t), "")
        else:
            out[name] = ((lambda b: lambda x, w, t: gptfast.linear_cross_entropy(x, w, t, backend=b))(name), "")
    return out


def _inputs(m: int, k: int, v: int, device, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(v, k, generator=g) * k ** -0.5).to(device, dtype).requires_grad_()
    t = torch.randint(0, v, (m,), generator=g).to(device)
    t[::17] = -100  # a few ignored rows, as padding / document boundaries give
    return x, w, t


def check(fn, device, dtype, backward: bool) -> str:
    """Raise AssertionError unless ``fn`` is within DESIGN.md's rule of the float64 truth."""
    from .testing import assert_results_match, linear_cross_entropy_magnitudes
    m, k, v = CHECK_SIZE
    x, w, t = _inputs(m, k, v, device, torch.float32, seed=1)
    x64, w64 = (a.detach().double().requires_grad_() for a in (x, w))
    xs, ws = (a.detach().to(dtype).requires_grad_() for a in (x, w))
    xp, wp = (a.detach().to(dtype).requires_grad_() for a in (x, w))
    ref = F.cross_entropy(F.linear(x64, w64), t)
    pt = F.cross_entropy(F.linear(xp, wp).float(), t)
    out = fn(xs, ws, t)
    mags = linear_cross_entropy_magnitudes(x64, w64, None, t, torch.ones((), dtype=torch.float64) if backward else None)
    if not backward:
        assert_results_match(out.float(), ref, pt, magnitudes=mags)
        return f"{m}x{k}x{v}"
    grads = torch.autograd.grad(out, (xs, ws))
    ref_g = torch.autograd.grad(ref, (x64, w64))
    pt_g = torch.autograd.grad(pt, (xp, wp))
    assert_results_match(out.float(), ref, pt, grads, ref_g, pt_g, magnitudes=mags)
    return f"{m}x{k}x{v}"


def _parse_sizes(specs) -> list[tuple[int, int, int]]:
    from .bench import _ints
    if not specs:
        return [DEFAULT_SIZE]
    items = [s for spec in specs for s in spec.replace(";", " ").split()]
    return [tuple(_ints(s, 3, 3, "M,K,V (rows, hidden width, vocabulary)")) for s in items]


def run_linear_cross_entropy(args, command: str) -> int:
    from .bench import (DTYPE_NAMES, _resolve, _short, _sync, gptfast_backends, machine_info, peak_mib,
                        print_and_write)
    device, dtype = _resolve(args)
    sizes = _parse_sizes(args.sizes)
    names = ([b.strip() for b in args.backends.split(",") if b.strip()] if args.backends
             else ["eager", "compile"] + gptfast_backends("linear_cross_entropy", device.type)
             + (["liger"] if device.type == "cuda" else []))
    backward = not args.fwd
    phase = "fwd-bwd" if backward else "fwd"
    repeats = max(1, int(args.repeats or 3))
    if args.dry_run:
        print(f"gptfast bench linear_cross_entropy (dry run): device {device.type}, dtype {DTYPE_NAMES[dtype]}, "
              f"sizes {', '.join('x'.join(map(str, s)) for s in sizes)}, backends {', '.join(names)}, "
              f"phase {phase}, median of {repeats} rounds")
        return 0
    info = machine_info(device)
    variants = _variants(names, device)
    rows = []
    for m, k, v in sizes:
        label = f"{m}x{k}x{v}"
        live = {}
        for name, (fn, why) in variants.items():
            row = dict(size=label, backend=name, phase=phase, status="OK", error=why, ms=None, peak_mib=None,
                       checked_at="")
            rows.append(row)
            if fn is None:
                row["status"] = "SKIP"
                continue
            try:
                row["checked_at"] = check(fn, device, dtype, backward)
            except AssertionError as exc:
                row["status"], row["error"] = "WRONG", _short(exc)
                continue
            except Exception as exc:  # NotImplementedError, a failed compile, ...
                row["status"], row["error"] = "ERROR", _short(exc)
                continue
            live[name] = (fn, row)
        x, w, t = _inputs(m, k, v, device, dtype)

        def call(fn):
            if not backward:
                with torch.no_grad():
                    return fn(x, w, t)
            return torch.autograd.grad(fn(x, w, t), (x, w))

        times: dict[str, list[float]] = {n: [] for n in live}
        for name, (fn, row) in list(live.items()):  # warm-up (compiles), then the peak of one call
            try:
                call(fn)
                row["peak_mib"] = peak_mib(lambda: call(fn), device)
            except Exception as exc:
                row["status"], row["error"] = "ERROR", _short(exc)
                del live[name]
            print(f"bench linear_cross_entropy: {label} {name}: warm", file=sys.stderr, flush=True)
        for r in range(repeats):
            for name, (fn, row) in live.items():
                _sync(device)
                t0 = time.perf_counter()
                call(fn)
                _sync(device)
                times[name].append((time.perf_counter() - t0) * 1e3)
            print(f"bench linear_cross_entropy: {label} round {r + 1}/{repeats}", file=sys.stderr, flush=True)
        flops = 2.0 * m * k * v * (3 if backward else 1)
        for name, (fn, row) in live.items():
            row["ms"] = statistics.median(times[name])
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
            row["times_ms"] = times[name]
        base = next((r for r in rows if r["size"] == label and r["backend"] == "eager" and r["ms"]), None)
        for row in rows:
            if row["size"] == label and base is not None and row["ms"]:
                row["x_eager_time"] = row["ms"] / base["ms"]
                if row["peak_mib"] is not None and base["peak_mib"]:
                    row["x_eager_peak"] = row["peak_mib"] / base["peak_mib"]
    header = (f"gptfast bench linear_cross_entropy: {info['gpu'] or info['cpu']}, {info['torch_threads']} threads, "
              f"{DTYPE_NAMES[dtype]}, torch {torch.__version__}, {info['date']}\n"
              f"{phase} of the mean loss over M rows (every 17th ignored), K hidden, V vocabulary; eager = "
              "F.cross_entropy(F.linear(x, w).float(), t); median of "
              f"{repeats} interleaved rounds; peak = memory one call needs above its inputs "
              f"({'CUDA max_memory_allocated' if device.type == 'cuda' else 'resident-set high-water mark'}); "
              "x eager = ratio to eager's in this run")
    print_and_write(args.out, "linear_cross_entropy", header, format_table(rows),
                    {"command": command, "machine": info, "dtype": DTYPE_NAMES[dtype], "repeats": repeats,
                     "rows": rows})
    return 1 if any(r["status"] in ("WRONG", "ERROR") for r in rows) else 0


def format_table(rows: list[dict]) -> str:
    def f(v, spec):
        return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)

    head = f"{'size':<17} {'backend':<10} {'status':<6} {'ms':>10} {'x eager':>8} {'peak MiB':>9} {'x eager':>8} " \
           f"{'TFLOP/s':>8}  checked / note"
    lines = [head, "-" * len(head)]
    for r in rows:
        note = r["checked_at"] if r["status"] == "OK" else r["error"]
        lines.append(f"{r['size']:<17} {r['backend']:<10} {r['status']:<6} {f(r['ms'], '10.1f')} "
                     f"{f(r.get('x_eager_time'), '8.2f')} {f(r['peak_mib'], '9.0f')} {f(r.get('x_eager_peak'), '8.3f')} "
                     f"{f(r.get('tflops'), '8.3f')}  {note}")
    return "\n".join(lines)
