"""Run FlashAttention's own tests/test_flash_attn.py against gptfast, on the CPU.

FlashAttention's tests check its functions against an fp32 reference with FA's own rule,
``max|out - ref| <= k * max|pt - ref| (+ atol)`` where ``pt`` is the same reference in the input
dtype. This script runs that file, unmodified apart from the substitutions listed below, with
``import flash_attn`` answered by a small shim that maps FA's functions to gptfast on one backend
(``GPTFAST_BACKEND``, default ``cpu``):

- ``flash_attn.flash_attn_func`` / ``_kvpacked_func`` / ``_qkvpacked_func``: gptfast.flash_attn_interface;
- ``flash_attn.flash_attn_varlen_func`` / ``_varlen_kvpacked_func`` / ``_varlen_qkvpacked_func``:
  gptfast.ops.varlen (``block_table``, a paged KV cache, raises NotImplementedError there);
- ``flash_attn.flash_attn_with_kvcache`` (contiguous and paged caches): gptfast.ops.kvcache;
- ``flash_attn.bert_padding.unpad_input`` / ``pad_input``: gptfast's (FA 2.7+'s five-tuple);
- ``flash_attn.flash_attn_interface._get_block_size_n`` and ``flash_attn.layers.rotary.apply_rotary_emb``:
  small own implementations below. The rotary one is deliberately *not* gptfast's: the kvcache test
  uses it to build the reference that flash_attn_with_kvcache's own rotary step is checked against.

The functions it knows (``FUNCTIONS``): the dense tests (test_flash_attn_qkvpacked, _output,
_causal, _splitkv, _race_condition, _deterministic, _bwd_overflow, _bwd_transpose) and the varlen
and decoding ones (test_flash_attn_varlen_qkvpacked, _varlen_output, _varlen_causal,
_varlen_deterministic, _bwd_varlen_overflow, _kvcache).

FA's test file is NOT bundled (it is FlashAttention's, BSD-3): pass the path of your own copy,
e.g. from a flash-attention 2.7/2.8 checkout (``tests/test_flash_attn.py``) or the sdist.

    python bench/fa_tests.py ~/flash-attention/tests/test_flash_attn.py --collect-only
    python bench/fa_tests.py FA_TESTS --functions test_flash_attn_causal --sample 10
    python bench/fa_tests.py FA_TESTS --functions test_flash_attn_output --sample 50 --widen
    python bench/fa_tests.py FA_TESTS --functions test_flash_attn_kvcache,test_flash_attn_varlen_causal --sample 20

What the runner does to the file (``rewrite``), each step printed with its match count:

- ``device="cuda"`` / ``device = "cuda"`` become ``"cpu"``;
- bare ``@pytest.mark.skip()`` decorators are dropped (the ROCm-era copy of the file skips five of
  the eight functions; upstream 2.8 runs them); ``--keep-skips`` leaves them;
- ``--widen`` restores upstream's wider grid where the ROCm-era copy narrowed it: dtype
  fp16 -> (fp16, bf16), local [False] -> [False, True], softcap [0.0] -> [0.0, 50.0],
  kvpacked [False] -> [True, False];
- ``--race-iters N`` shortens test_flash_attn_race_condition's 250-iteration loop (CPU time).

and, without touching the text, a generated conftest.py makes ``torch.cuda.get_device_capability``
answer (8, 0) (so every backward check runs, as on an A100) and ``get_device_properties`` answer
this host's memory, sets ``torch.set_num_threads``, samples about one case in N by a hash of its
node id (``--sample N --offset K``, see ``sample``) and records each case's outcome for the summary table (after every
case: a run cut short by a timeout still reports the cases it finished). A case is *failed*
when FA's assertion fails and an *error* when anything raises (setup included).

Cost on CPU is FA's reference, not gptfast: the ``pt`` path runs fp16 einsums, which PyTorch's CPU
matmul does at ~0.5 GFLOP/s on one core (95 s for one 4x6x2048x2048x256 product), so the
seqlen-2048, d-256 cases take ~10 min each; sample the large functions.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

FUNCTIONS = (
    "test_flash_attn_qkvpacked",
    "test_flash_attn_output",
    "test_flash_attn_causal",
    "test_flash_attn_splitkv",
    "test_flash_attn_race_condition",
    "test_flash_attn_deterministic",
    "test_flash_attn_bwd_overflow",
    "test_flash_attn_bwd_transpose",
    "test_flash_attn_varlen_qkvpacked",
    "test_flash_attn_varlen_output",
    "test_flash_attn_varlen_causal",
    "test_flash_attn_varlen_deterministic",
    "test_flash_attn_bwd_varlen_overflow",
    "test_flash_attn_kvcache",
)

# --------------------------------------------------------------------------- the flash_attn shim
# Small own implementations of what the test file imports besides gptfast's functions.


def get_block_size_n(device, head_dim: int, is_dropout: bool, is_causal: bool) -> int:
    """Column-block width with which FA's test re-normalises S_dmask (normalize_flash_attn_S:
    block j times exp(m_j - lse), m_j the max of the scores in blocks j..; FA's kernel stores
    exp(s - m_j) block by block). The shim's S_dmask (``_fa_probs``) is in that layout with one
    block spanning the row, so this is wider than any row."""
    return 1 << 30


def _fa_probs(fn):
    """gptfast's function with ``return_attn_probs`` S_dmask turned from gptfast's layout (the
    probabilities exp(s - lse), dropped entries negated) into FlashAttention's with one column
    block: exp(s - m), m the row's max score, i.e. each row divided by its largest magnitude
    (exp(m - lse)); signs kept. What FA's tests then compute from it is gptfast's probabilities."""
    import functools

    @functools.wraps(fn)
    def call(*args, **kwargs):
        res = fn(*args, **kwargs)
        if not (isinstance(res, tuple) and len(res) == 3):
            return res
        out, lse, probs = res
        peak = probs.abs().amax(dim=-1, keepdim=True)
        return out, lse, torch.where(peak > 0, probs / torch.where(peak > 0, peak, 1.0), probs)
    return call


def _gptfast_functions():
    import gptfast.flash_attn_interface as fai
    return {name: _fa_probs(getattr(fai, name)) for name in (
        "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
        "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func")} | {
        "flash_attn_with_kvcache": fai.flash_attn_with_kvcache}


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0,
                     cu_seqlens=None, max_seqlen=None):
    """Rotary embedding on the first 2*cos.shape[1] channels of x: halves rotated (GPT-NeoX) or,
    ``interleaved``, adjacent pairs (GPT-J), in fp32, the other channels passed through. x is
    (batch, seqlen, nheads, d), or with ``cu_seqlens`` (batch + 1,) packed (total, nheads, d);
    token t of sequence b sits at position t + seqlen_offsets (an int or a (batch,) tensor).
    ``max_seqlen`` (FA sizes its grid with it) is not needed."""
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=x.device, dtype=torch.long)
        lengths = cu[1:] - cu[:-1]
        seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths)
        pos = torch.arange(x.shape[0], device=x.device) - cu[seq]  # (total,) within each sequence
        if isinstance(seqlen_offsets, torch.Tensor):
            pos = pos + seqlen_offsets.to(device=x.device, dtype=torch.long)[seq]
        else:
            pos = pos + int(seqlen_offsets)
        out = _rotate(x.unsqueeze(0), cos, sin, pos.unsqueeze(0), interleaved)[0]
    else:
        batch, seqlen = x.shape[:2]
        pos = torch.arange(seqlen, device=x.device).unsqueeze(0)
        off = seqlen_offsets if isinstance(seqlen_offsets, int) else seqlen_offsets.to(torch.long).view(-1, 1)
        out = _rotate(x, cos, sin, (pos + off).expand(batch, seqlen), interleaved)
    if inplace:
        x.copy_(out)
        return x
    return out


def _rotate(x, cos, sin, pos, interleaved):
    """x (batch, seqlen, nheads, d) rotated at positions ``pos`` (batch, seqlen)."""
    rot = 2 * cos.shape[-1]
    c = cos[pos].unsqueeze(2).float()  # (batch, seqlen, 1, rot/2)
    s = sin[pos].unsqueeze(2).float()
    xr = x[..., :rot].float()
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]
        turned = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    else:
        a, b = xr[..., : rot // 2], xr[..., rot // 2:]
        turned = torch.cat((a * c - b * s, a * s + b * c), dim=-1)
    return torch.cat((turned.to(x.dtype), x[..., rot:]), dim=-1)


# Each generated module re-exports from this file, copied next to them as _fa_runner.py.
_SHIM = {
    "flash_attn/__init__.py": (
        "from _fa_runner import _gptfast_functions\n"
        "globals().update(_gptfast_functions())  # gptfast.flash_attn_interface, S_dmask in FA's layout\n"
        "__all__ = sorted(_gptfast_functions())\n"
        "__version__ = '2.8.0+gptfast-shim'\n"
    ),
    "flash_attn/flash_attn_interface.py": (
        "from flash_attn import *  # noqa: F401,F403\n"
        "from _fa_runner import get_block_size_n as _get_block_size_n  # noqa: F401\n"
    ),
    "flash_attn/bert_padding.py": "from gptfast.ops.varlen import pad_input, unpad_input  # noqa: F401\n",
    "flash_attn/layers/__init__.py": "",
    "flash_attn/layers/rotary.py": "from _fa_runner import apply_rotary_emb  # noqa: F401\n",
    "flash_attn/flash_attn_triton_amd/__init__.py": "",
    "flash_attn/flash_attn_triton_amd/utils.py": (
        "USE_TRITON_ROCM = False\n\n\ndef is_rdna():\n    return False\n"
    ),
}

_CONFTEST = '''\
"""Generated by bench/fa_tests.py: CUDA queries answered for the CPU, sampling, outcome log."""
import json, os, time
from types import SimpleNamespace

import pytest
import torch

import _fa_runner

torch.set_num_threads(int(os.environ["FA_TESTS_THREADS"]))
_CAP = (8, 0)
torch.cuda.get_device_capability = lambda device=None: _CAP
torch.cuda.get_device_properties = lambda device=None: SimpleNamespace(
    name="cpu", major=_CAP[0], minor=_CAP[1], total_memory=_fa_runner.host_memory())
_LOG = {"collected": {}, "selected": {}, "cases": {}}


def pytest_collection_modifyitems(session, config, items):
    wanted = set(os.environ["FA_TESTS_FUNCTIONS"].split(","))
    items[:] = [it for it in items if it.originalname in wanted]
    every, offset = int(os.environ["FA_TESTS_SAMPLE"]), int(os.environ["FA_TESTS_OFFSET"])
    keep = set()
    for fn in sorted(wanted):
        ids = [it.nodeid for it in items if it.originalname == fn]
        if ids:
            _LOG["collected"][fn] = len(ids)
            chosen = _fa_runner.sample(ids, every, offset)
            _LOG["selected"][fn] = len(chosen)
            keep.update(chosen)
    items[:] = sorted((it for it in items if it.nodeid in keep), key=lambda it: it.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    case = _LOG["cases"].setdefault(item.nodeid, {"function": item.originalname, "outcome": "passed",
                                                   "seconds": 0.0, "message": ""})
    case["seconds"] += call.duration
    if report.skipped:
        case["outcome"] = "skipped"
    elif report.failed:
        assertion = call.excinfo is not None and call.excinfo.errisinstance(AssertionError)
        case["outcome"] = "failed" if (assertion and call.when == "call") else "error"
        case["message"] = str(call.excinfo.value)[:300] if call.excinfo is not None else ""
        case["message"] = (call.excinfo.typename + ": " if call.excinfo is not None else "") + case["message"]
    return report


def _dump():
    with open(os.environ["FA_TESTS_LOG"], "w") as f:
        json.dump(_LOG, f, indent=1)


def pytest_runtest_logfinish(nodeid, location):
    _dump()  # after every case, so that a run stopped by a timeout still reports what it ran


def pytest_sessionfinish(session):
    _dump()
'''


def host_memory() -> int:
    """Physical memory of this host in bytes (FA skips seqlen-2048 cases below 16 GiB)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def sample(nodeids, every: int, offset: int = 0) -> list[str]:
    """The cases whose crc32(node id) % ``every`` == ``offset``, sorted: about one in ``every``, the
    same ones on every machine and run, independent of collection order, and the residues partition
    the cases. A hash, not every N-th by sorted id: that aliases with the parameter grid (N = 40 over
    ids whose last two parameters take 4 combinations only ever picks one of the four)."""
    if every < 1 or not 0 <= offset < every:
        raise ValueError(f"sample: need every >= 1 and 0 <= offset < every, got {every}, {offset}")
    return sorted(n for n in nodeids if zlib.crc32(n.encode()) % every == offset)


