"""Unit tests for the server's durable state, admission control, model cache and CLI helpers (no torch)."""

from __future__ import annotations

import asyncio
import re
import threading

import pytest
import typer
from typer.testing import CliRunner

from tunesmith.server.admission import GenerationQueue, QueueFull
from tunesmith.server.commands import check_bind, follow_job, is_loopback, jobs_app, serve_command
from tunesmith.server.errors import APIError
from tunesmith.server.models_cache import ModelCache, parse_bytes
from tunesmith.server.routes.jobs import resolve_hyperparameters
from tunesmith.server.schemas import JobRequest
from tunesmith.server.store import FILE_ID_RE, JOB_ID_RE, Store, new_id


@pytest.fixture()
def store(tmp_path, monkeypatch) -> Store:
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path))
    return Store(tmp_path)


def _job(store: Store, **kw) -> dict:
    args = dict(model="tiny-llama", training_file=new_id("file"), validation_file=None, suffix=None, seed=1,
                hyperparameters={"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 1.0})
    args.update(kw)
    return store.create_job(**args)


def test_ids_are_strict_and_state_is_sqlite_wal(store: Store):
    assert FILE_ID_RE.match(new_id("file")) and JOB_ID_RE.match(new_id("ftjob"))
    for bad in ("file-../../etc/passwd", "file-0123", "file-" + "g" * 24, "ftjob-" + "0" * 23, "../ftjob-" + "0" * 24):
        assert not FILE_ID_RE.match(bad) and not JOB_ID_RE.match(bad)
    assert (store.root / "tunesmith.db").exists()
    with store._connect() as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_jobs_are_listed_newest_first_with_pagination(store: Store):
    ids = [_job(store)["id"] for _ in range(5)]
    page, more = store.list_jobs(limit=2)
    assert [j["id"] for j in page] == ids[::-1][:2] and more
    page2, more2 = store.list_jobs(after=page[-1]["id"], limit=2)
    assert [j["id"] for j in page2] == ids[::-1][2:4] and more2
    page3, more3 = store.list_jobs(after=page2[-1]["id"], limit=2)
    assert [j["id"] for j in page3] == [ids[0]] and not more3
    # a fresh store object (another process, a restarted server) sees the same jobs
    assert [j["id"] for j in Store(store.root).list_jobs(limit=10)[0]] == ids[::-1]


def test_events_newest_first_and_follow_cursor(store: Store):
    job = _job(store)
    for i in range(4):
        store.add_event(job["id"], f"event {i}", type="metrics", data={"step": i, "train_loss": 1.0 / (i + 1)})
    events, more = store.list_events(job["id"], limit=3)
    assert [e["message"] for e in events] == ["event 3", "event 2", "event 1"] and more
    assert events[0]["object"] == "fine_tuning.job.event" and events[0]["data"]["step"] == 3
    rest, more = store.list_events(job["id"], after=events[-1]["id"], limit=10)
    assert [e["message"] for e in rest] == ["event 0", f"Created fine-tuning job: {job['id']}"] and not more
    since = store.events_since(job["id"], 0)
    assert [e["message"] for e in since][-4:] == ["event 0", "event 1", "event 2", "event 3"]
    assert store.events_since(job["id"], since[-1]["seq"]) == []
    assert [m["step"] for m in store.metrics(job["id"])] == [0, 1, 2, 3]


def test_claim_is_fifo_and_cancel_of_queued_job_is_immediate(store: Store):
    a, b, c = _job(store), _job(store), _job(store)
    assert store.request_cancel(b["id"])["status"] == "cancelled"
    first = store.claim_next_job(pid=4242)
    assert first["id"] == a["id"] and first["status"] == "running" and first["worker_pid"] == 4242
    assert store.claim_next_job(pid=4242)["id"] == c["id"]  # b was cancelled: skipped
    assert store.claim_next_job(pid=4242) is None
    # cancelling a running job only raises the flag the worker polls
    assert store.request_cancel(a["id"])["status"] == "running"
    assert store.cancel_requested(a["id"]) and store.cancel_requested(b["id"])


def test_running_job_without_a_live_worker_is_failed_with_a_clear_error(store: Store):
    job = _job(store)
    store.claim_next_job(pid=999_999)
    held = store.try_worker_lock()  # a live worker holds the lock: nothing is reaped
    assert held is not None
    assert store.reap_stale_jobs() == []
    assert store.get_job(job["id"])["status"] == "running"
    held.close()  # the worker died (the kernel drops its lock)
    assert store.reap_stale_jobs() == [job["id"]]
    failed = store.get_job(job["id"])
    assert failed["status"] == "failed" and failed["finished_at"]
    assert "server stopped while this job was running" in failed["error"]["message"]
    assert f"tunesmith jobs retry {job['id']}" in failed["error"]["message"]
    # retry puts it back in the queue, at the end
    other = _job(store)
    again = store.retry_job(job["id"])
    assert again["status"] == "queued" and again["error"] is None
    assert store.claim_next_job(pid=1)["id"] == other["id"]
    with pytest.raises(ValueError):
        store.retry_job(other["id"])  # running: cannot be retried


def test_generation_queue_admits_running_plus_waiting_then_refuses():
    async def main():
        q = GenerationQueue(max_running=2, max_waiting=1)
        release = asyncio.Event()
        concurrent = 0
        peak = 0

        async def request():
            nonlocal concurrent, peak
            ticket = q.admit()
            async with ticket:
                concurrent += 1
                peak = max(peak, concurrent)
                await release.wait()
                concurrent -= 1

        tasks = [asyncio.create_task(request()) for _ in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull) as info:
            q.admit()
        assert info.value.status == 429 and info.value.code == "rate_limit_exceeded"
        release.set()
        await asyncio.gather(*tasks)
        assert peak == 2 and q.admitted == 0
        q.admit().release()  # capacity is back
        return True

    assert asyncio.run(main())


def test_model_cache_loads_once_and_evicts_least_recently_used():
    loads = []

    def loader(source):
        loads.append(source)
        return {"name": source}

    cache = ModelCache(max_bytes=250, loader=loader, sizer=lambda m: 100)
    a = cache.get("a")
    assert cache.get("a") is a and loads == ["a"]
    cache.get("b")
    cache.get("a")  # a is now the most recently used
    cache.get("c")  # 300 > 250: b goes
    assert set(cache.keys()) == {"a", "c"} and cache.used_bytes == 200
    cache.get("b", source="/runs/b")
    assert loads == ["a", "b", "c", "/runs/b"]
    # concurrent requests for a missing model load it once
    slow = ModelCache(max_bytes=10**9, loader=lambda s: (threading.Event().wait(0.1), loads.append("x"))[1] or s)
    threads = [threading.Thread(target=slow.get, args=("x",)) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert loads.count("x") == 1 and slow.loads == 1
    assert parse_bytes("4GiB") == 4 * 1024**3 and parse_bytes("800MB") == 800_000_000 and parse_bytes("123") == 123


def test_auto_hyperparameters_and_method_shape():
    small = resolve_hyperparameters(JobRequest(model="m", training_file="f"), 3_000)
    assert small == {"n_epochs": 4, "batch_size": 1, "learning_rate_multiplier": 1.0}
    big = resolve_hyperparameters(JobRequest(model="m", training_file="f"), 20 * 1024 * 1024)
    assert big["n_epochs"] == 2 and big["batch_size"] == 8
    req = JobRequest(model="m", training_file="f", method={"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": 0.5}}})
    assert resolve_hyperparameters(req, 500_000) == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 0.5}
    with pytest.raises(APIError) as info:
        resolve_hyperparameters(JobRequest(model="m", training_file="f", hyperparameters={"n_epochs": 0}), 10)
    assert info.value.param == "hyperparameters.n_epochs"
    with pytest.raises(APIError) as info:
        resolve_hyperparameters(JobRequest(model="m", training_file="f", method={"type": "dpo"}), 10)
    assert info.value.param == "method.type"


