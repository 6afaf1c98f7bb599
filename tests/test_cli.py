"""The command line: thin wrappers, clear errors, exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunesmith.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_models_list_shows_the_bundled_base(tiny_model_dir):
    result = invoke("models", "list")
    assert result.exit_code == 0
    assert "smollm2-135m" in result.output and "tiny-llama" in result.output


def test_tokenize_shows_tokens_and_count(tiny_model_dir):
    result = invoke("tokenize", "unbelievable tokenization")
    assert result.exit_code == 0
    assert "tokens" in result.output
    ids = invoke("tokenize", "--ids", "unbelievable tokenization").output.split()
    assert len(ids) >= 3 and all(i.isdigit() for i in ids)


def test_tokenize_bad_file_is_named(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\x81\x8d broken")  # bytes no text encoding tunesmith reads defines
    result = invoke("tokenize", "--file", bad)
    assert result.exit_code == 1
    assert "bad.txt" in result.output and "UTF-8" in result.output


@pytest.mark.parametrize(
    "args, expect",
    [
        (["train", "missing.txt", "--base", "tiny-llama"], "missing.txt"),
        (["generate", "no-such-model", "hi"], "unknown base model"),
        (["prepare", "missing.txt"], "missing.txt"),
    ],
)
def test_user_errors_exit_nonzero_without_traceback(args, expect, tiny_model_dir):
    result = invoke(*args)
    assert result.exit_code != 0
    assert expect in result.output
    assert "Traceback" not in result.output


def _book(tmp_path: Path) -> Path:
    path = tmp_path / "book.txt"
    path.write_text("".join(f"Paragraph {i} tells of the sea and the ship. It was cold. The crew sang.\n\n" for i in range(40)))
    return path


def test_train_then_generate_with_seed_is_repeatable(tmp_path, tiny_model_dir):
    book = _book(tmp_path)
    run = tmp_path / "run"
    result = invoke("train", book, "--base", "tiny-llama", "--out", run, "--epochs", "1", "--block-size", "64", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert (run / "adapter").is_dir()
    again = invoke("train", book, "--base", "tiny-llama", "--out", run, "--epochs", "1")
    assert again.exit_code != 0 and "already exists" in again.output
    gen = lambda: invoke("generate", run, "The sea", "--max-tokens", "12", "--seed", "4").output  # noqa: E731
    first, second = gen(), gen()
    assert first == second and first.startswith("The sea")
    # The tuned model is not its base: greedy continuations of the training text differ.
    tuned = invoke("generate", run, "Paragraph 3 tells of", "--max-tokens", "12", "--temperature", "0").output
    base = invoke("generate", "tiny-llama", "Paragraph 3 tells of", "--max-tokens", "12", "--temperature", "0").output
    assert tuned.startswith("Paragraph 3 tells of") and base.startswith("Paragraph 3 tells of")
    assert tuned != base


def test_dry_run_estimates_without_training(tmp_path, tiny_model_dir):
    book = _book(tmp_path)
    result = invoke("train", book, "--base", "tiny-llama", "--dry-run", "--block-size", "64", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "estimated time" in result.output and "optimizer steps" in result.output
    assert not (tmp_path / "run").exists()


def _default_sigint() -> None:
    """The child takes Ctrl-C as a terminal would deliver it, even when this test run was started
    in the background, where the shell ignores SIGINT and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_training_cleanly(tmp_path, tiny_model_dir):
    """A real SIGINT to a real process: exit 130, no traceback, last checkpoint usable."""
    book = _book(tmp_path)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunesmith.cli", "train", str(book), "--base", "tiny-llama", "--out", str(run),
         "--epochs", "200", "--block-size", "32", "--batch-size", "1", "--save-every", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        preexec_fn=_default_sigint,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "adapter" / "adapter_config.json").exists():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=240)  # the step under way, then a checkpoint: slow on a busy machine
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "interrupted" in output
    state = json.loads((run / "status.json").read_text())
    assert state["status"] == "interrupted"
    gen = invoke("generate", run, "The sea", "--max-tokens", "4", "--seed", "1")
    assert gen.exit_code == 0, gen.output


def user_error(result, *needles) -> str:
    """A clear message and exit code 1; an uncaught exception would show up in result.exception."""
    assert result.exit_code == 1, result.output
    assert type(result.exception) is SystemExit, result.exception
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)
    return result.output


@pytest.mark.parametrize(
    "option, needles",
    [
        (["--dtype", "fp8"], ["--dtype", "fp8"]),
        (["--device", "tpu"], ["--device", "tpu"]),
        (["--block-size", "0"], ["--block-size: must be between 16 and 8192"]),
        (["--epochs", "0"], ["--epochs: must be at least 1"]),
        (["--save-every", "0"], ["--save-every: must be at least 1"]),
        (["--seed", "-1"], ["--seed: must be between 0"]),
    ],
)
def test_bad_train_options_are_messages_and_write_nothing(option, needles, tmp_path, tiny_model_dir):
    book = _book(tmp_path)
    text = user_error(invoke("train", book, "--base", "tiny-llama", "--out", tmp_path / "run", *option), *needles)
    assert "field '" not in text  # options are named as typed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book.txt"]  # no run dir, no temporary dir


