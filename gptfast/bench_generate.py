"""``gptfast bench generate``: greedy decoding speed with the KV cache, without it, and Hugging Face's.

For each size ``PRESET,BATCH,CTX[,NEW]`` (a GPT preset with random weights, a random prompt of CTX
tokens per row, NEW generated tokens; the preset's block_size is raised to CTX + NEW when smaller,
which only lengthens the position table) the same weights run:

- ``<backend>+cache``: ``GPT.generate(use_cache=True)`` on a gptfast backend: one prefill through
  attention, then every token through ``flash_attn_with_kvcache`` on a preallocated cache;
- ``<backend>``: ``GPT.generate(use_cache=False)``: every token re-runs the whole context;
- ``hf``: Hugging Face ``GPT2LMHeadModel`` (SDPA attention, its own DynamicCache) built from the
  same config and weights, ``generate(do_sample=False, use_cache=True)``, no gptfast op.

Timing: what ``generate`` runs, split in its two parts and timed apart (after a warm-up):
the prefill (cache allocation + the prompt's forward; without a cache, the prompt's forward) and
each decoding step at context CTX .. CTX + NEW - 2 (with the cache, one token's forward against
it; without, the forward of the whole context; HF: its model call with its DynamicCache). Prefill
tokens/s = BATCH * CTX / median prefill; decode tokens/s = BATCH / median step, over ``--repeats``
prefills each followed by NEW - 1 steps (medians: robust to a shared machine's bursts). Sampling
(argmax) is left out of both: it is the same for every path. Ratios are against ``<backend>`` (no cache) and ``hf`` from
the same run. ``match`` says whether the greedy tokens equal the gptfast no-cache run's (a cache
must not change the answer; for ``hf``, the same weights in another code base); a mismatch is
reported with the first differing step, since a near-tie in random-weight logits can flip under
different summation orders.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["run_generate", "parse_generate_size", "default_generate_sizes"]


@dataclass
class GenRow:
    size: str
    path: str
    status: str = "ok"
    prefill_ms: float | None = None
    prefill_tok_s: float | None = None
    decode_ms_per_token: float | None = None
    decode_tok_s: float | None = None
    x_nocache: float | None = None
    x_hf: float | None = None
    match: str = ""
    error: str = ""


def parse_generate_size(spec: str) -> dict:
    from .bench import BenchError
    from .model import PRESETS
    parts = spec.split(",")
    try:
        nums = [int(p) for p in parts[1:]]
    except ValueError:
        nums = []
    if parts[0] not in PRESETS or len(nums) not in (2, 3) or any(n <= 0 for n in nums):
        raise BenchError(f"--sizes: {spec!r} is not PRESET,BATCH,CTX[,NEW] (generate) with PRESET in "
                         f"{sorted(PRESETS)}")
    new = nums[2] if len(nums) == 3 else 32
    if new < 2:
        raise BenchError(f"--sizes: {spec!r}: NEW must be >= 2 (one warm-up step, then timed ones)")
    return dict(preset=parts[0], batch=nums[0], ctx=nums[1], new=new)


def default_generate_sizes(device: str) -> list[dict]:
    """CPU: the small preset at context 128..1024; GPU: GPT-2 124M at 1k..8k."""
    if device == "cuda":
        return [dict(preset="gpt2", batch=1, ctx=c, new=64) for c in (1024, 2048, 4096, 8192)]
    return [dict(preset="small", batch=1, ctx=c, new=32) for c in (128, 256, 512, 1024)]


def _label(p: dict) -> str:
    return f"{p['preset']} {p['batch']}x{p['ctx']}+{p['new']}"


def _gpt(p: dict, device, dtype):
    from .model import GPT, GPTConfig
    base = GPTConfig.from_preset(p["preset"])
    config = GPTConfig.from_preset(p["preset"], dropout=0.0,
                                   block_size=max(base.block_size, p["ctx"] + p["new"]))
    torch.manual_seed(0)
    return GPT(config).to(device=device, dtype=dtype).eval()


def hf_gpt2_from(model):
    """A Hugging Face GPT2LMHeadModel (SDPA) with a gptfast GPT's config and weights (Conv1D
    weights are (in, out): nn.Linear's transposed)."""
    import transformers
    c = model.config
    if c.n_kv_head not in (None, c.n_head):
        raise NotImplementedError("hf: GPT-2 has no grouped-query attention (n_kv_head)")
    cfg = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                  n_layer=c.n_layer, n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, activation_function="gelu_new" if c.gelu_approximate == "tanh"
                                  else "gelu", bos_token_id=0, eos_token_id=None, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    w = model.lm_head.weight
    hf = transformers.GPT2LMHeadModel(cfg).to(device=w.device, dtype=w.dtype).eval()
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith(".weight") and any(s in k for s in (".c_attn.", ".c_proj.", ".c_fc.")):
            v = v.t()
        state[k] = v
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith(".attn.bias") and not k.endswith(".masked_bias") for k in missing):
        raise RuntimeError(f"hf: weights did not map: missing {missing}, unexpected {unexpected}")
    return hf


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape == b.shape and torch.equal(a, b):
        return "yes"
    diff = (a != b).any(dim=0).nonzero()
    return f"no (step {int(diff[0]) if len(diff) else '?'})"


