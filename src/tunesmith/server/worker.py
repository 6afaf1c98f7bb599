"""The training worker: a separate process that runs queued fine-tuning jobs, oldest first, one at a time.

Started by the server (``python -m tunesmith.server.worker --home DIR``) whenever jobs are queued and no
worker holds ``$TUNESMITH_HOME/worker.lock``. It exits after a few idle seconds. Every training event
goes to the SQLite store; cancellation is a flag in the store that ``should_stop`` polls.

SIGINT/SIGTERM (Ctrl-C on ``tunesmith serve``, or the server shutting down) stop training cleanly
after the current step: a checkpoint is saved and the job is marked failed with a restart hint.
So does the death of the server that started it (``--parent-pid``, see lifeline.py).
If the worker is killed outright, the next server to start sees the free lock and marks the job failed.
A retried job whose run has a checkpoint resumes from it (``train.resume``) instead of starting over.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from ..config import TrainConfig
from ..events import JOB_METRIC_NAMES, TrainEvent
from .lifeline import watch_parent
from .store import Store, fine_tuned_model_id, mark_run_failed, restart_hint, resume_step

POLL_SECONDS = 0.5


# The metrics a job event carries, under their job names (events.JOB_METRIC_NAMES).
JOB_STEP_METRICS = ("epoch", "training_loss", "training_token_accuracy", "elapsed_tokens", "tokens_per_second")
JOB_VALIDATION_METRICS = ("validation_loss", "validation_token_accuracy", "validation_perplexity")


def job_metrics(event: TrainEvent, names: tuple[str, ...]) -> dict:
    return {JOB_METRIC_NAMES.get(name, name): event.metrics.get(name) for name in names}


def _fmt(value, spec=".4f"):
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def _learning_rate(multiplier: float | None, method: str = "lora") -> float | None:
    """``learning_rate_multiplier`` scales tunesmith's default learning rate for the method."""
    if multiplier is None or float(multiplier) == 1.0:
        return None
    return float(TrainConfig(method=method).learning_rate) * float(multiplier)


