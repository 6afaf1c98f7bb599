"""The command line: thin wrappers, clear errors, exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
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
    bad.write_bytes(b"ok\n\xff\xfe broken")
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


def test_dry_run_estimates_without_training(tmp_path, tiny_model_dir):
    book = _book(tmp_path)
    result = invoke("train", book, "--base", "tiny-llama", "--dry-run", "--block-size", "64", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "estimated time" in result.output and "optimizer steps" in result.output
    assert not (tmp_path / "run").exists()


def test_ctrl_c_stops_training_cleanly(tmp_path, tiny_model_dir):
    """A real SIGINT to a real process: exit 130, no traceback, last checkpoint usable."""
    book = _book(tmp_path)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunesmith.cli", "train", str(book), "--base", "tiny-llama", "--out", str(run),
         "--epochs", "200", "--block-size", "32", "--batch-size", "1", "--save-every", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "adapter" / "adapter_config.json").exists():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "interrupted" in output
    state = json.loads((run / "status.json").read_text())
    assert state["status"] == "interrupted"
    gen = invoke("generate", run, "The sea", "--max-tokens", "4", "--seed", "1")
    assert gen.exit_code == 0, gen.output
