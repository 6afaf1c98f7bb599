"""Durable server state in SQLite (WAL): uploaded files, fine-tuning jobs, their events and checkpoints.

Everything here is plain Python over ``sqlite3`` so the CLI (``tunesmith jobs ...``), the HTTP
server and the training worker share one source of truth at ``$TUNESMITH_HOME/tunesmith.db``.
Rows are returned as dicts already shaped like the OpenAI API objects (see ``*_object``).

One training worker runs per ``$TUNESMITH_HOME``: it holds an exclusive ``flock`` on
``worker.lock`` while alive. The kernel drops that lock when the process dies (even on SIGKILL),
so "the lock is free" is a reliable sign that a job still marked ``running`` has lost its worker.
"""

from __future__ import annotations

import fcntl
import json
import re
import secrets
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..home import home
from ..rundir import Run, is_run_dir
from .schema import SCHEMA

FILE_ID_RE = re.compile(r"^file-[0-9a-f]{24}$")
JOB_ID_RE = re.compile(r"^ftjob-[0-9a-f]{24}$")
TERMINAL = ("succeeded", "failed", "cancelled")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def fine_tuned_model_id(base: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base}:{suffix or 'tunesmith'}:{job_id}"


def restart_hint(job_id: str) -> str:
    return f"`tunesmith jobs retry {job_id}` (with `tunesmith serve` running)"


def resume_step(run_dir: str | Path) -> int | None:
    """The step a job's unfinished run would resume from (its newest checkpoint), or None when
    there is nothing to resume and the job trains from the start."""

    if not is_run_dir(run_dir):
        return None
    run = Run(run_dir)
    checkpoints = run.checkpoints()
    if run.status == "succeeded" or not checkpoints:
        return None
    return checkpoints[-1]["step"]