def test_binding_beyond_loopback_needs_a_key():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.168.1.10")
    check_bind("127.0.0.1", None, False)
    check_bind("0.0.0.0", "secret", False)
    check_bind("0.0.0.0", None, True)
    cli = typer.Typer()
    cli.command()(serve_command)
    result = CliRunner().invoke(cli, ["--host", "0.0.0.0", "--port", "1"])
    assert result.exit_code == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in result.output
    assert "--api-key" in result.output and "--insecure-no-auth" in result.output


def test_jobs_cli_lists_shows_cancels_and_follows(store: Store):
    runner = CliRunner()
    empty = runner.invoke(jobs_app, ["list"])
    assert empty.exit_code == 0 and "no fine-tuning jobs yet" in empty.output
    job = _job(store, suffix="poems")
    listed = runner.invoke(jobs_app, ["list"])
    assert listed.exit_code == 0 and job["id"] in listed.output and "queued" in listed.output
    assert "queued jobs run only while `tunesmith serve` is running" in listed.output
    shown = runner.invoke(jobs_app, ["show", job["id"]])
    assert shown.exit_code == 0 and "status    queued" in shown.output and "Created fine-tuning job" in shown.output
    cancelled = runner.invoke(jobs_app, ["cancel", job["id"][:12]])  # a unique prefix is enough
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.output
    assert store.get_job(job["id"])["status"] == "cancelled"
    lines: list[str] = []
    final = follow_job(store, job["id"], poll=0.01, echo=lines.append, timeout=5)
    assert final["status"] == "cancelled" and any("cancelled before it started" in line for line in lines)
    followed = runner.invoke(jobs_app, ["follow", job["id"]])
    assert followed.exit_code == 1 and "cancelled" in followed.output
    missing = runner.invoke(jobs_app, ["show", "ftjob-" + "0" * 24])
    assert missing.exit_code != 0 and re.search(r"no fine-tuning job", str(missing.exception) + missing.output)


