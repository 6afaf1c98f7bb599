"""Exact resume: a run killed at a random step and resumed equals a run never interrupted."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tunesmith
from tunesmith import TunesmithError
from tunesmith.rundir import Run

TEXT = "".join(
    f"The lamp burned low in study number {i}. Holmes leaned back and closed his eyes for {i} minutes. "
    f"\"You have come {i} miles,\" he said at last. The visitor nodded and said nothing.\n\n"
    for i in range(24)
)
OPTIONS = dict(base="tiny-llama", block_size=64, batch_size=2, epochs=2, sample_tokens=8, save_every=3, seed=7)
# Everything in a metrics row that the computation decides (not the clock).
COMPUTED = ("step", "epoch", "elapsed_tokens", "training_loss", "training_token_accuracy", "learning_rate",
            "validation_loss", "validation_token_accuracy", "validation_perplexity")

# Trains in a child process and prints each metrics and checkpoint event as a JSON line; a short
# pause per step leaves the parent time to kill it mid-run.
CHILD = """
import json, sys, time
from tunesmith import finetune
args = json.loads(sys.argv[1])
def on_event(event):
    if event["type"] in ("metrics", "checkpoint"):
        print(json.dumps({"type": event["type"], "step": event["step"]}), flush=True)
        time.sleep(args["pause"])
finetune(args["data"], out=args["out"], progress=False, samples=False, on_event=on_event, **args["options"])
"""


@pytest.fixture()
def book(tmp_path) -> Path:
    path = tmp_path / "book.txt"
    path.write_text(TEXT)
    return path


def _child(book: Path, out: Path, options: dict, pause: float = 0.0) -> subprocess.Popen:
    args = {"data": str(book), "out": str(out), "options": options, "pause": pause}
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def _kill_at_random_step(book: Path, out: Path, options: dict, total_steps: int, rng: random.Random) -> int:
    """Start a run and SIGKILL it at a random moment after its first checkpoint; returns the step it had reached."""
    kill_at = rng.randint(options["save_every"] + 1, total_steps - 2)
    proc = _child(book, out, options, pause=0.05)
    seen_checkpoint, reached = False, 0
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        seen_checkpoint |= event["type"] == "checkpoint"
        reached = max(reached, event["step"])
        if seen_checkpoint and event["type"] == "metrics" and event["step"] >= kill_at:
            time.sleep(rng.uniform(0, 0.05))  # anywhere in the next step or checkpoint write
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill at step {kill_at}"
    return reached


def _rows(run: Run) -> list[dict]:
    """The computed figures of each row; rows of sample figures are left out (a resumed run writes
    samples, the reference here does not)."""
    return [{k: row[k] for k in COMPUTED if k in row} for row in run.metrics() if "samples_copy_rate" not in row]


def _weights(path: Path) -> dict:
    return load_file(str(path / "adapter_model.safetensors"))


def _reference(book: Path, out: Path, options: dict) -> Run:
    proc = _child(book, out, options)
    proc.communicate(timeout=600)
    assert proc.returncode == 0
    return Run(out)


def test_sigkill_then_resume_is_bit_identical_in_fp32(book, tmp_path, tiny_model_dir):
    options = {**OPTIONS, "dtype": "fp32"}
    reference = _reference(book, tmp_path / "reference", options)
    total = max(r["step"] for r in reference.metrics())
    seed = random.randrange(1 << 30)
    reached = _kill_at_random_step(book, tmp_path / "killed", options, total, random.Random(seed))
    killed = Run(tmp_path / "killed")
    assert killed.status == "running" and killed.checkpoints(), f"seed {seed}"
    resumed_from = killed.checkpoints()[-1]["step"]
    assert 0 < resumed_from <= reached < total

    result = subprocess.run([sys.executable, "-m", "tunesmith", "train", "--resume", str(killed.path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"resuming from step-{resumed_from:06d}" in result.stdout

    assert killed.status == "succeeded"
    assert _rows(killed) == _rows(reference), f"kill seed {seed}"
    ours, theirs = _weights(killed.weights_dir), _weights(reference.weights_dir)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), f"kill seed {seed}"
    assert killed.best == reference.best
    assert all(torch.equal(a, b) for a, b in zip(_weights(killed.path / "best" / "adapter").values(),
                                                   _weights(reference.path / "best" / "adapter").values()))
    summary = lambda run: json.loads((run.path / "summary.json").read_text())  # noqa: E731
    assert summary(killed)["validation_after"] == summary(reference)["validation_after"]


# bf16 matmuls are deterministic on the same machine and threads, so a resume in bf16 is expected
# to be exact too; the stated guarantee is looser: losses within 1e-3 relative, weights within 1e-4.
BF16_LOSS_RTOL, BF16_WEIGHT_ATOL = 1e-3, 1e-4


def test_sigkill_then_resume_in_bf16_within_tolerance(book, tmp_path, tiny_model_dir):
    options = {**OPTIONS, "dtype": "bf16", "epochs": 1, "save_every": 2}
    reference = _reference(book, tmp_path / "reference", options)
    total = max(r["step"] for r in reference.metrics())
    seed = random.randrange(1 << 30)
    _kill_at_random_step(book, tmp_path / "killed", options, total, random.Random(seed))
    killed = tunesmith.resume(tmp_path / "killed", progress=False, samples=False)
    assert killed.status == "succeeded"
    ours, theirs = _rows(killed), _rows(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs):
        for key in ("training_loss", "validation_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=BF16_LOSS_RTOL), f"kill seed {seed}"
    w_ours, w_theirs = _weights(killed.weights_dir), _weights(reference.weights_dir)
    assert all(torch.allclose(w_ours[k], w_theirs[k], rtol=0, atol=BF16_WEIGHT_ATOL) for k in w_theirs)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A run stopped by Ctrl-C after step 4, with checkpoints at steps 3 and 4."""
    root = tmp_path_factory.mktemp("interrupted")
    (root / "book.txt").write_text(TEXT)

    def ctrl_c(event):
        if event["type"] == "metrics" and event["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tunesmith.finetune(root / "book.txt", out=root / "run", progress=False, samples=False, on_event=ctrl_c,
                           **{**OPTIONS, "dtype": "fp32"})
    return root / "run"