# --------------------------------------------------------------------------- rewriting FA's file

_WIDEN = (
    (re.compile(r'^@pytest\.mark\.parametrize\("dtype", \(?\[torch\.float16\]\)?\)$', re.M),
     '@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])'),
    (re.compile(r'^@pytest\.mark\.parametrize\("local", \[False\]\)$', re.M),
     '@pytest.mark.parametrize("local", [False, True])'),
    (re.compile(r'^@pytest\.mark\.parametrize\("softcap", \[0\.0\]\)$', re.M),
     '@pytest.mark.parametrize("softcap", [0.0, 50.0])'),
    (re.compile(r'^@pytest\.mark\.parametrize\("kvpacked", \[False\]\)$', re.M),
     '@pytest.mark.parametrize("kvpacked", [True, False])'),
)


def rewrite(source: str, keep_skips: bool = False, widen: bool = False,
            race_iters: int | None = None) -> tuple[str, list[tuple[str, int]]]:
    """FA's test source made to run on the CPU; returns (text, [(what, how many replaced)])."""
    steps = []
    source, n = re.subn(r'device(\s*)=(\s*)(["\'])cuda\3', r'device\1=\2\3cpu\3', source)
    steps.append(('device="cuda" -> "cpu"', n))
    if not keep_skips:
        source, n = re.subn(r'^@pytest\.mark\.skip\(\)[ \t]*\n', "", source, flags=re.M)
        steps.append(("bare @pytest.mark.skip() removed", n))
    if widen:
        for pattern, repl in _WIDEN:
            source, n = pattern.subn(repl, source)
            steps.append((f"widen: {repl}", n))
    if race_iters is not None:
        source, n = re.subn(r"for i in range\(250\):", f"for i in range({int(race_iters)}):", source)
        steps.append((f"race_condition iterations 250 -> {race_iters}", n))
    return source, steps


