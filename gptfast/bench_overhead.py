"""``gptfast bench overhead``: host time per op call on tiny inputs, against the PyTorch op(s) it replaces.

On tiny inputs the kernels take a few microseconds, so the time per call is what the host spends
around them: argument checks, backend selection, autograd bookkeeping, the launcher's binding.
On a GPU that host time is the whole cost of an op at GPT-2 sizes unless it stays below the
kernel's (DESIGN.md, "Host cost"); the target is each op within 2x of the PyTorch op(s) it
replaces, forward (under ``torch.no_grad``) and forward + backward.

Pairs (gptfast / PyTorch), inputs of (B, T) = (2, 8) tokens, width 64, 2 heads of 32:

- ``layer_norm``: ``gptfast.layer_norm`` / ``F.layer_norm``;
- ``gelu_ffn``: ``gptfast.gelu_ffn`` / ``F.linear`` -> ``F.gelu`` -> ``F.linear`` (width 64 -> 256 -> 64);
- ``attention``: ``gptfast.attention`` on (B, T, H, D) / ``F.scaled_dot_product_attention`` on
  (B, H, T, D), both causal;
- ``train_step``: the loss (fwd) and loss + backward (fwd+bwd) of gptfast's GPT on the ``tiny``
  preset (4 layers, width 128, exact GELU) / the nanoGPT-structured model of ``bench/nanogpt.py``
  with the same weights, on (2, 8) tokens: a whole step's host time, about 20 op calls on each
  side (target <= 1.2x). Needs a source checkout (bench/).

Timing: calls of the two sides alternate in blocks (``--repeats`` blocks of enough calls for
~20 ms each, after a warm-up); the median per-call time of each side is reported, and the ratio
gptfast / PyTorch from the same run (< 2 meets the target). On CUDA the GPU is synchronised once
per block only, so a block's time is the host's (the tiny kernels finish faster than they are
launched). The backward is timed with the forward: fwd+bwd = forward, ``sum().backward()``.
Torch runs on one CPU thread for the measurement (tiny inputs gain nothing from a thread pool,
and its wake-ups would be noise on both sides).
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

__all__ = ["run_overhead", "OVERHEAD_OPS"]

OVERHEAD_OPS = ("layer_norm", "gelu_ffn", "attention", "train_step")
TARGETS = {"layer_norm": 2.0, "gelu_ffn": 2.0, "attention": 2.0, "train_step": 1.2}


def _inputs(op: str, device, dtype, grad: bool):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(grad)

    b, t, c, h = 2, 8, 64, 2
    if op == "train_step":
        idx = torch.randint(0, 256, (b, t + 1), generator=g).to(device)
        return [idx[:, :-1], idx[:, 1:]]
    if op == "layer_norm":
        return [rnd(b, t, c), rnd(c), rnd(c)]
    if op == "gelu_ffn":
        return [rnd(b, t, c), rnd(4 * c, c), rnd(4 * c), rnd(c, 4 * c), rnd(c)]
    return [rnd(b, t, h, c // h) for _ in range(3)]


def _models(device, dtype):
    """gptfast's GPT (tiny preset, exact GELU) and the nanoGPT-structured model with its weights."""
    from .bench import load_nanogpt
    from .model import GPT, GPTConfig
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.from_preset("tiny", dropout=0.0, gelu_approximate="none")).to(device, dtype)
    return gpt, load_nanogpt().from_gpt(gpt)


def _pair(op: str, backend: str | None, device=None, dtype=None):
    import gptfast
    if op == "train_step":
        gpt, nano = _models(device, dtype)

        def ours(idx, targets):
            with gptfast.use_backend(backend or "auto"):
                return gpt(idx, targets)[1]
        return ours, lambda idx, targets: nano(idx, targets)[1]
    if op == "layer_norm":
        return (lambda x, w, b: gptfast.layer_norm(x, w, b, backend=backend),
                lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b))
    if op == "gelu_ffn":
        return (lambda x, w1, b1, w2, b2: gptfast.gelu_ffn(x, w1, b1, w2, b2, approximate="tanh", backend=backend),
                lambda x, w1, b1, w2, b2: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2))
    return (lambda q, k, v: gptfast.attention(q, k, v, causal=True, backend=backend),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))