def _measure(prefill, step, p, device, repeats) -> GenRow:
    """Median prefill time over ``repeats`` prefills (after a warm-up), and the median of the
    ``repeats * (NEW - 1)`` decoding steps that follow them: per-step medians, so that a burst of
    load on a shared machine moves one sample, not the result."""
    b, ctx, new = p["batch"], p["ctx"], p["new"]
    state = prefill()
    step(state, 0)  # warm-up: allocations, autotuning, the first decode shape
    prefills, steps = [], []
    for _ in range(repeats):
        t, state = _timed(prefill, device)
        prefills.append(t)
        for i in range(new - 1):
            steps.append(_timed(lambda: step(state, i), device)[0])
    row = GenRow(size=_label(p), path="")
    t1, ts = statistics.median(prefills), statistics.median(steps)
    row.prefill_ms, row.prefill_tok_s = t1 * 1e3, b * ctx / t1
    row.decode_ms_per_token, row.decode_tok_s = ts * 1e3, b / ts
    return row


def _paths(model, prompt, p, name):
    """(prefill, step, generate) for a path: what GPT.generate / HF generate run, split in two."""
    import gptfast
    b, ctx, new = p["batch"], p["ctx"], p["new"]
    g = torch.Generator().manual_seed(2)
    rest = torch.randint(0, model.config.vocab_size, (b, new), generator=g).to(prompt.device)
    seq = torch.cat((prompt, rest), dim=1)  # the tokens decoding steps feed in (timing only)
    if name == "hf":
        from transformers import DynamicCache
        hf = hf_gpt2_from(model)

        def prefill():
            return hf(prompt, past_key_values=DynamicCache(), use_cache=True).past_key_values

        def step(cache, i):
            hf(seq[:, ctx + i:ctx + i + 1], past_key_values=cache, use_cache=True)

        def generate(n):
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, use_cache=True, pad_token_id=0)
        return prefill, step, generate
    backend, cached = name.split("+")[0], name.endswith("+cache")

    def prefill():
        with gptfast.use_backend(backend):
            if not cached:
                return model(prompt)[0]
            cache = model.kv_cache(b, ctx + new)
            model.forward_cached(prompt, cache, 0)
            return cache

    def step(cache, i):
        with gptfast.use_backend(backend):
            if cached:
                model.forward_cached(seq[:, ctx + i:ctx + i + 1], cache, ctx + i)
            else:
                model(seq[:, :ctx + i + 1])

    def generate(n):
        with gptfast.use_backend(backend):
            return model.generate(prompt, n, temperature=0.0, use_cache=cached)
    return prefill, step, generate