class JobRunner:
    def __init__(self, store: Store, job: dict, interrupted: threading.Event):
        self.store = store
        self.job = job
        self.job_id = job["id"]
        self.interrupted = interrupted
        self._last_poll = 0.0
        self._cancel = False
        self.last_train: dict = {}
        self.last_valid: dict = {}
        self.step = 0
        self.trained_tokens: int | None = None

    # -- callbacks handed to train.finetune -----------------------------------------------------
    def should_stop(self) -> bool:
        if self.interrupted.is_set():
            return True
        now = time.monotonic()
        if now - self._last_poll >= POLL_SECONDS:
            self._last_poll = now
            self._cancel = self.store.cancel_requested(self.job_id)
        return self._cancel

    def on_event(self, event: TrainEvent) -> None:
        try:
            self._on_event(event)
        except Exception:  # never let bookkeeping kill a training run
            traceback.print_exc()

    def _on_event(self, event: TrainEvent) -> None:
        add = self.store.add_event
        if event.type == "info":
            add(self.job_id, event.message or "")
        elif event.type == "metrics":
            self.step = int(event.step or 0)
            data = {"step": self.step, "total_steps": event.total_steps, **job_metrics(event, JOB_STEP_METRICS)}
            self.last_train = data
            if isinstance(event.get("elapsed_tokens"), (int, float)):
                self.trained_tokens = int(event["elapsed_tokens"])
                self.store.update_job(self.job_id, trained_tokens=self.trained_tokens)
            total = f"/{data['total_steps']}" if data["total_steps"] else ""
            add(self.job_id, f"Step {self.step}{total}: training loss={_fmt(data['train_loss'])}",
                type="metrics", data=data)
        elif event.type == "validation":
            step = int(event.step if event.step is not None else self.step)
            data = {"step": step, **job_metrics(event, JOB_VALIDATION_METRICS)}
            self.last_valid = data
            add(self.job_id, f"Step {step}: validation loss={_fmt(data['valid_loss'])}, "
                f"perplexity={_fmt(data['validation_perplexity'], '.2f')}", type="metrics", data=data)
        elif event.type == "checkpoint":
            step = int(event.step if event.step is not None else self.step)
            metrics = {"step": step}
            for key in ("train_loss", "train_mean_token_accuracy"):
                if self.last_train.get(key) is not None:
                    metrics[key] = self.last_train[key]
            for key in ("valid_loss", "valid_mean_token_accuracy"):
                if self.last_valid.get(key) is not None:
                    metrics[key] = self.last_valid[key]
            self.store.add_checkpoint(self.job_id, step, event.path or "", metrics)
            add(self.job_id, f"Checkpoint saved at step {step}")
        # "done": the final status is recorded by run()

    # -- the job --------------------------------------------------------------------------------
    def run(self) -> str:
        store, job, job_id = self.store, self.job, self.job_id
        hp = job["hyperparameters"]
        file = store.get_file(job["training_file"])
        if file is None or not Path(file["path"]).exists():
            return self._fail("training_file_missing",
                              f"training file {job['training_file']} no longer exists", "training_file")
        if store.cancel_requested(job_id):
            store.finish_job(job_id, "cancelled")
            store.add_event(job_id, "Fine-tuning job cancelled")
            return "cancelled"
        store.add_event(job_id, "Fine-tuning job started")
        validation = None
        if job.get("validation_file"):
            vfile = store.get_file(job["validation_file"])
            if vfile is None or not Path(vfile["path"]).exists():
                return self._fail("validation_file_missing",
                                  f"validation file {job['validation_file']} no longer exists", "validation_file")
            validation = vfile["path"]
        try:
            from .. import train
            from ..errors import TunesmithError

            step = resume_step(job["run_dir"])
            if step is not None:
                self.step = step
                store.add_event(job_id, f"Resuming from the checkpoint at step {step}")
                run = train.resume(job["run_dir"], on_event=self.on_event, should_stop=self.should_stop,
                                   progress=False, samples=bool(hp.get("samples", False)))
            else:
                config = TrainConfig(
                    base=job["model"],
                    epochs=int(hp["n_epochs"]),
                    lr=_learning_rate(hp.get("learning_rate_multiplier", 1.0)),
                    batch_size=int(hp["batch_size"]),
                    seed=int(job["seed"]),
                    **{k: hp[k] for k in ("block_size", "max_steps") if hp.get(k) is not None},
                )
                run = train.finetune(
                    file["path"],
                    config,
                    validation=validation,
                    out=job["run_dir"],
                    overwrite=True,
                    on_event=self.on_event,
                    should_stop=self.should_stop,
                    progress=False,
                    samples=bool(hp.get("samples", False)),
                )
        except TunesmithError as err:
            return self._fail("invalid_training_file" if err.file or err.line else "training_error",
                              str(err), err.field)
        except Exception as exc:
            traceback.print_exc()
            return self._fail("internal_error", f"training crashed: {type(exc).__name__}: {exc}", None)

        status = run.status
        if status == "succeeded":
            model_id = fine_tuned_model_id(job["model"], job["suffix"], job_id)
            store.finish_job(job_id, "succeeded", fine_tuned_model=model_id, trained_tokens=self.trained_tokens)
            store.add_event(job_id, f"New fine-tuned model created: {model_id}")
            store.add_event(job_id, "The job has successfully completed")
            return "succeeded"
        if status == "cancelled" and store.cancel_requested(job_id):
            store.finish_job(job_id, "cancelled", trained_tokens=self.trained_tokens)
            store.add_event(job_id, f"Fine-tuning job cancelled at step {self.step}; a checkpoint was saved")
            return "cancelled"
        if status == "cancelled" and self.interrupted.is_set():
            return self._fail("server_stopped",
                              f"the server stopped while this job was running (training stopped cleanly at "
                              f"step {self.step}); restart it with {restart_hint(job_id)}", None)
        error = run.state.get("error")
        return self._fail("training_error", f"training ended with status '{status}'" + (f": {error}" if error else ""), None)

    def _fail(self, code: str, message: str, param: str | None) -> str:
        self.store.finish_job(self.job_id, "failed", error={"code": code, "message": message, "param": param},
                              trained_tokens=self.trained_tokens)
        self.store.add_event(self.job_id, message, level="error")
        mark_run_failed(self.job["run_dir"], message)
        return "failed"


def serve_queue(store: Store, *, idle_exit: float = 3.0, interrupted: threading.Event | None = None) -> int:
    """Run queued jobs until none has been waiting for ``idle_exit`` seconds. Returns jobs run, or -1
    when another worker holds the lock."""
    lock = store.try_worker_lock()
    if lock is None:
        return -1
    interrupted = interrupted or threading.Event()
    done = 0
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        store.reap_stale_jobs(lock_held=True)
        idle_since = time.monotonic()
        while not interrupted.is_set():
            job = store.claim_next_job(os.getpid())
            if job is None:
                if time.monotonic() - idle_since > idle_exit:
                    break
                interrupted.wait(0.3)
                continue
            print(f"[worker {os.getpid()}] running {job['id']}", flush=True)
            status = JobRunner(store, job, interrupted).run()
            print(f"[worker {os.getpid()}] {job['id']} -> {status}", flush=True)
            done += 1
            idle_since = time.monotonic()
    finally:
        lock.close()
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunesmith.server.worker")
    parser.add_argument("--home", required=True, help="the TUNESMITH_HOME whose queue to run")
    parser.add_argument("--idle-exit", type=float, default=3.0, help="exit after this many idle seconds")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process (the server) ends")
    args = parser.parse_args(argv)
    os.environ["TUNESMITH_HOME"] = str(Path(args.home).resolve())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    interrupted = threading.Event()

    def _stop(signum, frame):
        interrupted.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    if args.parent_pid is not None:
        watch_parent(args.parent_pid, interrupted)
    store = Store(os.environ["TUNESMITH_HOME"])
    serve_queue(store, idle_exit=args.idle_exit, interrupted=interrupted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