def build(workdir: Path, fa_test: Path, **rewrite_args) -> list[tuple[str, int]]:
    """Write the shim package, conftest.py, pytest.ini and the rewritten test file into ``workdir``."""
    for rel, text in _SHIM.items():
        path = workdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    shutil.copyfile(Path(__file__), workdir / "_fa_runner.py")
    (workdir / "conftest.py").write_text(_CONFTEST)
    # an own ini so the repository's pytest configuration (testpaths, conftest) stays out of it
    (workdir / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    text, steps = rewrite(fa_test.read_text(), **rewrite_args)
    (workdir / "test_flash_attn.py").write_text(text)
    return steps


def summarise(log: dict) -> list[dict]:
    rows = []
    for fn in FUNCTIONS:
        if fn not in log["collected"]:
            continue
        cases = [c for c in log["cases"].values() if c["function"] == fn]
        count = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "error", "skipped")}
        rows.append({"function": fn, "collected": log["collected"][fn], "run": len(cases), **count,
                     "seconds": round(sum(c["seconds"] for c in cases), 1)})
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ("function", "collected", "run", "passed", "failed", "error", "skipped", "seconds")
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c) for c in cols]
    line = lambda vals: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                                  for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(cols)] + [line([r[c] for c in cols]) for r in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("fa_test", type=Path, help="path to FlashAttention's tests/test_flash_attn.py")
    parser.add_argument("--functions", default=",".join(FUNCTIONS),
                        help="comma-separated test functions (default: all of FUNCTIONS)")
    parser.add_argument("--backend", default="cpu", help="gptfast backend (GPTFAST_BACKEND), default cpu")
    parser.add_argument("--sample", type=int, default=1, help="run about one case in N (by a hash of the node id)")
    parser.add_argument("--offset", type=int, default=0, help="which of the N residues to run (0..N-1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS)")
    parser.add_argument("--collect-only", action="store_true", help="count the cases, run none")
    parser.add_argument("--keep-skips", action="store_true", help="keep bare @pytest.mark.skip() marks")
    parser.add_argument("--widen", action="store_true", help="upstream's dtype/local/softcap grid")
    parser.add_argument("--race-iters", type=int, default=None, help="race_condition loop length")
    parser.add_argument("--json", type=Path, default=None, help="also write the per-case log here")
    parser.add_argument("--workdir", type=Path, default=None, help="build here instead of a temp dir")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    if not args.fa_test.is_file():
        parser.error(f"{args.fa_test}: no such file (FA's test file is not bundled; see --help)")
    functions = [f.strip() for f in args.functions.split(",") if f.strip()]
    unknown = sorted(set(functions) - set(FUNCTIONS))
    if unknown:
        parser.error(f"--functions: unknown {unknown}; choose from {list(FUNCTIONS)}")
    if not (args.sample >= 1 and 0 <= args.offset < args.sample):
        parser.error("--sample must be >= 1 and 0 <= --offset < --sample")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gptfast-fa-tests-"))
    workdir.mkdir(parents=True, exist_ok=True)
    steps = build(workdir, args.fa_test, keep_skips=args.keep_skips, widen=args.widen,
                  race_iters=args.race_iters)
    for what, n in steps:
        print(f"rewrite: {what}: {n}")
    log_path = workdir / "fa_tests_log.json"
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, GPTFAST_BACKEND=args.backend, OMP_NUM_THREADS=str(args.threads),
               FA_TESTS_THREADS=str(args.threads), FA_TESTS_FUNCTIONS=",".join(functions),
               FA_TESTS_SAMPLE=str(args.sample), FA_TESTS_OFFSET=str(args.offset),
               FA_TESTS_LOG=str(log_path),
               PYTHONPATH=os.pathsep.join([str(workdir), str(repo), os.environ.get("PYTHONPATH", "")]))
    # name the functions, so that pytest parametrizes only them (the whole file is ~470k cases:
    # minutes of collection on 2 cores); one the file lacks is reported, not passed
    text = (workdir / "test_flash_attn.py").read_text()
    present = [f for f in functions if re.search(rf"^def {f}\(", text, re.M)]
    for f in sorted(set(functions) - set(present)):
        print(f"not in {args.fa_test}: {f}")
    if not present:
        print("none of the requested functions is in the file")
        return 1
    cmd = [sys.executable, "-m", "pytest", *(f"test_flash_attn.py::{f}" for f in present),
           "-q", "--tb=short", "-rN"]
    cmd += ["--collect-only"] if args.collect_only else []
    cmd += args.pytest_args
    print(f"backend={args.backend} sample=every {args.sample} (offset {args.offset}) workdir={workdir}")
    start = time.time()
    proc = subprocess.run(cmd, cwd=workdir, env=env,
                          stdout=subprocess.DEVNULL if args.collect_only else None)
    wall = time.time() - start
    if not log_path.exists():
        print(f"pytest exited {proc.returncode} without a log (import or collection error)")
        return proc.returncode or 1
    log = json.loads(log_path.read_text())
    if args.json:
        args.json.write_text(json.dumps(log, indent=1))
    rows = summarise(log)
    if args.collect_only:  # nothing ran: report what would
        for r in rows:
            r["run"] = log["selected"][r["function"]]
    print(format_table(rows))
    print(f"wall {wall:.0f} s")
    for nodeid, case in sorted(log["cases"].items()):
        if case["outcome"] in ("failed", "error"):
            print(f"{case['outcome'].upper()} {nodeid}: {case['message'][:200]}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