def test_a_dead_or_broken_worker_never_leaves_jobs_hanging(store: Store):
    from tunesmith.server.config import ServerConfig
    from tunesmith.server.supervisor import Supervisor

    sup = Supervisor(store, ServerConfig(home=store.root, start_worker=False))
    running = _job(store)
    store.claim_next_job(pid=31337)
    sup._worker_exited(31337, -9)  # e.g. killed for memory while training
    job = store.get_job(running["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "worker_died"
    assert "killed by signal 9" in job["error"]["message"] and "out of memory?" in job["error"]["message"]
    # a worker that crashes before claiming anything, three times in a row: the queue head fails with the log's last line
    queued = _job(store)
    store.logs_dir.mkdir(parents=True, exist_ok=True)
    (store.logs_dir / "worker.log").write_text("Traceback ...\nImportError: no module named torch\n")
    sup._worker_exited(1, 1)
    sup._worker_exited(2, 1)
    assert store.get_job(queued["id"])["status"] == "queued"
    sup._worker_exited(3, 1)
    job = store.get_job(queued["id"])
    assert job["status"] == "failed" and "could not start" in job["error"]["message"]
    assert "ImportError: no module named torch" in job["error"]["message"]


def test_a_failed_job_and_its_run_directory_agree(store: Store):
    """After the server and its worker die, a job found running is failed, and so is its run."""
    import json
    from pathlib import Path

    from tunesmith.server.config import ServerConfig
    from tunesmith.server.supervisor import Supervisor

    def run_dir(job: dict, status: str) -> Path:
        path = Path(job["run_dir"])
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps({"tunesmith_run": 1, "base": "tiny-llama"}))
        (path / "status.json").write_text(json.dumps({"status": status, "step": 7}))
        return path

    reaped = _job(store)
    store.claim_next_job(pid=999_999)
    path = run_dir(reaped, "running")
    assert store.reap_stale_jobs() == [reaped["id"]]
    job = store.get_job(reaped["id"])
    state = json.loads((path / "status.json").read_text())
    assert job["status"] == state["status"] == "failed" and state["step"] == 7
    assert state["error"] == job["error"]["message"]
    # a worker that the supervisor sees die: the same
    died = _job(store)
    store.claim_next_job(pid=31337)
    path = run_dir(died, "running")
    Supervisor(store, ServerConfig(home=store.root, start_worker=False))._worker_exited(31337, -9)
    job = store.get_job(died["id"])
    state = json.loads((path / "status.json").read_text())
    assert job["status"] == state["status"] == "failed" and state["error"] == job["error"]["message"]
    # a finished run is left as it is
    done = _job(store)
    store.claim_next_job(pid=4)
    path = run_dir(done, "succeeded")
    store.reap_stale_jobs()
    assert json.loads((path / "status.json").read_text())["status"] == "succeeded"