@pytest.fixture()
def stopped(interrupted_run, tmp_path) -> Run:
    copy = tmp_path / "run"
    shutil.copytree(interrupted_run, copy)
    return Run(copy)


def test_ctrl_c_checkpoint_is_the_finished_step(stopped):
    assert stopped.status == "interrupted"
    assert [c["step"] for c in stopped.checkpoints()] == [3, 4]
    state = torch.load(Path(stopped.checkpoints()[-1]["path"]) / "trainer_state.pt", weights_only=False)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (4, 0, 4)
    assert state["metrics_rows"] == len(stopped.metrics()) == 5  # the base model's validation and 4 steps


@pytest.mark.parametrize("option, value", [("lr", 0.5), ("epochs", 3), ("batch_size", 4), ("dtype", "bf16")])
def test_resume_refuses_options_that_change_the_computation(stopped, option, value):
    before = (stopped.path / "metrics.jsonl").read_bytes()
    with pytest.raises(TunesmithError) as info:
        tunesmith.resume(stopped.path, progress=False, **{option: value})
    assert info.value.field == option and "cannot change" in str(info.value)
    assert (stopped.path / "metrics.jsonl").read_bytes() == before and stopped.status == "interrupted"


def test_resume_refuses_a_run_another_process_trains(stopped):
    with stopped.training_lock():
        with pytest.raises(TunesmithError, match="another process is training this run"):
            tunesmith.resume(stopped.path, progress=False)


def test_resume_refuses_a_finished_run(stopped):
    stopped.set_status("succeeded", step=4)
    with pytest.raises(TunesmithError, match="already finished"):
        tunesmith.resume(stopped.path, progress=False)


