"""``gptfast bench`` on the CPU at tiny sizes: table, JSON, CSV and PNG output, wrong backends
reported as WRONG (not timed), the FLOP/byte formulas, and the GPU suite's Python parts as a dry run."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gptfast
from gptfast import bench
from gptfast.cli import main
from gptfast.ops import _backend

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--device", "cpu", "--min-run-time", "0.01"]
try:
    import matplotlib  # noqa: F401  (the `bench` extra; CI installs it)
    HAS_MPL = True
except ImportError:
    HAS_MPL = False


def assert_png(path: Path) -> None:
    """A real PNG when matplotlib is installed; otherwise no file (the bench says why)."""
    if not HAS_MPL:
        assert not path.exists()
        return
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG", path


def test_layer_norm_writes_table_json_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "res"
    main(["bench", "layer_norm", *FAST, "--sizes", "64,96", "128,160", "--backends", "reference,eager",
          "--fwd", "--bwd", "--out", str(out)])
    text = capsys.readouterr().out
    assert "GB/s counts fwd: read x, w, b + write y" in text  # bytes stated in the header
    lines = [ln for ln in text.splitlines() if ln.startswith(("64x96", "128x160"))]
    assert len(lines) == 2 * 2 * 2  # sizes x backends x phases
    assert all(" ok " in ln for ln in lines)
    data = json.loads((out / "results.json").read_text())
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["cpu"]
    assert data["commands"] and data["commands"][0].startswith("gptfast bench layer_norm")
    rows = data["rows"]
    assert {(r["size"], r["backend"], r["phase"]) for r in rows} == {
        (s, b, p) for s in ("64x96", "128x160") for b in ("reference", "eager") for p in ("fwd", "bwd")}
    for r in rows:
        assert r["status"] == "ok" and r["ms"] > 0 and r["gbps"] > 0
        assert r["timing"] == "torch.utils.benchmark median"
    eager = [r for r in rows if r["backend"] == "eager"]
    assert all(abs(r["vs_eager"] - 1.0) < 1e-12 for r in eager)
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    for phase in ("fwd", "bwd"):
        assert_png(out / f"layer_norm_{phase}.png")


def test_results_of_several_ops_merge_into_one_folder(tmp_path, capsys):
    out = tmp_path / "res"
    main(["bench", "gelu_ffn", *FAST, "--sizes", "16,8", "--backends", "eager", "--out", str(out)])
    main(["bench", "attention", *FAST, "--sizes", "1,16,2,8", "--causal", "--backends", "reference,eager",
          "--fwd-bwd", "--out", str(out)])
    text = capsys.readouterr().out
    assert "TFLOP/s = 4*B*H*T^2*D" in text
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["op"] for r in rows} == {"gelu_ffn", "attention"}
    att = [r for r in rows if r["op"] == "attention"]
    assert {r["causal"] for r in att} == {"true"} and all(r["tflops"] > 0 for r in att)
    assert_png(out / "attention_fwd-bwd.png")
    assert_png(out / "gelu_ffn_fwd-bwd.png")


def test_a_wrong_backend_is_reported_as_wrong_and_not_timed(tmp_path, capsys, monkeypatch):
    real = _backend.resolve("layer_norm", torch.device("cpu"), torch.float32, "reference")

    def garbage_fwd(x, weight, bias, eps):
        y, mean, rstd = real.fwd(x, weight, bias, eps)
        return y + 1e-2, mean, rstd

    monkeypatch.setitem(_backend._LOADED, ("layer_norm", "reference"),
                        _backend.Launchers("reference", garbage_fwd, real.bwd))
    out = tmp_path / "res"
    with pytest.raises(SystemExit) as exc:
        main(["bench", "layer_norm", *FAST, "--sizes", "32,64", "--backends", "reference,eager",
              "--out", str(out)])
    assert exc.value.code == 1  # a WRONG row fails the command
    text = capsys.readouterr().out
    wrong = next(ln for ln in text.splitlines() if " reference " in ln)
    assert "WRONG" in wrong and "out: max |out - ref| = 1.000e-02" in wrong  # 1e-2 >> fp32 rounding
    rows = {r["backend"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["reference"]["status"] == "WRONG" and rows["reference"]["ms"] is None
    assert "exceeds" in rows["reference"]["error"] or "mismatch" in rows["reference"]["error"]
    assert rows["eager"]["status"] == "ok" and rows["eager"]["ms"] > 0


def test_wrong_gradient_is_caught_too():
    case = bench.Case("gelu_ffn", dict(M=8, C=16, Hd=32))

    def bad(x, w1, b1, w2, b2):  # right output, gradient of x scaled by 1.5
        out = bench.gelu_ffn_eager(x, w1, b1, w2, b2)
        return out + 0.5 * (bench.gelu_ffn_eager(x, w1, b1, w2, b2) - bench.gelu_ffn_eager(
            x.detach(), w1, b1, w2, b2))

    with pytest.raises(AssertionError, match="grad\\[0\\]"):
        bench.check_case(case, bad, torch.device("cpu"), torch.float32, backward=True)
    bench.check_case(case, bad, torch.device("cpu"), torch.float32, backward=False)  # forward is right


def test_attention_options_are_checked_and_timed(tmp_path, capsys):
    out = tmp_path / "res"
    main(["bench", "attention", *FAST, "--sizes", "2,48,4,16,2", "--causal", "--window", "8", "--softcap", "5",
          "--alibi", "--dropout", "0.2", "--backends", "cpu,eager", "--out", str(out)])
    rows = {r["backend"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"cpu", "eager"}
    for r in rows.values():
        assert r["status"] == "ok" and r["ms"] > 0 and r["size"] == "2x48x4x16 kv2 w8 softcap5 alibi drop0.2"
    assert rows["eager"]["checked_at"].endswith("without dropout")   # torch's RNG: checked without it
    assert "without dropout" not in rows["cpu"]["checked_at"]          # gptfast's mask: checked exactly
    # 4 B H D times the visible pairs of a causal 8-back window over 48 rows: 9 keys each, fewer at the top
    pairs = sum(min(i, 8) + 1 for i in range(48))
    assert bench.attention_visible_pairs(48, 48, (8, 0)) == pairs
    assert rows["cpu"]["tflops"] == pytest.approx(3.5 * 4 * 2 * 4 * pairs * 16 / (rows["cpu"]["ms"] * 1e9))


def test_attention_dropout_check_uses_the_exact_mask():
    case = bench.Case("attention", dict(B=1, T=24, H=2, D=8, dropout=0.3), causal=True)
    import gptfast

    def no_dropout(q, k, v):  # right everywhere except that nothing is dropped
        return gptfast.attention(q, k, v, causal=True, backend="cpu")

    with pytest.raises(AssertionError, match="out"):
        bench.check_case(case, no_dropout, torch.device("cpu"), torch.float32, backward=False)
    bench.check_case(case, case.gptfast_fn("cpu"), torch.device("cpu"), torch.float32, backward=True)
    # the eager baseline with softcap written out equals SDPA's path where both apply (no softcap)
    g = torch.Generator().manual_seed(0)
    q, k, v = case.make_inputs("cpu", torch.float64, g, dict(B=1, T=24, H=4, D=8, Hk=2))
    p = dict(window=5, alibi=True)
    keep = torch.ones(1, 4, 24, 24, dtype=torch.bool)
    torch.testing.assert_close(bench.attention_eager(q, k, v, False, p),
                               bench.attention_eager(q, k, v, False, p, keep))


def test_train_step_rows_have_tokens_per_second_and_mfu(tmp_path, capsys):
    out = tmp_path / "res"
    main(["bench", "train", *FAST, "--sizes", "tiny,2,16", "--backends", "reference,eager", "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["backend"] for r in rows] == ["reference", "eager"]
    for r in rows:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 5
    assert_png(out / "train.png")


def test_train_model_nanogpt_times_the_nanogpt_baselines(tmp_path, capsys):
    out = tmp_path / "res"
    main(["bench", "train", *FAST, "--model", "nanogpt", "--sizes", "tiny,2,16", "--backends",
          "reference,eager,patched", "--out", str(out)])
    rows = {r["backend"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"reference", "eager", "patched"}
    for r in rows.values():  # each checked by its first loss against the float64 nanoGPT model
        assert r["status"] == "ok" and r["size"] == "nanogpt tiny 2x16" and r["checked_at"] == "first loss"
    assert rows["eager"]["vs_eager"] == 1 and rows["patched"]["vs_eager"] > 0
    # the baseline really is bench/nanogpt.py's model, with the GPT's weights, patched for 'patched'
    params = dict(preset="tiny", batch=2, seqlen=16, model="nanogpt")
    nano, patched, gpt = (bench._build_gpt(params, torch.device("cpu"), v) for v in ("eager", "patched", "reference"))
    assert type(nano).__name__ == "NanoGPT" and type(patched).__name__ == "NanoGPT"
    assert type(gpt).__name__ == "GPT" and gpt.config.gelu_approximate == "none"
    assert hasattr(patched.transformer.h[0].ln_1, "_gptfast_patch") and not hasattr(nano.transformer.h[0].ln_1,
                                                                                    "_gptfast_patch")
    idx = torch.randint(0, gpt.config.vocab_size, (2, 16))
    with _backend.use_backend("reference"):
        torch.testing.assert_close(nano(idx)[0], gpt(idx)[0], atol=1e-5, rtol=1e-5)


def test_layer_norm_residual_is_checked_and_timed(tmp_path, capsys):
    out = tmp_path / "res"
    main(["bench", "layer_norm", *FAST, "--residual", "--sizes", "32,64", "--backends", "reference,eager",
          "--fwd", "--fwd-bwd", "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["backend"], r["phase"]) for r in rows} == {(b, p) for b in ("reference", "eager") for p in ("fwd", "fwd-bwd")}
    for r in rows:
        assert r["status"] == "ok" and r["size"] == "32x64 +residual"
        e, m, n = 4, 32, 64  # fwd: read x, r, w, b, write y, s; bwd: read s, dy, ds, w, write dx, dw, db
        work = (4 * m * n + 2 * n) * e + (0 if r["phase"] == "fwd" else (4 * m * n + 3 * n) * e + 8 * m)
        assert r["gbps"] == pytest.approx(work / (r["ms"] * 1e6))


def test_gelu_ffn_exact_gelu_is_benchmarked_and_checked_against_the_exact_truth(tmp_path):
    # --gelu none: every row runs and is checked with the erf GELU (nanoGPT's nn.GELU())
    out = tmp_path / "exact"
    main(["bench", "gelu_ffn", *FAST, "--gelu", "none", "--sizes", "64,32", "--backends", "reference,cpu,eager",
          "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == {"reference", "cpu", "eager"}
    assert all(r["status"] == "ok" and r["size"] == "64x32x128 exact" for r in rows)
    exact = bench.Case("gelu_ffn", dict(M=64, C=32, Hd=128, approximate="none"))
    cpu = torch.device("cpu")
    tanh = bench.Case("gelu_ffn", dict(M=64, C=32, Hd=128)).gptfast_fn("reference")
    with pytest.raises(AssertionError):  # the tanh form is ~1e-3 off the exact one: caught
        bench.check_case(exact, tanh, cpu, torch.float32, backward=False)
    bench.check_case(exact, exact.gptfast_fn("reference"), cpu, torch.float32, backward=True)


def test_gated_ffn_is_checked_and_timed_in_tflops(tmp_path):
    # every row checked (here against the GeGLU truth) and timed; TFLOP/s from the three GEMMs
    out = tmp_path / "gated"
    backends = [b for b in ("reference", "cpu") if b in gptfast.available_backends("gated_ffn", "cpu")]
    main(["bench", "gated_ffn", *FAST, "--activation", "gelu_tanh", "--sizes", "64,32,48",
          "--backends", ",".join(backends + ["eager", "liger"]), "--fwd", "--fwd-bwd", "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == set(backends) | {"eager", "liger"}
    for r in rows:
        assert r["size"] == "64x32x48 gelu_tanh"
        if r["backend"] == "liger":  # needs a GPU (and the package)
            assert r["status"] == "SKIP"
            continue
        assert r["status"] == "ok" and r["peak_mib"] is not None
        flops = 2 * 64 * 32 * 48 * 3 * (1 if r["phase"] == "fwd" else 3)
        assert r["tflops"] == pytest.approx(flops / (r["ms"] * 1e9))
    case = bench.Case("gated_ffn", dict(M=16, C=8, Hd=24, activation="gelu"))
    cpu = torch.device("cpu")
    bench.check_case(case, case.gptfast_fn("reference"), cpu, torch.float32, backward=True)
    swiglu = bench.Case("gated_ffn", dict(M=16, C=8, Hd=24)).gptfast_fn("reference")
    with pytest.raises(AssertionError):  # SiLU where the exact GELU is asked for: caught
        bench.check_case(case, swiglu, cpu, torch.float32, backward=False)
    assert bench.parse_size("gated_ffn", "8,4096") == dict(M=8, C=4096, Hd=11008)  # Llama-2 7B's width
    assert bench.parse_size("gated_ffn", "8,2048") == dict(M=8, C=2048, Hd=5632)  # TinyLlama's


@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_is_checked_and_timed_in_gb_per_s(tmp_path, residual):
    out = tmp_path / "rms"
    main(["bench", "rms_norm", *FAST, "--sizes", "32,64", "--backends", "reference,eager", "--fwd", "--fwd-bwd",
          "--out", str(out)] + (["--residual"] if residual else []))
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["backend"], r["phase"]) for r in rows} == {(b, p) for b in ("reference", "eager") for p in ("fwd", "fwd-bwd")}
    e, m, n = 4, 32, 64  # fwd: read x, w, write y; bwd: read x, dy, w, rstd, write dx, dw (+ r, s, ds)
    res = 2 * m * n if residual else 0
    for r in rows:
        assert r["status"] == "ok" and r["size"] == "32x64" + (" +residual" if residual else "")
        work = (2 * m * n + n + res) * e + (0 if r["phase"] == "fwd" else (3 * m * n + 2 * n + res // 2) * e + 4 * m)
        assert r["gbps"] == pytest.approx(work / (r["ms"] * 1e6))
    case = bench.Case("rms_norm", dict(M=8, N=32))
    off = lambda x, w: gptfast.rms_norm(x, w, 1e-6, offset=0.01)  # noqa: E731  (a 1% scale error: caught)
    with pytest.raises(AssertionError):
        bench.check_case(case, off, torch.device("cpu"), torch.float32, backward=False)


def test_layer_norm_residual_check_covers_both_outputs_and_the_stream_gradient():
    case = bench.Case("layer_norm", dict(M=8, N=32, residual=True))
    cpu = torch.device("cpu")

    def bad_stream(x, r, w, b):  # y right, s off by 1e-2
        y, s = bench.layer_norm_residual_eager(x, r, w, b)
        return y, s + 1e-2

    def no_stream_gradient(x, r, w, b):  # right values; ds does not reach x and r
        y, s = bench.layer_norm_residual_eager(x, r, w, b)
        return y, s.detach().requires_grad_()

    with pytest.raises(AssertionError, match=r"out\[1\]"):
        bench.check_case(case, bad_stream, cpu, torch.float32, backward=False)
    with pytest.raises(AssertionError, match=r"grad\[0\]"):
        bench.check_case(case, no_stream_gradient, cpu, torch.float32, backward=True)
    bench.check_case(case, case.gptfast_fn("reference"), cpu, torch.float32, backward=True)


def test_eagerized_gpt_matches_the_gptfast_model():
    from gptfast import GPT, GPTConfig
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", n_layer=2, block_size=16)
    a = GPT(config)
    b = GPT(config)
    b.load_state_dict(a.state_dict())
    bench.eagerize(b)
    idx = torch.randint(0, config.vocab_size, (2, 16))
    with _backend.use_backend("reference"):
        la = a(idx, idx)[1]
    lb = b(idx, idx)[1]
    assert abs(la.item() - lb.item()) < 1e-5


def test_formulas():
    att = bench.Case("attention", dict(B=2, T=128, H=4, D=64), causal=True)
    fwd = 4 * 2 * 4 * 128**2 * 64 / 2
    assert att.work("fwd", torch.bfloat16) == fwd
    assert att.work("bwd", torch.bfloat16) == 2.5 * fwd
    assert att.work("fwd-bwd", torch.bfloat16) == 3.5 * fwd
    ffn = bench.Case("gelu_ffn", dict(M=10, C=3, Hd=12))
    assert ffn.work("fwd", torch.float32) == 2 * 10 * 3 * 12 + 2 * 10 * 12 * 3
    assert ffn.work("bwd", torch.float32) == 2 * ffn.work("fwd", torch.float32)
    ln = bench.Case("layer_norm", dict(M=10, N=8))
    assert ln.work("fwd", torch.bfloat16) == (2 * 10 * 8 + 2 * 8) * 2
    assert ln.work("bwd", torch.float32) == (3 * 10 * 8 + 3 * 8) * 4 + 8 * 10


def test_default_grids_and_backends():
    gpu = bench.default_sizes("attention", "cuda")
    assert {(p["T"], p["B"], p["H"], p["D"]) for p in gpu} == {
        (t, 16384 // t, 2048 // d, d) for t in (512, 1024, 2048, 4096, 8192, 16384) for d in (64, 128)}
    assert [p["N"] for p in bench.default_sizes("layer_norm", "cuda")][:2] == [768, 1024]
    # the Triton interpreter is never a default on the CPU, even when TRITON_INTERPRET=1 (conftest)
    assert "triton" not in bench.default_backends("attention", "cpu")
    assert bench.default_backends("layer_norm", "cpu")[-2:] == ["eager", "compile"]
    assert bench.parse_size("gelu_ffn", "8,16") == dict(M=8, C=16, Hd=64)
    assert bench.parse_size("train", "gpt2,4") == dict(preset="gpt2", batch=4, seqlen=1024)
    # check sizes of huge attention cases shrink batch, then heads, never T or D
    p = bench.Case("attention", dict(B=1, T=16384, H=16, D=128), True).check_params("cuda")
    assert (p["T"], p["D"], p["B"], p["H"]) == (16384, 128, 1, 1)
    p = bench.Case("attention", dict(B=4, T=16384, H=32, D=128, Hk=8), True).check_params("cuda")
    assert (p["B"], p["H"], p["Hk"]) == (1, 4, 1)  # GQA: 4 query heads per kv head kept


@pytest.mark.parametrize("argv, message", [
    (["attention", "--sizes", "1,2,3"], "B,T,H,D"),
    (["attention", "--sizes", "1,8,4,16,3"], "must divide the heads"),
    (["attention", "--dropout", "1.0"], "--dropout must be in [0, 1)"),
    (["attention", "--softcap", "0"], "--softcap must be"),
    (["attention", "--window", "-2"], "--window must be"),
    (["layer_norm", "--alibi"], "attention options"),
    (["train", "--sizes", "nope,2"], "PRESET,BATCH"),
    (["layer_norm", "--backends", "reference,fast"], "unknown ['fast']"),
    (["train", "--residual"], "--residual is an option of layer_norm and rms_norm"),
    (["layer_norm", "--model", "nanogpt"], "--model is an option of train"),
    (["attention", "--gelu", "none"], "--gelu is an option of gelu_ffn"),
    (["gelu_ffn", "--activation", "silu"], "--activation is an option of gated_ffn"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv, "--device", "cpu", "--dry-run"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    main(["bench", "attention", "--device", "cuda", "--dry-run", "--out", str(tmp_path / "x")])
    text = capsys.readouterr().out
    assert "24 sizes" in text and "dtype bf16" in text and "(checked at 1x16384x1x128)" in text
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_suite_python_parts_dry_run_on_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--device", "cpu", "--dry-run",
                          "--out", str(tmp_path / "suite")], capture_output=True, text=True, env=env,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    for op in ("ceilings", "attention", "layer_norm", "gelu_ffn", "train"):
        assert f"gptfast bench {op} (dry run)" in out
    assert "device cpu" in out and "would run: " in out  # build + tests listed, not run
    assert "x768 +residual" in out  # layer_norm --residual planned
    assert "nanogpt gpt2 8x1024" in out  # train --model nanogpt
    assert "2x8192x32x64" in out and "16384" not in out.split("gptfast bench attention")[1].split("gptfast bench")[0]


def test_linear_cross_entropy_reports_time_and_peak_memory_against_eager(tmp_path, capsys):
    from gptfast import bench_lce
    out = tmp_path / "lce"
    main(["bench", "linear_cross_entropy", "--device", "cpu", "--sizes", "256,32,3000", "--backends",
          "eager,reference" + (",cpu" if "cpu" in gptfast.available_backends("linear_cross_entropy", "cpu") else ""),
          "--repeats", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert "256x32x3000" in text and "peak MiB" in text
    rows = {r["backend"]: r for r in json.loads((out / "linear_cross_entropy.json").read_text())["rows"]}
    assert (out / "linear_cross_entropy.txt").read_text().startswith("gptfast bench linear_cross_entropy")
    for name, r in rows.items():
        assert r["status"] == "OK" and r["ms"] > 0 and len(r["times_ms"]) == 2, r
        assert r["checked_at"] == "96x48x1000" and r["tflops"] == pytest.approx(6 * 256 * 32 * 3000 / r["ms"] / 1e9)
        assert r["x_eager_time"] == pytest.approx(r["ms"] / rows["eager"]["ms"])
    # the check catches a wrong loss and a wrong gradient
    with pytest.raises(AssertionError):
        bench_lce.check(lambda x, w, t: bench_lce._eager(x, w, t) * 1.01, torch.device("cpu"), torch.float32, True)
    with pytest.raises(AssertionError, match=r"grad\[1\]"):  # the loss right, dweight off by 1e-3
        bench_lce.check(lambda x, w, t: bench_lce._eager(x, w, t) + 1e-3 * (w - w.detach()).sum(),
                        torch.device("cpu"), torch.float32, True)