def test_bad_dtype_and_device_fail_the_dry_run_too(tmp_path, tiny_model_dir):
    book = _book(tmp_path)
    user_error(invoke("train", book, "--base", "tiny-llama", "--dry-run", "--dtype", "fp8"), "--dtype")
    user_error(invoke("train", book, "--base", "tiny-llama", "--dry-run", "--device", "tpu"), "--device")


def test_cuda_without_cuda_is_a_message(tmp_path, tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    book = _book(tmp_path)
    user_error(invoke("train", book, "--base", "tiny-llama", "--out", tmp_path / "run", "--device", "cuda"),
               "--device", "cannot use 'cuda'")
    assert not (tmp_path / "run").exists()


def test_out_naming_a_file_is_a_message(tmp_path, tiny_model_dir):
    book = _book(tmp_path)
    user_error(invoke("train", book, "--base", "tiny-llama", "--out", book), "a file is already there")
    assert book.read_text().startswith("Paragraph 0")


@pytest.mark.parametrize("n", ["0", "-1"])
def test_generate_needs_at_least_one_continuation(n, tiny_model_dir):
    user_error(invoke("generate", "tiny-llama", "The sea", "--n", n), "--n: must be at least 1")


@pytest.mark.parametrize(
    "option, needle",
    [(["--temperature", "-1"], "--temperature"), (["--top-p", "0"], "--top-p"),
     (["--max-tokens", "0"], "--max-tokens"), (["--repetition-penalty", "0"], "--repetition-penalty")],
)
def test_sampling_options_are_checked_before_the_model_loads(option, needle):
    # The model does not exist: a check that ran after loading would report that instead.
    text = user_error(invoke("generate", "no-such-model", "A prompt to echo", *option), needle)
    assert "no-such-model" not in text and "A prompt to echo" not in text


def test_a_missing_run_path_says_so(tmp_path, tiny_model_dir):
    text = user_error(invoke("generate", tmp_path / "runs" / "nope", "hi"), "no such file or directory")
    assert "Hugging Face" not in text
    text = user_error(invoke("generate", "runs/nope", "hi"), "runs/nope: no such file or directory")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("tiny run")
    book = _book(root)
    run = root / "my run"
    result = invoke("train", book, "--base", "tiny-llama", "--out", run, "--epochs", "2", "--block-size", "64",
                    "--batch-size", "4")
    assert result.exit_code == 0, result.output
    return run


def test_next_commands_are_shell_quoted(tmp_path, tiny_model_dir):
    folder = tmp_path / "my books"
    folder.mkdir()
    book = _book(folder)
    result = invoke("prepare", book, "--base", "tiny-llama", "--no-estimate", "--out", folder / "it's prepared")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("next:"))
    assert shlex.split(line) == ["next:", "tunesmith", "train", str(folder / "it's prepared")]


def test_run_without_its_adapter_points_to_its_checkpoints(tiny_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "adapter")
    steps = [int(p.name.split("-")[1]) for p in sorted((run / "checkpoints").iterdir())]
    text = user_error(invoke("generate", run, "The sea", "--max-tokens", "3"), "no adapter/", "checkpoints")
    assert "stopped before its first checkpoint" not in text
    assert f"{'steps' if len(steps) > 1 else 'step'} {', '.join(map(str, steps))}" in text
    hint = next(line for line in text.splitlines() if "cp -r" in line).split("latest: ", 1)[1]
    subprocess.run(shlex.split(hint), check=True)  # the advice works as printed
    assert invoke("generate", run, "The sea", "--max-tokens", "3", "--seed", "1").exit_code == 0

    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints")
    user_error(invoke("generate", run, "The sea"), "stopped before its first checkpoint")


def test_train_prints_a_quoted_generate_command(tiny_run):
    readme = (tiny_run / "README.md").read_text()
    assert f"tunesmith generate {shlex.quote(str(tiny_run))} " in readme


def test_counts_agree_with_their_nouns(tmp_path, tiny_model_dir):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Q{i} ->", "completion": f" answer {i}."} for i in range(4)] + [{"prompt": "Q0 ->", "completion": " answer 0."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = invoke("prepare", data, "--base", "tiny-llama", "--no-estimate", "--valid-fraction", "0.25")
    assert result.exit_code == 0, result.output
    assert "removed 1 duplicate example (same text up to whitespace)" in result.output
    assert "1 example held out" in result.output
    assert "1 examples" not in result.output
    tokens = invoke("tokenize", "a").output
    assert "1 token for 1 character " in tokens


def test_generate_quant_and_compile_are_checked_before_the_model_loads():
    user_error(invoke("generate", "no-such-model", "hi", "--quant", "int4"), "int4", "int8")
    user_error(invoke("generate", "no-such-model", "hi", "--compile", "maybe"), "--compile")


def test_generate_with_int8_weights_writes_a_continuation(tiny_model_dir):
    """`--quant int8` loads, generates and prints (the text itself is checked on the real model in test_decoder)."""
    int8 = invoke("generate", "tiny-llama", "The sea", "--max-tokens", "6", "--temperature", "0", "--quant", "int8")
    assert int8.exit_code == 0, int8.output
    assert int8.output.startswith("The sea") and len(int8.output.strip()) > len("The sea")
