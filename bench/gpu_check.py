"""Time the Triton backend against PyTorch on one NVIDIA GPU, bf16, forward and forward+backward.

    python bench/gpu_check.py            # prints a markdown table (GPU, versions, date first)

Baselines: F.scaled_dot_product_attention (PyTorch picks flash/cuDNN/efficient), F.layer_norm,
eager Linear -> GELU(tanh) -> Linear. Each timing is the median of triton.testing.do_bench after
a warm-up call that also runs the autotuner. Shapes are GPT-2-small/medium-like training shapes.
"""
from __future__ import annotations

import datetime
import platform
import sys

import torch
import torch.nn.functional as F

import gptfast


def _bench(fn, backward: bool):
    import triton.testing
    out = fn()
    g = torch.randn_like(out) if backward else None

    def step():
        o = fn()
        if backward:
            o.backward(g)
        return o

    step()  # warm-up (autotuning, compilation)
    torch.cuda.synchronize()
    return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")


def _leaves(shape, n, dtype=torch.bfloat16, scale=1.0):
    return [(torch.randn(shape, device="cuda", dtype=dtype) * scale).requires_grad_() for _ in range(n)]


def attention_cases():
    for B, T, H, D in [(8, 1024, 12, 64), (4, 2048, 16, 128), (2, 4096, 8, 256)]:
        q, k, v = _leaves((B, T, H, D), 3)
        ours = lambda: gptfast.attention(q, k, v, causal=True, backend="triton")  # noqa: E731
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        torch_fn = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)  # noqa: E731
        flops = 4 * B * H * T * T * D / 2  # causal: half the score matrix
        yield f"attention B{B} T{T} H{H} D{D} causal", ours, torch_fn, flops


def layer_norm_cases():
    for M, N in [(8192, 768), (8192, 4096), (1024, 65536)]:
        (x,) = _leaves((M, N), 1)
        w, b = _leaves((N,), 2)
        yield (f"layer_norm {M}x{N}", lambda: gptfast.layer_norm(x, w, b, backend="triton"),
               lambda: F.layer_norm(x, (N,), w, b), None)


def gelu_ffn_cases():
    for M, C in [(8192, 768), (8192, 1024), (4096, 2048)]:
        (x,) = _leaves((M, C), 1)
        w1, w2 = _leaves((4 * C, C), 1, scale=C ** -0.5)[0], _leaves((C, 4 * C), 1, scale=(4 * C) ** -0.5)[0]
        b1, b2 = _leaves((4 * C,), 1)[0], _leaves((C,), 1)[0]
        ours = lambda: gptfast.gelu_ffn(x, w1, b1, w2, b2, approximate="tanh", backend="triton")  # noqa: E731
        eager = lambda: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)  # noqa: E731
        yield f"gelu_ffn M{M} C{C} H{4 * C}", ours, eager, 2 * 2 * M * C * 4 * C


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check.py: no CUDA GPU visible", file=sys.stderr)
        return 1
    import triton
    props = torch.cuda.get_device_properties(0)
    print(f"# gptfast Triton backend vs PyTorch, bf16\n")
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"- GPU: {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.0f} GiB)")
    print(f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
          f"python {platform.python_version()}\n")
    print("| case | fwd ms triton | fwd ms torch | fwd speedup | fwd+bwd ms triton | fwd+bwd ms torch "
          "| fwd+bwd speedup | triton fwd TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    rc = 0
    for cases in (attention_cases, layer_norm_cases, gelu_ffn_cases):
        for name, ours, theirs, flops in cases():
            try:
                f_ours, f_theirs = _bench(ours, False), _bench(theirs, False)
                b_ours, b_theirs = _bench(ours, True), _bench(theirs, True)
            except Exception as exc:  # report and keep timing the other ops
                print(f"| {name} | error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} |||||||")
                rc = 1
                continue
            tf = f"{flops / f_ours / 1e9:.0f}" if flops else "-"
            print(f"| {name} | {f_ours:.3f} | {f_theirs:.3f} | {f_theirs / f_ours:.2f}x | {b_ours:.3f} | "
                  f"{b_theirs:.3f} | {b_theirs / b_ours:.2f}x | {tf} |", flush=True)
            torch.cuda.empty_cache()
    return rc


if __name__ == "__main__":
    sys.exit(main())
