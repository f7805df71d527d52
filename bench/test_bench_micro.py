"""pytest-benchmark micro-benchmarks of each op and backend on the CPU, apart from the unit tests:

    pytest bench/ --benchmark-only                 # from the repository root
    pytest bench/ --benchmark-only --benchmark-compare   # against a saved run (--benchmark-autosave)

``python -m pytest`` alone never collects this folder (pyproject's testpaths = ["tests"]). Sizes,
inputs, the backends and the correctness check come from ``gptfast.bench`` (the one benchmark
implementation); each backend is checked against the float64 ground truth before it is timed.
For full tables, FLOP/s, GB/s and plots use ``gptfast bench OP``.
"""
import pytest
import torch

from gptfast import bench

CPU = torch.device("cpu")
CASES = {
    "attention": bench.Case("attention", dict(B=2, T=256, H=4, D=64), causal=True),
    "layer_norm": bench.Case("layer_norm", dict(M=2048, N=768)),
    "gelu_ffn": bench.Case("gelu_ffn", dict(M=256, C=512, Hd=2048)),
}
PARAMS = [(op, be) for op in CASES for be in bench.gptfast_backends(op, "cpu") + ["eager"]]


@pytest.mark.parametrize("phase", ["fwd", "fwd-bwd"])
@pytest.mark.parametrize("op, backend", PARAMS, ids=[f"{o}-{b}" for o, b in PARAMS])
def test_op(benchmark, op, backend, phase):
    case = CASES[op]
    variant = bench.make_variant(case, backend, CPU, torch.float32)
    if variant.fn is None:
        pytest.skip(variant.reason)
    bench.check_case(case, variant.fn, CPU, torch.float32, backward=phase != "fwd")
    xs = [t.requires_grad_() for t in case.make_inputs(CPU, torch.float32, torch.Generator().manual_seed(0))]
    fn = variant.fn
    if phase == "fwd":
        benchmark(lambda: fn(*xs))
    else:
        g = torch.randn_like(fn(*xs))
        benchmark(lambda: torch.autograd.grad(fn(*xs), xs, g))
    benchmark.extra_info.update(case=case.label, work=case.work(phase, torch.float32),
                                unit="bytes" if op == "layer_norm" else "FLOPs")