def _sdpa_layout(op: str, inputs):
    """SDPA's (B, H, T, D) tensors: transposed leaves, so that its gradients are of leaves too."""
    if op != "attention":
        return inputs
    return [t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in inputs]


def _block_time(fn, args, calls: int, backward: bool, device) -> float:
    if backward:
        def once():
            fn(*args).sum().backward()
    else:
        def once():
            with torch.no_grad():
                fn(*args)
    t0 = time.perf_counter()
    for _ in range(calls):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls


def measure(op: str, device, dtype, backend: str | None, backward: bool, repeats: int) -> dict:
    ours, theirs = _pair(op, backend, device, dtype)
    args = _inputs(op, device, dtype, grad=backward)
    targs = _sdpa_layout(op, args)
    for fn, a in ((ours, args), (theirs, targs)):  # warm-up: builds, loads, caches
        _block_time(fn, a, 20, backward, device)
    per = _block_time(ours, args, 50, backward, device)
    calls = max(20, min(2000, int(0.02 / max(per, 1e-7))))
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        t_ours.append(_block_time(ours, args, calls, backward, device))
        t_theirs.append(_block_time(theirs, targs, calls, backward, device))
    a, b = statistics.median(t_ours) * 1e6, statistics.median(t_theirs) * 1e6
    return {"op": op, "phase": "fwd+bwd" if backward else "fwd", "gptfast_us": a, "pytorch_us": b,
            "ratio": a / b, "target": TARGETS[op], "meets_target": a / b <= TARGETS[op], "calls_per_block": calls}


def format_table(rows: list[dict]) -> str:
    head = ("op", "phase", "gptfast us", "pytorch us", "ratio", "target", "met")
    body = [(r["op"], r["phase"], f"{r['gptfast_us']:.1f}", f"{r['pytorch_us']:.1f}", f"{r['ratio']:.2f}",
             f"<= {r['target']:g}x", "yes" if r["meets_target"] else "NO") for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(x[i].ljust(widths[i]) for i in range(len(head))).rstrip() for x in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_overhead(args, command: str) -> int:
    from .bench import DTYPE_NAMES, BenchError, _resolve, machine_info, print_and_write
    device, dtype = _resolve(args)
    ops = [s for item in (args.sizes or OVERHEAD_OPS) for s in item.replace(";", " ").replace(",", " ").split()]
    bad = [o for o in ops if o not in OVERHEAD_OPS]
    if bad:
        raise BenchError(f"--sizes: overhead takes op names {OVERHEAD_OPS}, not {bad}")
    backend = args.backends.split(",")[0].strip() if args.backends else None
    repeats = max(1, int(getattr(args, "repeats", None) or 7))
    phases = [p for p, on in (("fwd", args.fwd), ("fwd+bwd", args.fwd_bwd)) if on] or ["fwd", "fwd+bwd"]
    if args.dry_run:
        print(f"gptfast bench overhead (dry run): device {device.type}, dtype {DTYPE_NAMES[dtype]}, "
              f"backend {backend or 'auto'}, ops {', '.join(ops)}, phases {', '.join(phases)}; "
              f"median of {repeats} blocks")
        return 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny inputs: one thread, no pool wake-ups in either side's time
    info = machine_info(device)
    rows = []
    try:
        for op in ops:
            for phase in phases:
                rows.append(measure(op, device, dtype, backend, phase == "fwd+bwd", repeats))
            if not sys.stderr.isatty():
                print(f"bench overhead: {op} done", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(threads)
    header = (f"gptfast bench overhead: {info['gpu'] or info['cpu']}, {info['torch_threads']} threads, "
              f"{DTYPE_NAMES[dtype]}, torch {torch.__version__}, backend {backend or 'auto'}, {info['date']}\n"
              "host time per call on tiny inputs ((2, 8) tokens, width 64; train_step: the tiny preset's "
              "GPT vs bench/nanogpt.py's model, its loss (fwd) and loss + backward (fwd+bwd)); medians of "
              f"{repeats} alternating blocks; ratio = gptfast / PyTorch")
    print_and_write(args.out, "overhead", header, format_table(rows),
                    {"command": command, "machine": info, "dtype": DTYPE_NAMES[dtype], "backend": backend,
                     "repeats": repeats, "rows": rows})
    return 0