def test_too_little_disk_is_refused_before_anything_is_written(book, stopped, tmp_path, monkeypatch):
    from tunesmith import train

    checkpoint = Path(stopped.checkpoints()[-1]["path"])
    on_disk = sum(f.stat().st_size for p in (checkpoint, stopped.weights_dir) for f in p.rglob("*") if f.is_file())
    real = shutil.disk_usage
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: real(path)._replace(free=on_disk // 2))

    with pytest.raises(TunesmithError, match=r"a checkpoint needs [\d.]+ [KMG]?B, [\d.]+ [KMG]?B is free"):
        tunesmith.finetune(book, out=tmp_path / "new", progress=False, **OPTIONS)
    assert not (tmp_path / "new").exists()

    with pytest.raises(TunesmithError, match="is free"):
        tunesmith.resume(stopped.path, progress=False)
    assert stopped.status == "interrupted" and len(stopped.metrics()) == 5


def test_estimated_checkpoint_size_covers_a_real_one(stopped):
    from tunesmith.models import resolve
    from tunesmith.train import TrainConfig, checkpoint_bytes

    checkpoint = Path(stopped.checkpoints()[-1]["path"])
    real = sum(f.stat().st_size for p in (checkpoint, stopped.weights_dir) for f in p.rglob("*") if f.is_file())
    estimate = checkpoint_bytes(TrainConfig(**{**OPTIONS, "dtype": "fp32"}), resolve("tiny-llama"))
    assert real <= estimate <= 2 * real + (1 << 20)


def test_keeps_the_newest_checkpoints_and_the_best_weights(book, tmp_path, tiny_model_dir):
    saved = {}

    def snapshot(event):  # every checkpoint's weights, before older ones are deleted
        if event["type"] == "checkpoint":
            saved[event["step"]] = _weights(Path(event["path"]) / "adapter")

    run = tunesmith.finetune(book, out=tmp_path / "run", progress=False, samples=False, on_event=snapshot,
                             **{**OPTIONS, "epochs": 3, "save_every": 2, "keep_checkpoints": 3, "lr": 0.05})
    assert [c["step"] for c in run.checkpoints()] == sorted(saved)[-3:]
    validations = [r for r in run.metrics() if "validation_loss" in r and r["step"] > 0]
    lowest = min(validations, key=lambda r: r["validation_loss"])
    assert run.best == {"step": lowest["step"], "validation_loss": lowest["validation_loss"]}
    best = _weights(run.path / "best" / "adapter")
    assert all(torch.equal(best[k], saved[lowest["step"]][k]) for k in best)


def test_a_job_whose_worker_was_killed_resumes_on_retry(tunesmith_home):
    """SIGKILL the training worker after a checkpoint; `jobs retry` queues the job to resume from it,
    and the resumed job ends with the training of a job that was never interrupted (the server's
    jobs train in the automatic dtype: bf16 where the CPU has it, hence the bf16 tolerances)."""
    from typer.testing import CliRunner

    from tunesmith.server.commands import jobs_app
    from tunesmith.server.store import Store, new_id
    from tunesmith.server.worker import serve_queue

    store = Store(tunesmith_home)
    book = tunesmith_home / "book.txt"
    book.write_text(TEXT * 4)
    file_id = new_id("file")
    store.add_file(file_id, "book.txt", book, book.stat().st_size)
    hyperparameters = {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 1.0, "block_size": 64}
    job = store.create_job(model="tiny-llama", training_file=file_id, validation_file=None, suffix=None, seed=3,
                           hyperparameters=hyperparameters)

    worker = subprocess.Popen([sys.executable, "-m", "tunesmith.server.worker", "--home", str(tunesmith_home)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not store.list_checkpoints(job["id"])[0]:
        assert worker.poll() is None and time.monotonic() < deadline, "the worker never saved a checkpoint"
        time.sleep(0.05)
    worker.kill()
    worker.wait(30)
    assert store.reap_stale_jobs() == [job["id"]]
    run = Run(job["run_dir"])
    step = run.checkpoints()[-1]["step"]
    total = 2 * max(r["step"] for r in run.metrics() if r.get("epoch") == 1.0)
    assert step < total, "the job finished before the kill"

    result = CliRunner().invoke(jobs_app, ["retry", job["id"]])
    assert result.exit_code == 0, result.output
    assert f"it resumes from its checkpoint at step {step}" in result.output
    assert all(p["step"] <= step for p in store.metrics(job["id"]))
    serve_queue(store, idle_exit=0.5)
    done = store.get_job(job["id"])
    assert done["status"] == "succeeded", done["error"]
    messages = [e["message"] for e in store.events_since(job["id"])]
    assert f"Resuming from the checkpoint at step {step}" in messages
    steps = [p["step"] for p in store.metrics(job["id"]) if "train_loss" in p]
    assert steps == list(range(1, total + 1))  # no step lost or repeated in the job's metrics

    again = store.create_job(model="tiny-llama", training_file=file_id, validation_file=None, suffix=None, seed=3,
                             hyperparameters=hyperparameters)
    serve_queue(store, idle_exit=0.5)
    reference = Run(store.get_job(again["id"])["run_dir"])
    ours, theirs = _rows(run), _rows(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs):
        for key in ("training_loss", "validation_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=BF16_LOSS_RTOL)
    w_ours, w_theirs = _weights(run.weights_dir), _weights(reference.weights_dir)
    assert all(torch.allclose(w_ours[k], w_theirs[k], rtol=0, atol=BF16_WEIGHT_ATOL) for k in w_theirs)


def _default_sigint() -> None:
    """The child takes Ctrl-C as a terminal would deliver it, even when this test run was started
    in the background, where the shell ignores SIGINT and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_on_the_command_line_checkpoints_a_finished_step(tmp_path, tiny_model_dir):
    """A real SIGINT lands anywhere in a step; training stops after that step, and the checkpoint,
    the metrics and the data position agree."""
    book = tmp_path / "book.txt"
    book.write_text(TEXT * 4)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(book), "--out", str(out), "--base",
                             "tiny-llama", "--block-size", "64", "--batch-size", "2", "--epochs", "50", "--dtype", "fp32"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 4:
        assert proc.poll() is None and time.monotonic() < deadline, "training never started"
        time.sleep(0.01)
    time.sleep(random.uniform(0, 0.05))
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert f"resume with: tunesmith train --resume {out}" in stderr
    run = Run(out)
    assert run.status == "interrupted"
    steps = [r["step"] for r in run.metrics() if "training_loss" in r]
    state = torch.load(Path(run.checkpoints()[-1]["path"]) / "trainer_state.pt", weights_only=False)
    assert state["step"] == steps[-1] == run.state["step"]
    assert state["metrics_rows"] == len(run.metrics())
    # the data position is where the step left it (in the first epoch, the step itself)
    assert state["batch_in_epoch"] <= state["step"] and (state["epoch"] > 0 or state["batch_in_epoch"] == state["step"])
