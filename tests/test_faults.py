"""Faults: a full disk (prepare, a checkpoint, an upload), a corrupt checkpoint on resume, the
server's training worker killed mid-job, an upload cut off by a killed server, and SQLite busy
under concurrent calls. Nothing acknowledged is lost, and each fault has a clear message.

A full disk is a real one where the tests run as root (a small tmpfs), and a patched writer that
raises ENOSPC everywhere else."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

import tunesmith
from tunesmith import TunesmithError
from tunesmith.rundir import Run

TEXT = "".join(
    f"The lamp burned low in study number {i}. Holmes leaned back and closed his eyes for {i} minutes. "
    f"\"You have come {i} miles,\" he said at last. The visitor nodded and said nothing.\n\n"
    for i in range(24)
)
BIG_TEXT = "".join(
    f"Chapter {i}. The lamp burned low in study number {i}, and the rain kept on against the glass while "
    f"Holmes turned the pages of the ledger for the {i}th time.\n\n"
    for i in range(400)
)
OPTIONS = dict(base="tiny-llama", block_size=64, batch_size=2, epochs=2, sample_tokens=8, save_every=3, seed=7,
               dtype="fp32")


@pytest.fixture()
def tmpfs(tmp_path):
    """``tmpfs(size)`` mounts a tmpfs of ``size`` (such as "32k") and returns it (root only; skipped
    where it cannot be mounted)."""
    mounts = []

    def mount(size: str) -> Path:
        path = tmp_path / f"disk-{len(mounts)}"
        path.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                               capture_output=True).returncode != 0:
            pytest.skip("a small tmpfs needs root")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture()
def small_disk(tmpfs) -> Path:
    return tmpfs("32k")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> Run:
    """The run never interrupted, to compare resumed runs with."""
    root = tmp_path_factory.mktemp("reference")
    (root / "book.txt").write_text(TEXT)
    return tunesmith.finetune(root / "book.txt", out=root / "run", progress=False, samples=False, **OPTIONS)


def _computed(run: Run) -> list[dict]:
    """Metrics rows without the clock's figures."""
    return [{k: v for k, v in row.items() if "second" not in k} for row in run.metrics()]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.endswith((".tmp", ".old"))]


# -- a full disk -------------------------------------------------------------------------------


