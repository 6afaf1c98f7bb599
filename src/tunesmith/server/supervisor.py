"""The worker supervisor: keeps one training worker process (worker.py) alive while jobs are queued,
and makes sure a worker that dies, or cannot start, never leaves a job hanging.

The worker is started with ``--parent-pid`` and stops with this server (see lifeline.py). It is
spawned from the supervisor's own thread, which lives as long as the server: on Linux the kernel
signals the worker when the thread that started it ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .config import ServerConfig
from .store import Store, mark_run_failed, restart_hint


class Supervisor:
    def __init__(self, store: Store, config: ServerConfig):
        self.store = store
        self.config = config
        self.proc: subprocess.Popen | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._failed_starts = 0

    def start(self) -> None:
        self.store.reap_stale_jobs()
        self._thread = threading.Thread(target=self._loop, name="tunesmith-supervisor", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # keep supervising; report on stderr
                print(f"tunesmith: worker supervisor: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            self._wake.wait(self.config.supervise_interval)
            self._wake.clear()

    def tick(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            if self.proc is not None:
                if self.proc.poll() is None:
                    return
                pid, rc = self.proc.pid, self.proc.returncode
                self.proc = None
                self._worker_exited(pid, rc)
            if self.store.count_jobs("queued") == 0:
                if self.store.count_jobs("running"):
                    self.store.reap_stale_jobs()  # a worker (ours or another server's) died mid-job
                return
            lock = self.store.try_worker_lock()
            if lock is None:
                return  # another worker on this home is alive; it takes queued jobs in turn
            try:
                self.store.reap_stale_jobs(lock_held=True)
            finally:
                lock.close()
            self.proc = self._spawn()

    def _worker_exited(self, pid: int, rc: int) -> None:
        """A worker that dies (killed for memory, crashed) must not leave its job 'running', and one
        that cannot even start must not leave the queue waiting forever."""
        if rc == 0:
            self._failed_starts = 0
            return
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
        orphans = [j for j in self.store.jobs_with_status("running") if j["worker_pid"] == pid]
        for job in orphans:
            message = (f"the training worker (pid {pid}) {how} while this job was running"
                       + (" (out of memory?)" if rc == -9 else "")
                       + f"; see {self.store.logs_dir / 'worker.log'}; restart it with {restart_hint(job['id'])}")
            self._fail(job, "worker_died", message)
        if orphans:
            self._failed_starts = 0
            return
        self._failed_starts += 1
        if self._failed_starts >= 3:
            self._failed_starts = 0
            queued = self.store.jobs_with_status("queued")
            if queued:
                tail = _log_tail(self.store.logs_dir / "worker.log")
                message = (f"the training worker could not start ({how}, 3 times)"
                           + (f": {tail}" if tail else "") + f"; see {self.store.logs_dir / 'worker.log'}")
                self._fail(queued[0], "worker_failed", message)

    def _fail(self, job: dict, code: str, message: str) -> None:
        self.store.finish_job(job["id"], "failed", error={"code": code, "message": message, "param": None})
        self.store.add_event(job["id"], message, level="error")
        mark_run_failed(job["run_dir"], message)

    def _spawn(self) -> subprocess.Popen:
        self.store.logs_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.store.logs_dir / "worker.log", "ab")
        env = {**os.environ, "TUNESMITH_HOME": str(self.store.root), "PYTHONUNBUFFERED": "1"}
        src = str(Path(__file__).resolve().parents[2])  # so an uninstalled checkout works too
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "tunesmith.server.worker", "--home", str(self.store.root),
                 "--idle-exit", str(self.config.worker_idle_exit), "--parent-pid", str(os.getpid())],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, close_fds=True,
            )
        finally:
            log.close()

    def stop(self, timeout: float = 20.0) -> None:
        """Stop supervising; ask a running worker to stop cleanly (it checkpoints and marks its job)."""
        with self._lock:
            self._stop.set()
            self._wake.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _log_tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])[:500]