class Store:
    """All reads and writes of the server's durable state. Safe to use from many threads and processes:
    each operation opens its own short-lived connection (SQLite WAL, busy timeout 30 s)."""

    def __init__(self, root: str | Path | None = None, busy_timeout: float = 30.0):
        self.root = Path(root) if root is not None else home()
        self.busy_timeout = busy_timeout
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "tunesmith.db"
        self.files_dir = self.root / "files"
        self.runs_dir = self.root / "runs"
        self.logs_dir = self.root / "logs"
        self.lock_path = self.root / "worker.lock"
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    # -- plumbing ---------------------------------------------------------------------------
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=self.busy_timeout, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            db.execute("PRAGMA synchronous=NORMAL")
            yield db
        finally:
            db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction: takes the write lock up front, so read-then-write is atomic."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    # -- files ------------------------------------------------------------------------------
    def add_file(self, file_id: str, filename: str, path: Path, nbytes: int, purpose: str = "fine-tune") -> dict:
        now = int(time.time())
        with self._connect() as db:
            db.execute(
                "INSERT INTO files (id, filename, path, bytes, purpose, created_at) VALUES (?,?,?,?,?,?)",
                (file_id, filename, str(path), nbytes, purpose, now),
            )
        return self.get_file(file_id)

    def get_file(self, file_id: str) -> dict | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM files WHERE id=?", (file_id,)).fetchone()
        return dict(row) if row else None

    def list_files(self, purpose: str | None = None) -> list[dict]:
        with self._connect() as db:
            if purpose:
                rows = db.execute("SELECT * FROM files WHERE purpose=? ORDER BY seq DESC", (purpose,)).fetchall()
            else:
                rows = db.execute("SELECT * FROM files ORDER BY seq DESC").fetchall()
        return [dict(r) for r in rows]

    def jobs_using_file(self, file_id: str, active_only: bool = True) -> list[str]:
        sql = "SELECT id FROM jobs WHERE (training_file=? OR validation_file=?)"
        if active_only:
            sql += " AND status IN ('validating_files','queued','running')"
        with self._connect() as db:
            return [r["id"] for r in db.execute(sql, (file_id, file_id)).fetchall()]

    def remove_stale_uploads(self, older_than: float = 3600.0) -> list[Path]:
        """Delete the temporary files of uploads that a killed server left behind (``.upload-*`` not
        written to for ``older_than`` seconds). They were never acknowledged: no file id was returned."""
        removed = []
        for tmp in self.files_dir.glob(".upload-*") if self.files_dir.exists() else []:
            try:
                if time.time() - tmp.stat().st_mtime > older_than:
                    tmp.unlink()
                    removed.append(tmp)
            except FileNotFoundError:  # finished or removed meanwhile
                pass
        return removed

    def delete_file(self, file_id: str) -> bool:
        with self._connect() as db:
            row = db.execute("SELECT path FROM files WHERE id=?", (file_id,)).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM files WHERE id=?", (file_id,))
        try:
            Path(row["path"]).unlink()
        except FileNotFoundError:
            pass
        return True

    # -- jobs -------------------------------------------------------------------------------
    def create_job(
        self,
        *,
        model: str,
        training_file: str,
        validation_file: str | None,
        suffix: str | None,
        seed: int,
        hyperparameters: dict,
        metadata: dict | None = None,
    ) -> dict:
        job_id = new_id("ftjob")
        now = time.time()
        with self._connect() as db:
            db.execute(
                "INSERT INTO jobs (id, model, training_file, validation_file, suffix, seed, hyperparameters,"
                " status, created_at, queued_at, run_dir, metadata) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    job_id, model, training_file, validation_file, suffix, seed, json.dumps(hyperparameters),
                    "queued", int(now), now, str(self.runs_dir / job_id),
                    json.dumps(metadata) if metadata else None,
                ),
            )
        self.add_event(job_id, f"Created fine-tuning job: {job_id}")
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> dict | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job_row(row) if row else None

    def find_job_by_model(self, fine_tuned_model: str) -> dict | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE fine_tuned_model=?", (fine_tuned_model,)).fetchone()
        return _job_row(row) if row else None

    def list_jobs(self, after: str | None = None, limit: int = 20, status: str | None = None) -> tuple[list[dict], bool]:
        """Newest first. ``after`` is the last job id of the previous page; returns (jobs, has_more)."""
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if status:
            sql += " AND status=?"
            args.append(status)
        if after:
            sql += " AND seq < COALESCE((SELECT seq FROM jobs WHERE id=?), -1)"
            args.append(after)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit + 1)
        with self._connect() as db:
            rows = db.execute(sql, args).fetchall()
        return [_job_row(r) for r in rows[:limit]], len(rows) > limit

    def succeeded_jobs(self) -> list[dict]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status='succeeded' ORDER BY seq").fetchall()
        return [_job_row(r) for r in rows]

    def jobs_with_status(self, status: str) -> list[dict]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status=? ORDER BY queued_at, seq", (status,)).fetchall()
        return [_job_row(r) for r in rows]

    def count_jobs(self, status: str) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE status=?", (status,)).fetchone()[0]

    def request_cancel(self, job_id: str) -> dict | None:
        """Queued jobs are cancelled at once; a running job gets a flag its worker polls every step."""
        now = int(time.time())
        with self._tx() as db:
            row = db.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["status"] in ("queued", "validating_files"):
                db.execute(
                    "UPDATE jobs SET status='cancelled', cancel_requested=1, finished_at=? WHERE id=?", (now, job_id)
                )
                message = "Fine-tuning job cancelled before it started"
            elif row["status"] == "running":
                db.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))
                message = "Cancellation requested; training stops after the current step"
            else:
                message = None
        if message:
            self.add_event(job_id, message)
        return self.get_job(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with self._connect() as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def retry_job(self, job_id: str) -> dict | None:
        """Put a failed or cancelled job back at the end of the queue. When its run has a checkpoint
        the worker resumes from it (metrics and checkpoints after that step are dropped, as the
        resumed run reports them again); otherwise it trains again from the start."""
        with self._tx() as db:
            row = db.execute("SELECT status, run_dir FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["status"] not in ("failed", "cancelled"):
                raise ValueError(f"job {job_id} is {row['status']}; only failed or cancelled jobs can be retried")
            step = resume_step(row["run_dir"])
            db.execute(
                "UPDATE jobs SET status='queued', queued_at=?, started_at=NULL, finished_at=NULL, error=NULL,"
                " cancel_requested=0, worker_pid=NULL, fine_tuned_model=NULL, trained_tokens=NULL WHERE id=?",
                (time.time(), job_id),
            )
            db.execute("DELETE FROM checkpoints WHERE job_id=? AND step>?", (job_id, -1 if step is None else step))
            db.execute("DELETE FROM events WHERE job_id=? AND type='metrics' AND json_extract(data, '$.step')>?",
                       (job_id, 0 if step is None else step))
        self.add_event(job_id, "Job queued again (retry); " + (
            f"it resumes from its checkpoint at step {step}" if step is not None else "it trains from the start"))
        return self.get_job(job_id)

    def claim_next_job(self, pid: int) -> dict | None:
        """FIFO: the oldest queued job becomes ``running`` under this worker pid."""
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE status='queued' ORDER BY queued_at, seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status='running', worker_pid=?, started_at=? WHERE id=?",
                (pid, int(time.time()), row["id"]),
            )
        return self.get_job(row["id"])

    def update_job(self, job_id: str, **fields: Any) -> None:
        allowed = {"status", "finished_at", "fine_tuned_model", "error", "trained_tokens", "worker_pid", "hyperparameters"}
        assert set(fields) <= allowed, fields
        sets, args = [], []
        for key, value in fields.items():
            if key in ("error", "hyperparameters") and value is not None:
                value = json.dumps(value)
            sets.append(f"{key}=?")
            args.append(value)
        with self._connect() as db:
            db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id=?", (*args, job_id))

    def finish_job(self, job_id: str, status: str, *, error: dict | None = None, fine_tuned_model: str | None = None,
                   trained_tokens: int | None = None) -> None:
        assert status in TERMINAL
        fields: dict[str, Any] = {"status": status, "finished_at": int(time.time()), "error": error}
        if fine_tuned_model:
            fields["fine_tuned_model"] = fine_tuned_model
        if trained_tokens is not None:
            fields["trained_tokens"] = trained_tokens
        self.update_job(job_id, **fields)

    # -- events -----------------------------------------------------------------------------
    def add_event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
                  data: dict | None = None) -> dict:
        event_id = new_id("ftevent")
        with self._connect() as db:
            db.execute(
                "INSERT INTO events (id, job_id, created_at, level, type, message, data) VALUES (?,?,?,?,?,?,?)",
                (event_id, job_id, int(time.time()), level, type, message, json.dumps(data) if data else None),
            )
        return {"id": event_id}

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """Newest first, like OpenAI: ``after`` is the last event id of the previous page (older ones follow)."""
        rows, more = self._page("events", job_id, after, limit)
        return [_event_row(r) for r in rows], more

    def _page(self, table: str, job_id: str, after: str | None, limit: int) -> tuple[list, bool]:
        """One page of a job's rows in ``table`` (events or checkpoints), newest first, starting
        after the row whose id is ``after``; and whether more follow."""
        assert table in ("events", "checkpoints")
        sql, args = f"SELECT * FROM {table} WHERE job_id=?", [job_id]
        if after:
            sql += f" AND seq < COALESCE((SELECT seq FROM {table} WHERE id=?), -1)"
            args.append(after)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit + 1)
        with self._connect() as db:
            rows = db.execute(sql, args).fetchall()
        return rows[:limit], len(rows) > limit

    def events_since(self, job_id: str, since_seq: int = 0) -> list[dict]:
        """Oldest first, for following a job live; each row carries its ``seq`` cursor."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM events WHERE job_id=? AND seq>? ORDER BY seq", (job_id, since_seq)
            ).fetchall()
        return [{**_event_row(r), "seq": r["seq"]} for r in rows]

    def metrics(self, job_id: str) -> list[dict]:
        """Every metrics point of a job, oldest first (training and validation rows)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT data, created_at FROM events WHERE job_id=? AND type='metrics' ORDER BY seq", (job_id,)
            ).fetchall()
        return [json.loads(r["data"]) for r in rows if r["data"]]

    # -- checkpoints ------------------------------------------------------------------------
    def add_checkpoint(self, job_id: str, step: int, path: str, metrics: dict | None = None) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO checkpoints (id, job_id, step, path, created_at, metrics) VALUES (?,?,?,?,?,?)",
                (new_id("ftckpt"), job_id, int(step), str(path), int(time.time()), json.dumps(metrics or {})),
            )

    def list_checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> tuple[list[dict], bool]:
        rows, more = self._page("checkpoints", job_id, after, limit)
        return [{**dict(r), "metrics": json.loads(r["metrics"] or "{}")} for r in rows], more

    # -- the worker lock and crash recovery -------------------------------------------------
    def try_worker_lock(self):
        """Take the per-home worker lock without waiting; returns an open file (keep it) or None."""
        self.root.mkdir(parents=True, exist_ok=True)
        fh = open(self.lock_path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return None
        return fh

    def worker_alive(self) -> bool:
        fh = self.try_worker_lock()
        if fh is None:
            return True
        fh.close()
        return False

    def reap_stale_jobs(self, lock_held: bool = False) -> list[str]:
        """Mark jobs still ``running`` with no live worker as failed, with a message saying why and
        how to restart them. ``lock_held``: the caller holds the worker lock (so no worker runs)."""
        fh = None
        if not lock_held:
            fh = self.try_worker_lock()
            if fh is None:
                return []  # a worker is alive; its jobs are really running
        try:
            with self._connect() as db:
                rows = db.execute("SELECT id, worker_pid, run_dir FROM jobs WHERE status='running'").fetchall()
            reaped = []
            for row in rows:
                pid = row["worker_pid"]
                message = (
                    "the server stopped while this job was running"
                    + (f" (its training worker, pid {pid}, is gone)" if pid else "")
                    + f"; restart it with {restart_hint(row['id'])}"
                )
                self.finish_job(row["id"], "failed", error={"code": "server_stopped", "message": message, "param": None})
                self.add_event(row["id"], message, level="error")
                mark_run_failed(row["run_dir"], message)
                reaped.append(row["id"])
            return reaped
        finally:
            if fh is not None:
                fh.close()


def mark_run_failed(run_dir: str | None, message: str) -> None:
    """A failed job's run directory says ``failed`` too: after a crash its status.json may still say
    ``running``, and a worker stopped with its server leaves it ``cancelled``."""
    if not run_dir or not is_run_dir(run_dir):
        return
    run = Run(run_dir)
    state = run.state
    if state.get("status") not in ("failed", "succeeded"):
        run.set_status("failed", step=state.get("step"), error=message)


# -- row -> API object ---------------------------------------------------------------------------
def _job_row(row: sqlite3.Row) -> dict:
    job = dict(row)
    job["hyperparameters"] = json.loads(job["hyperparameters"])
    job["error"] = json.loads(job["error"]) if job["error"] else None
    job["metadata"] = json.loads(job["metadata"]) if job["metadata"] else None
    return job


def _event_row(row: sqlite3.Row) -> dict:
    return {
        "object": "fine_tuning.job.event",
        "id": row["id"],
        "created_at": row["created_at"],
        "level": row["level"],
        "message": row["message"],
        "data": json.loads(row["data"]) if row["data"] else {},
        "type": row["type"],
    }
