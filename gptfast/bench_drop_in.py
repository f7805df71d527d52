"""``gptfast bench drop_in``: training-step time of Hugging Face decoders, patched vs unpatched.

For each family (``--sizes``: any of :data:`FAMILIES`, default all 13) one model is built from a
config with random weights (:func:`family_config`, ``size="bench"``: hidden 256, 4 layers, 4 heads,
FFN 1024, vocab 2048; dropout off) and deep-copied; the copy is ``gptfast.patch``-ed (backend
``--backends``' first entry, default auto). A training step is forward on a random (BATCH, SEQLEN)
= (4, 256) batch with the labels, backward and an AdamW step. Steps of the two models alternate
(after two warm-up steps each), ``--repeats`` times (default 5), and the medians are compared:
``x unpatched`` = unpatched median / patched median (> 1: patched is faster). Under ``--dtype
bf16`` both run under CPU/CUDA autocast. The table also says what gptfast runs in each family
(``gptfast.patch``'s report: patched norm / attention / MLP counts and what was left alone).
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from collections import Counter

import torch

__all__ = ["FAMILIES", "family_config", "run_drop_in"]

FAMILIES = ("gpt2", "gpt_neo", "gptj", "gpt_neox", "phi", "gpt_bigcode", "bloom", "opt", "falcon",
            "llama", "mistral", "qwen2", "gemma2")
_DROPOUTS = ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_dropout", "dropout",
             "activation_dropout", "resid_dropout", "embed_dropout", "summary_first_dropout")
_SIZES = {"test": dict(hidden=32, layers=2, heads=4, ffn=64, vocab=61, positions=64, window=5),
          "bench": dict(hidden=256, layers=4, heads=4, ffn=1024, vocab=2048, positions=512, window=128)}


def family_config(family: str, size: str = "test", dropout: bool = False):
    """A transformers config of ``family`` at ``size`` ("test": tiny, for tests; "bench"): GPT-Neo
    alternates global and local layers, Mistral and Gemma-2 have a sliding window shorter than the
    benchmark's sequence, Llama/Qwen2/Phi use GQA, Mistral and GPTBigCode MQA; dropouts 0 unless
    ``dropout``."""
    import transformers as T
    s = _SIZES[size]
    h, n, heads, ffn = s["hidden"], s["layers"], s["heads"], s["ffn"]
    small = dict(vocab_size=s["vocab"], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    gpt = dict(n_embd=h, n_layer=n, n_head=heads, n_positions=s["positions"], **small)
    hf = dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, max_position_embeddings=s["positions"],
              **small)
    head_dim = h // heads
    make = {
        "gpt2": lambda: T.GPT2Config(**gpt),
        "gpt_neo": lambda: T.GPTNeoConfig(hidden_size=h, num_layers=n, num_heads=heads, window_size=s["window"],
                                          attention_types=[[["global", "local"], n // 2]],
                                          max_position_embeddings=s["positions"], **small),
        "gptj": lambda: T.GPTJConfig(rotary_dim=head_dim // 2, n_inner=ffn, **gpt),
        "gpt_neox": lambda: T.GPTNeoXConfig(intermediate_size=ffn, **hf),
        "phi": lambda: T.PhiConfig(intermediate_size=ffn, num_key_value_heads=heads // 2, **hf),
        "gpt_bigcode": lambda: T.GPTBigCodeConfig(multi_query=True, n_inner=ffn, **gpt),
        "bloom": lambda: T.BloomConfig(hidden_size=h, n_layer=n, n_head=heads, **small),
        "opt": lambda: T.OPTConfig(ffn_dim=ffn, word_embed_proj_dim=h, activation_function="gelu", **hf),
        "falcon": lambda: T.FalconConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, **small),
        "llama": lambda: T.LlamaConfig(intermediate_size=ffn, num_key_value_heads=heads // 2, **hf),
        "mistral": lambda: T.MistralConfig(intermediate_size=ffn, num_key_value_heads=1, sliding_window=s["window"],
                                           **hf),
        "qwen2": lambda: T.Qwen2Config(intermediate_size=ffn, num_key_value_heads=heads // 2, **hf),
        "gemma2": lambda: T.Gemma2Config(intermediate_size=ffn, num_key_value_heads=heads // 2, head_dim=head_dim,
                                         sliding_window=s["window"], **hf),
    }
    if family not in make:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    config = make[family]()
    if not dropout:
        for name in _DROPOUTS:
            if isinstance(getattr(config, name, None), float):
                setattr(config, name, 0.0)
    return config


def default_attn_implementation(family: str) -> str | None:
    """What the unpatched model runs: sdpa, eager for Gemma-2 (softcap), the model's own otherwise."""
    if family == "gemma2":
        return "eager"
    return None if family in ("gpt_neo", "bloom", "falcon") else "sdpa"


def build(family: str, size: str = "test", dropout: bool = False, seed: int = 0):
    import transformers as T
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(family_config(family, size, dropout),
                                              attn_implementation=default_attn_implementation(family))


