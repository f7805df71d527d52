"""The ``gptfast`` command: train, sample, info, and clear errors instead of tracebacks."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gptfast.data
from gptfast.cli import main

CORPUS = str(Path(gptfast.data.__file__))


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    main(["train", "--data", CORPUS, "--out-dir", str(out), "--device", "cpu", "--block-size", "32",
          "--batch-size", "8", "--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2",
          "--sample-tokens", "16", "--quiet"])
    return out


def test_train_prints_evals_baseline_throughput_and_a_sample(trained_dir, capsys):
    # The module fixture ran first; run two more steps to see the output of a resumed run too.
    main(["train", "--out-dir", str(trained_dir), "--resume", "--max-iters", "22", "--quiet"])
    out = capsys.readouterr().out
    assert "step 22: val loss" in out and "unigram baseline" in out
    assert "tokens/s" in out and "MFU" in out and "of the measured float32 matmul rate" in out
    assert "--- sample (16 tokens" in out


def test_sample_continues_the_prompt(trained_dir, capsys):
    main(["sample", "--ckpt", str(trained_dir), "--prompt", "def ", "--max-new-tokens", "30",
          "--num-samples", "2"])
    out = capsys.readouterr().out
    first, second = out.split("\n---\n")
    assert first.startswith("def ") and second.startswith("def ")
    assert len(first.encode()) >= 30  # the prompt plus 30 bytes (some may be merged or replaced)


def test_info_prints_versions_and_the_backend_table(capsys):
    main(["info"])
    out = capsys.readouterr().out
    assert "torch" in out and "python" in out and "cuda" in out and "threads" in out
    header = next(line for line in out.splitlines() if line.startswith("op "))
    assert header.split() == ["op", "backend", "device", "available", "reason"]
    assert any(line.split()[:3] == ["attention", "reference", "cpu"] for line in out.splitlines()
               if line.strip())


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "/no/such/corpus.txt"],
     "gptfast train: error: --data /no/such/corpus.txt: no such file"),
    (["train", "--preset", "huge"], "unknown --preset 'huge'"),
    (["sample", "--ckpt", "/no/such/dir"], "gptfast sample: error: no checkpoint at /no/such/dir/ckpt.pt"),
])
def test_bad_input_exits_with_a_message_not_a_traceback(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_console_script_runs():
    script = shutil.which("gptfast", path=str(Path(sys.executable).parent)) or shutil.which("gptfast")
    if script is None:
        pytest.skip("the gptfast console script is not installed (pip install -e .)")
    result = subprocess.run([script, "train", "--data", "/no/such/path"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "no such file or directory" in result.stderr


def test_build_command_builds_or_says_why(capsys):
    """`gptfast build` compiles the native extension ahead of time (or fails with one line)."""
    from gptfast import _build
    from gptfast.cli import main

    if _build._precheck() is not None:
        with pytest.raises(SystemExit) as exc:
            main(["build"])
        assert exc.value.code == 1 and "gptfast build: failed:" in capsys.readouterr().err
        return
    main(["build"])
    out = capsys.readouterr().out
    assert "native extension" in out and "ready in" in out
    assert _build.unavailable_reason() is None