def run_size(p: dict, backends: list[str], device, dtype, repeats: int) -> list[GenRow]:
    rows: list[GenRow] = []
    model = _gpt(p, device, dtype)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (p["batch"], p["ctx"]), generator=g).to(device)
    tokens = {}
    for name in backends:
        for path in (["hf"] if name == "hf" else [f"{name}+cache", name]):
            try:
                with torch.no_grad():
                    prefill, step, generate = _paths(model, prompt, p, path)
                    row = _measure(prefill, step, p, device, repeats)
                    tokens[path] = generate(p["new"])[:, p["ctx"]:]
                row.path = path
            except Exception as exc:  # one failing path must not hide the others' numbers
                row = GenRow(size=_label(p), path=path, status="ERROR", error=f"{type(exc).__name__}: {exc}"[:160])
            rows.append(row)
    for r in rows:
        if r.status != "ok":
            continue
        name = r.path.split("+")[0]
        if r.path == "hf":  # against the first gptfast no-cache run: the same weights, another code base
            name = next((b for b in backends if b != "hf" and b in tokens), None)
            if name is not None:
                r.match = _first_difference(tokens["hf"], tokens[name])
            continue
        base = next((x for x in rows if x.path == name and x.status == "ok"), None)
        hf = next((x for x in rows if x.path == "hf" and x.status == "ok"), None)
        if base is not None:
            r.x_nocache = r.decode_tok_s / base.decode_tok_s
            if r.path != name and name in tokens:
                r.match = _first_difference(tokens[r.path], tokens[name])
        if hf is not None:
            r.x_hf = r.decode_tok_s / hf.decode_tok_s
    return rows


def _fmt(v, digits=3):
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"


def format_table(rows: list[GenRow]) -> str:
    head = ["size", "path", "status", "prefill ms", "prefill tok/s", "decode ms/tok", "decode tok/s",
            "x no-cache", "x hf", "match", "note"]
    body = [[r.size, r.path, r.status, _fmt(r.prefill_ms), _fmt(r.prefill_tok_s), _fmt(r.decode_ms_per_token),
             _fmt(r.decode_tok_s), _fmt(r.x_nocache), _fmt(r.x_hf), r.match, r.error] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head] + [
        ["-" * w for w in widths]] + body]
    return "\n".join(lines)


def run_generate(args, command: str) -> int:
    from tqdm import tqdm

    from .bench import DTYPE_NAMES, BenchError, _resolve, machine_info
    from .ops._backend import BACKENDS, available_backends
    device, dtype = _resolve(args)
    sizes = ([parse_generate_size(s) for item in args.sizes for s in item.replace(";", " ").split()]
             if args.sizes else default_generate_sizes(device.type))
    if args.backends:
        backends = [b.strip().lower() for b in args.backends.split(",") if b.strip()]
        bad = [b for b in backends if b not in BACKENDS + ("hf",)]
        if bad:
            raise BenchError(f"--backends: generate takes gptfast backends and 'hf', not {bad}")
    else:
        avail = [b for b in available_backends("attention", device.type) if b != "reference"]
        backends = avail[:1] + (["hf"] if _has_transformers() else [])
    repeats = max(1, int(getattr(args, "repeats", None) or 3))
    if args.dry_run:
        print(f"gptfast bench generate (dry run): device {device.type}, dtype {DTYPE_NAMES[dtype]}, "
              f"paths {', '.join(p for b in backends for p in ((b,) if b == 'hf' else (b + '+cache', b)))}; "
              f"sizes {', '.join(_label(p) for p in sizes)}; median of {repeats} timings")
        return 0
    info = machine_info(device)
    rows: list[GenRow] = []
    for p in tqdm(sizes, desc="bench generate", unit="size", file=sys.stderr, disable=not sys.stderr.isatty()):
        rows += run_size(p, backends, device, dtype, repeats)
        if not sys.stderr.isatty():
            print(f"bench generate: {_label(p)} done", file=sys.stderr, flush=True)
    header = (f"gptfast bench generate: {info['gpu'] or info['cpu']}, {info['torch_threads']} threads, "
              f"{DTYPE_NAMES[dtype]}, torch {torch.__version__}, {info['date']}\n"
              "greedy decoding of random-weight GPTs on a random prompt; prefill = the prompt's forward "
              "(+ cache allocation), decode = one step's forward at context CTX..CTX+NEW-2; medians over "
              f"{repeats} prefills, each followed by NEW-1 steps; x no-cache / x hf = decode tok/s over that path's (> 1 is faster); "
              "match = same tokens as the no-cache run")
    table = format_table(rows)
    print(header)
    print(table)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "generate.txt").write_text(header + "\n" + table + "\n")
        (out / "generate.json").write_text(json.dumps(
            {"command": command, "machine": info, "dtype": DTYPE_NAMES[dtype], "repeats": repeats,
             "rows": [asdict(r) for r in rows]}, indent=1, default=str))
        print(f"wrote {out / 'generate.txt'}, generate.json")
    return 1 if any(r.status != "ok" for r in rows) else 0


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True