def runs_on_gptfast(report) -> str:
    """'norm 5/5, attention 2/2, mlp 2/2'-style summary of a patch report, and what was left."""
    kinds = {"layer_norm": "norm", "rms_norm": "norm", "attention": "attention", "gelu_ffn": "mlp",
             "gated_ffn": "mlp"}
    total, done = Counter(), Counter()
    left = Counter()
    for e in report.entries:
        k = kinds.get(e.kind, e.kind)
        total[k] += 1
        if e.action == "patched":
            done[k] += 1
        else:
            left[f"{e.kind}: {e.reason[:60]}"] += 1
    ran = ", ".join(f"{k} {done[k]}/{total[k]}" for k in ("norm", "attention", "mlp") if total[k])
    return ran, "; ".join(f"{n}x {why}" for why, n in left.items())


def _step(model, idx, opt, amp):
    with torch.autocast(idx.device.type, dtype=amp, enabled=amp is not None):
        loss = model(idx, labels=idx).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def time_family(family: str, device, dtype, backend, repeats: int, batch=4, seqlen=256) -> dict:
    import gptfast
    plain = build(family, "bench").to(device).train()
    patched = copy.deepcopy(plain)
    report = gptfast.patch(patched, backend=backend)
    ran, left = runs_on_gptfast(report)
    amp = None if dtype == torch.float32 else dtype
    idx = torch.randint(3, plain.config.vocab_size, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    idx = idx.to(device)
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (plain, patched)}
    times = {plain: [], patched: []}
    for i in range(repeats + 2):
        for m in (plain, patched):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _step(m, idx, opts[m], amp)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times[m].append(time.perf_counter() - t0)
    a, b = statistics.median(times[plain]), statistics.median(times[patched])
    return {"family": family, "unpatched_ms": a * 1e3, "patched_ms": b * 1e3, "x_unpatched": a / b,
            "runs_on_gptfast": ran, "left": left, "status": "ok", "error": ""}


def format_table(rows: list[dict]) -> str:
    head = ("family", "unpatched ms", "patched ms", "x unpatched", "gptfast runs", "left alone")
    body = [(r["family"], f"{r['unpatched_ms']:.1f}" if r["status"] == "ok" else "-",
             f"{r['patched_ms']:.1f}" if r["status"] == "ok" else "-",
             f"{r['x_unpatched']:.2f}" if r["status"] == "ok" else r["error"][:40],
             r.get("runs_on_gptfast", ""), r.get("left", "")) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head) - 1)]
    lines = ["  ".join([*(str(x[i]).ljust(widths[i]) for i in range(len(widths))), str(x[-1])]).rstrip()
             for x in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  ----------")
    return "\n".join(lines)


def run_drop_in(args, command: str) -> int:
    from tqdm import tqdm

    from .bench import DTYPE_NAMES, BenchError, _resolve, machine_info, print_and_write
    device, dtype = _resolve(args)
    families = [s for item in (args.sizes or FAMILIES) for s in item.replace(";", " ").replace(",", " ").split()]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise BenchError(f"--sizes: drop_in takes family names {FAMILIES}, not {bad}")
    backend = args.backends.split(",")[0].strip() if args.backends else None
    repeats = max(1, int(getattr(args, "repeats", None) or 5))
    if args.dry_run:
        print(f"gptfast bench drop_in (dry run): device {device.type}, dtype {DTYPE_NAMES[dtype]}, "
              f"backend {backend or 'auto'}, families {', '.join(families)}; median of {repeats} steps each")
        return 0
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise BenchError("drop_in needs transformers: pip install 'gptfast[hf]'") from None
    info = machine_info(device)
    rows = []
    for family in tqdm(families, desc="bench drop_in", unit="model", file=sys.stderr, disable=not sys.stderr.isatty()):
        try:
            rows.append(time_family(family, device, dtype, backend, repeats))
        except Exception as exc:  # noqa: BLE001 -- one family's failure is a row, not the end of the run
            rows.append({"family": family, "status": "error", "error": f"{type(exc).__name__}: {exc}"})
        if not sys.stderr.isatty():
            print(f"bench drop_in: {family} done", file=sys.stderr, flush=True)
    header = (f"gptfast bench drop_in: {info['gpu'] or info['cpu']}, {info['torch_threads']} threads, "
              f"{DTYPE_NAMES[dtype]}, torch {torch.__version__}, transformers {transformers.__version__}, "
              f"{info['date']}\nHF decoders (hidden 256, 4 layers, 4 heads, FFN 1024, vocab 2048; random weights), "
              f"training step (forward + loss, backward, AdamW) on a (4, 256) batch; medians of {repeats} "
              "alternating steps; x unpatched = unpatched / patched time (> 1: patched is faster)")
    print_and_write(args.out, "drop_in", header, format_table(rows),
                    {"command": command, "machine": info, "dtype": DTYPE_NAMES[dtype], "repeats": repeats,
                     "backend": backend, "rows": rows})
    return 1 if any(r["status"] != "ok" for r in rows) else 0