def test_prepare_on_a_full_disk_says_so_and_writes_nothing(small_disk, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(BIG_TEXT)  # ~60 KB of text: its examples do not fit the 32 KiB disk
    out = small_disk / "book.prepared"
    with pytest.raises(TunesmithError) as info:
        tunesmith.prepare(book, out=out, base="tiny-llama")
    assert "the disk is full" in str(info.value) and info.value.file == str(out)
    assert "free some space" in str(info.value)
    assert not out.exists() and not _leftovers(small_disk)


def test_prepare_with_a_writer_raising_enospc(tmp_path, monkeypatch, tiny_model_dir):
    import builtins
    import importlib

    prepare_module = importlib.import_module("tunesmith.prepare")  # the module; tunesmith.prepare is the function

    def writes_fail(file, mode="r", *args, **kwargs):  # prepare's own writers; its reads go through
        if any(c in mode for c in "wax+"):
            _enospc()
        return builtins.open(file, mode, *args, **kwargs)

    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    monkeypatch.setattr(prepare_module, "open", writes_fail, raising=False)
    out = tmp_path / "book.prepared"
    with pytest.raises(TunesmithError, match="the disk is full") as info:
        tunesmith.prepare(book, out=out, base="tiny-llama")
    assert info.value.file == str(out)
    assert not out.exists() and not _leftovers(tmp_path)


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_resumes_exactly(tmp_path, monkeypatch, reference):
    (tmp_path / "book.txt").write_text(TEXT)
    real_save, saves = torch.save, []

    def fills_the_disk_at_the_second_checkpoint(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            _enospc()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_the_disk_at_the_second_checkpoint)
    with pytest.raises(TunesmithError) as info:
        tunesmith.finetune(tmp_path / "book.txt", out=tmp_path / "run", progress=False, samples=False, **OPTIONS)
    message = str(info.value)
    assert "the disk is full" in message and "training stopped at step 6" in message
    assert "checkpoint at step 3 is kept" in message and "tunesmith train --resume" in message
    run = Run(tmp_path / "run")
    assert run.status == "failed" and "the disk is full" in run.state["error"]
    assert [c["step"] for c in run.checkpoints()] == [3] and not _leftovers(run.path)
    assert [r["step"] for r in run.metrics()] == list(range(7))  # every step logged before the fault is there

    monkeypatch.setattr(torch, "save", real_save)  # space freed
    resumed = tunesmith.resume(run.path, progress=False, samples=False)
    assert resumed.status == "succeeded"
    assert resumed.metrics() and _computed(resumed) == _computed(reference)
    ours = load_file(str(resumed.weights_dir / "adapter_model.safetensors"))
    theirs = load_file(str(reference.weights_dir / "adapter_model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_checkpoint_on_a_really_full_disk(tmpfs, tmp_path, tiny_model_dir):
    """The disk fills up (another program's file) after the first checkpoint; torch.save then
    raises a bare RuntimeError, which is still reported as a full disk."""
    disk = tmpfs("8m")
    (tmp_path / "book.txt").write_text(TEXT)

    def fill_the_disk(event):
        if event["type"] == "checkpoint" and not (disk / "filler").exists():
            with open(disk / "filler", "wb") as fh:  # all but 16 KiB
                fh.write(b"\0" * max(0, shutil.disk_usage(disk).free - 16384))

    with pytest.raises(TunesmithError) as info:
        tunesmith.finetune(tmp_path / "book.txt", out=disk / "run", progress=False, samples=False,
                           on_event=fill_the_disk, **OPTIONS)
    assert "the disk is full" in str(info.value) and "checkpoint at step 3 is kept" in str(info.value)
    run = Run(disk / "run")
    assert [c["step"] for c in run.checkpoints()] == [3] and not _leftovers(disk)
    (disk / "filler").unlink()
    assert tunesmith.resume(run.path, progress=False, samples=False).status == "succeeded"


# -- a corrupt checkpoint ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["trainer_state.pt", "adapter/adapter_model.safetensors"])
def test_a_corrupt_checkpoint_is_skipped_for_the_one_before(tmp_path, reference, damage):
    (tmp_path / "book.txt").write_text(TEXT)
    def stop_at_step_7(event):
        if event["type"] == "metrics" and event["step"] == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tunesmith.finetune(tmp_path / "book.txt", out=tmp_path / "run", progress=False, samples=False,
                           on_event=stop_at_step_7, **{**OPTIONS, "keep_checkpoints": 3})
    run = Run(tmp_path / "run")
    assert [c["step"] for c in run.checkpoints()] == [3, 6, 7]
    newest = Path(run.checkpoints()[-1]["path"]) / damage
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut in half, as by a failing disk
    messages = []
    resumed = tunesmith.resume(run.path, progress=False, samples=False,
                               on_event=lambda e: messages.append(e.message or ""))
    assert any(m.startswith("skipping checkpoint step-000007") for m in messages), messages
    assert any(m.startswith("resuming from step-000006") for m in messages), messages
    assert resumed.status == "succeeded" and _computed(resumed) == _computed(reference)


# -- the server ---------------------------------------------------------------------------------


def _app(home: Path, **config):
    from tunesmith.server.app import ServerConfig, create_app

    return create_app(ServerConfig(home=home, start_worker=False, **config))


def test_an_upload_on_a_full_disk_is_a_507_and_stores_nothing(tunesmith_home, monkeypatch):
    from tunesmith.server.routes import files

    monkeypatch.setattr(files, "open", _enospc, raising=False)  # the upload's writer
    with TestClient(_app(tunesmith_home)) as client:
        resp = client.post("/v1/files", files={"file": ("book.txt", TEXT.encode())}, data={"purpose": "fine-tune"})
        assert resp.status_code == 507, resp.text
        error = resp.json()["error"]
        assert error["code"] == "insufficient_storage" and "disk is full" in error["message"]
        assert "book.txt" in error["message"] and error["param"] == "file"
        assert client.get("/v1/files").json()["data"] == []
    assert not list((tunesmith_home / "files").iterdir())


def test_an_upload_cut_off_by_a_killed_server_is_cleaned_up_at_the_next_start(tunesmith_home):
    files = tunesmith_home / "files"
    files.mkdir()
    stale = files / ".upload-file-0123456789abcdef01234567.txt"
    stale.write_text("half of a book")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = files / ".upload-file-89abcdef0123456789abcdef.txt"  # another server may be receiving this one now
    fresh.write_text("an upload in progress")
    with TestClient(_app(tunesmith_home)) as client:
        assert client.get("/v1/files").json()["data"] == []  # never acknowledged, never listed
    assert not stale.exists() and fresh.exists()


def test_a_worker_killed_mid_job_loses_nothing_acknowledged(tunesmith_home):
    from tunesmith.server.config import ServerConfig
    from tunesmith.server.store import Store, new_id
    from tunesmith.server.supervisor import Supervisor

    store = Store(tunesmith_home)
    store.files_dir.mkdir(parents=True)
    file_id = new_id("file")
    path = store.files_dir / f"{file_id}.txt"
    path.write_text(TEXT)
    store.add_file(file_id, "book.txt", path, path.stat().st_size)
    job = store.create_job(model="tiny-llama", training_file=file_id, validation_file=None, suffix=None, seed=1,
                           hyperparameters={"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 1.0,
                                            "block_size": 64})  # 9 steps an epoch, a checkpoint after each
    supervisor = Supervisor(store, ServerConfig(home=tunesmith_home, start_worker=False, worker_idle_exit=1.0))
    supervisor.tick()  # starts the worker
    worker = supervisor.proc
    try:
        deadline = time.monotonic() + 240
        while not store.list_checkpoints(job["id"])[0] and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        log = (store.logs_dir / "worker.log").read_text(errors="replace")[-3000:]
        assert worker.poll() is None, log
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    acknowledged = store.list_events(job["id"], limit=10_000)[0]
    checkpoints = store.list_checkpoints(job["id"])[0]
    assert checkpoints and store.get_job(job["id"])["status"] == "running", (store.get_job(job["id"]), log)

    supervisor.tick()  # sees the dead worker
    failed = store.get_job(job["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_died"
    assert f"pid {worker.pid}) was killed by signal 9" in failed["error"]["message"]
    assert "tunesmith jobs retry" in failed["error"]["message"]
    assert Run(failed["run_dir"]).status == "failed"
    events = {e["id"] for e in store.list_events(job["id"], limit=10_000)[0]}
    assert {e["id"] for e in acknowledged} <= events  # every event reported before the kill is still there

    store.retry_job(job["id"])
    supervisor.tick()
    try:
        deadline = time.monotonic() + 240
        while store.get_job(job["id"])["status"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        supervisor.stop()
    done = store.get_job(job["id"])
    assert done["status"] == "succeeded", done["error"]
    messages = [e["message"] for e in store.list_events(job["id"], limit=10_000)[0]]
    assert f"Resuming from the checkpoint at step {checkpoints[0]['step']}" in messages
    assert done["fine_tuned_model"] and Run(done["run_dir"]).status == "succeeded"


def test_sqlite_busy_under_concurrent_calls_loses_nothing(tunesmith_home):
    from tunesmith.server.store import Store

    store = Store(tunesmith_home)
    job = store.create_job(model="tiny-llama", training_file="file-" + "0" * 24, validation_file=None, suffix=None,
                           seed=1, hyperparameters={})
    holder = sqlite3.connect(store.db_path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock for a while
    release = threading.Timer(0.5, lambda: holder.execute("COMMIT"))
    release.start()
    errors = []

    def writer(n: int) -> None:
        try:
            for i in range(25):
                store.add_event(job["id"], f"writer {n} event {i}")
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    release.join()
    holder.close()
    assert not errors
    messages = [e["message"] for e in store.list_events(job["id"], limit=10_000)[0]]
    assert sorted(m for m in messages if m.startswith("writer")) == \
        sorted(f"writer {n} event {i}" for n in range(8) for i in range(25))


def test_sqlite_busy_past_the_timeout_is_a_503_and_nothing_is_stored(tunesmith_home):
    with TestClient(_app(tunesmith_home, busy_timeout=0.2)) as client:
        holder = sqlite3.connect(tunesmith_home / "tunesmith.db", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            resp = client.post("/v1/files", files={"file": ("book.txt", TEXT.encode())}, data={"purpose": "fine-tune"})
        finally:
            holder.execute("COMMIT")
            holder.close()
        assert resp.status_code == 503, resp.text
        assert resp.headers["retry-after"] == "1"
        error = resp.json()["error"]
        assert error["code"] == "database_busy" and "try again" in error["message"]
        assert not [p for p in (tunesmith_home / "files").iterdir()]  # not acknowledged, not kept
        again = client.post("/v1/files", files={"file": ("book.txt", TEXT.encode())}, data={"purpose": "fine-tune"})
        assert again.status_code == 200, again.text
        assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [again.json()["id"]]
