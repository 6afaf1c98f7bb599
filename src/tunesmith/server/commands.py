"""Typer commands: ``tunesmith serve`` and ``tunesmith jobs list|show|follow|cancel|retry``.

The ``jobs`` commands read the server's SQLite database directly, so they work without a server.
Nothing heavy is imported at module level: the main CLI imports this on every invocation.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import time
from datetime import datetime
from typing import Optional

import typer

from ..errors import TunesmithError, user_errors
from .store import TERMINAL

# ---------------------------------------------------------------------------------------------
# serve


def is_loopback(host: str) -> bool:
    """True when ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    addrs = {info[4][0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_bind(host: str, api_key: str | None, insecure_no_auth: bool) -> None:
    """Refuse to expose the API beyond this machine without a key (exit code 2)."""
    if api_key is not None and (not api_key.strip() or any(c.isspace() for c in api_key)):
        typer.echo("error: --api-key must be a non-empty string without spaces", err=True)
        raise typer.Exit(2)
    if not is_loopback(host) and not api_key and not insecure_no_auth:
        typer.echo(
            f"error: refusing to listen on {host} without an API key: anyone who can reach this machine could "
            "use its models and start training jobs.\n"
            "  Pass --api-key KEY (or set TUNESMITH_API_KEY), or --insecure-no-auth if you really mean it.",
            err=True,
        )
        raise typer.Exit(2)


def _loopback_names(host: str) -> tuple[str, ...]:
    """Host names a browser may use to reach a loopback server (anything else is DNS rebinding)."""
    from .guard import LOOPBACK_HOSTS

    return tuple(sorted({*LOOPBACK_HOSTS, host.strip().strip("[]").lower()}))


def serve_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Non-loopback needs --api-key."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="TUNESMITH_API_KEY",
        help="Require 'Authorization: Bearer KEY' on every /v1 request (env: TUNESMITH_API_KEY).",
    ),
    insecure_no_auth: bool = typer.Option(
        False, "--insecure-no-auth", help="Allow a non-loopback --host without an API key."
    ),
    max_running: int = typer.Option(8, "--max-running", min=1, help="Generation requests computed at once (decoded together in one batch)."),
    max_waiting: int = typer.Option(8, "--max-waiting", min=0, help="Requests that may wait; more get 429."),
    model_cache: str = typer.Option(
        "4GiB", "--model-cache", envvar="TUNESMITH_MODEL_CACHE",
        help="Memory budget for loaded models, e.g. 4GiB, 800MB (env: TUNESMITH_MODEL_CACHE).",
    ),
    max_tokens: int = typer.Option(2048, "--max-tokens", min=1, help="Largest max_tokens a request may ask for."),
    no_worker: bool = typer.Option(False, "--no-worker", help="Serve models only; do not run fine-tuning jobs."),
    quant: str = typer.Option("none", "--quant", help="Weights of loaded models: none (their dtype) or int8."),
    warm: bool = typer.Option(
        False, "--warm-decoding/--no-warm-decoding",
        help="Compile each loaded model's decoding step in the background (requests decode eagerly until it is ready).",
    ),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
) -> None:
    """Serve an OpenAI-compatible API (/v1) and a web playground (/) for base models and fine-tunes."""
    check_bind(host, api_key, insecure_no_auth)
    import uvicorn

    from ..generate import check_quant
    from ..home import home
    from .app import ServerConfig, create_app
    from .models_cache import parse_bytes

    check_quant(quant)
    try:
        cache_bytes = parse_bytes(model_cache)
    except ValueError:
        typer.echo(f"error: --model-cache: cannot read {model_cache!r} as a size (try 4GiB)", err=True)
        raise typer.Exit(2) from None
    config = ServerConfig(
        home=home(), api_key=api_key or None, max_running=max_running, max_waiting=max_waiting,
        cache_bytes=cache_bytes, max_tokens_cap=max_tokens, start_worker=not no_worker,
        allowed_hosts=_loopback_names(host) if is_loopback(host) else None, quant=quant, warm_decoding=warm,
    )
    app = create_app(config)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"tunesmith: playground at http://{shown}:{port}/  API at http://{shown}:{port}/v1  "
               f"(home {config.home}{', API key required' if api_key else ''})", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


# ---------------------------------------------------------------------------------------------
# jobs

jobs_app = typer.Typer(help="Fine-tuning jobs of `tunesmith serve` (reads its database; no server needed).",
                       no_args_is_help=True)


def _store():
    from .store import Store

    return Store()


def _when(ts: int | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def find_job(store, job_id: str) -> dict:
    """A job by id, or by a unique prefix of its id."""
    job = store.get_job(job_id)
    if job:
        return job
    matches = [j for j in store.list_jobs(limit=10_000)[0] if j["id"].startswith(job_id)] if len(job_id) >= 8 else []
    if len(matches) == 1:
        return matches[0]
    raise TunesmithError(
        f"no fine-tuning job '{job_id}'" + (" (the prefix matches several)" if matches else ""),
        hint="`tunesmith jobs list` shows the jobs in $TUNESMITH_HOME",
    )


def list_jobs_text(store, limit: int = 50) -> str:
    store.reap_stale_jobs()
    jobs, has_more = store.list_jobs(limit=limit)
    if not jobs:
        return "no fine-tuning jobs yet (start one with the API: POST /v1/fine_tuning/jobs, or the playground)"
    rows = [("ID", "STATUS", "BASE", "CREATED", "MODEL")]
    for j in jobs:
        rows.append((j["id"], j["status"], j["model"], _when(j["created_at"]), j["fine_tuned_model"] or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    if has_more:
        lines.append(f"... (showing the newest {limit})")
    if store.count_jobs("queued") and not store.worker_alive():
        lines.append("note: queued jobs run only while `tunesmith serve` is running")
    return "\n".join(lines)


def show_job_text(store, job_id: str, events: int = 10) -> str:
    store.reap_stale_jobs()
    j = find_job(store, job_id)
    hp = j["hyperparameters"]
    lines = [
        f"job       {j['id']}",
        f"status    {j['status']}" + (" (cancel requested)" if j["cancel_requested"] and j["status"] == "running" else ""),
        f"base      {j['model']}",
        f"file      {j['training_file']}",
        f"epochs    {hp.get('n_epochs')}   batch size {hp.get('batch_size')}   "
        f"lr multiplier {hp.get('learning_rate_multiplier')}   seed {j['seed']}",
        f"created   {_when(j['created_at'])}   finished {_when(j['finished_at'])}",
        f"run dir   {j['run_dir']}",
    ]
    if j["fine_tuned_model"]:
        lines.append(f"model     {j['fine_tuned_model']}")
    if j["trained_tokens"]:
        lines.append(f"tokens    {j['trained_tokens']:,}")
    if j["error"]:
        lines.append(f"error     {j['error'].get('message')}")
    recent, _ = store.list_events(j["id"], limit=events)
    if recent:
        lines.append("events:")
        for e in reversed(recent):
            lines.append(f"  {_when(e['created_at'])}  {e['level']:5}  {e['message']}")
    return "\n".join(lines)


def follow_job(store, job_id: str, *, poll: float = 1.0, echo=print, timeout: float | None = None) -> dict:
    """Print a job's events as they arrive, oldest first, until it reaches a final state."""
    job = find_job(store, job_id)
    seq = 0
    started = time.monotonic()
    while True:
        for e in store.events_since(job["id"], seq):
            seq = e["seq"]
            echo(f"{_when(e['created_at'])}  {e['message']}")
        job = store.get_job(job["id"])
        if job["status"] in TERMINAL:
            for e in store.events_since(job["id"], seq):  # the last words, written with the status
                seq = e["seq"]
                echo(f"{_when(e['created_at'])}  {e['message']}")
            return job
        if job["status"] == "running":
            store.reap_stale_jobs()
        if timeout is not None and time.monotonic() - started > timeout:
            return job
        time.sleep(poll)


@jobs_app.command("list")
@user_errors
def jobs_list(limit: int = typer.Option(50, "--limit", "-n", min=1, help="How many, newest first.")) -> None:
    """List fine-tuning jobs, newest first."""
    typer.echo(list_jobs_text(_store(), limit))


@jobs_app.command("show")
@user_errors
def jobs_show(job_id: str = typer.Argument(..., help="Job id (or a unique prefix of it).")) -> None:
    """Show one job: settings, status, model id and its latest events."""
    typer.echo(show_job_text(_store(), job_id))


@jobs_app.command("follow")
@user_errors
def jobs_follow(job_id: str = typer.Argument(..., help="Job id (or a unique prefix of it).")) -> None:
    """Print a job's events live until it succeeds, fails or is cancelled (exit 1 unless it succeeded)."""
    store = _store()
    try:
        job = follow_job(store, job_id, echo=typer.echo)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if job["status"] == "succeeded":
        typer.echo(f"succeeded: use model {job['fine_tuned_model']}")
        return
    message = (job.get("error") or {}).get("message", "")
    typer.echo(f"{job['status']}" + (f": {message}" if message else ""), err=True)
    raise typer.Exit(1)


@jobs_app.command("cancel")
@user_errors
def jobs_cancel(job_id: str = typer.Argument(..., help="Job id (or a unique prefix of it).")) -> None:
    """Cancel a queued job, or stop a running one after its current step (a checkpoint is kept)."""
    store = _store()
    job = find_job(store, job_id)
    if job["status"] in ("succeeded", "failed"):
        raise TunesmithError(f"job {job['id']} has already {job['status']}; there is nothing to cancel")
    job = store.request_cancel(job["id"])
    if job["status"] == "cancelled":
        typer.echo(f"{job['id']}: cancelled")
    else:
        typer.echo(f"{job['id']}: cancellation requested; training stops after the current step")


@jobs_app.command("retry")
@user_errors
def jobs_retry(job_id: str = typer.Argument(..., help="Job id (or a unique prefix of it).")) -> None:
    """Queue a failed or cancelled job again: it resumes from its last checkpoint (or trains from the
    start when it has none) once `tunesmith serve` runs."""
    from .store import resume_step

    store = _store()
    job = find_job(store, job_id)
    try:
        job = store.retry_job(job["id"])
    except ValueError as exc:
        raise TunesmithError(str(exc)) from None
    step = resume_step(job["run_dir"])
    typer.echo(f"{job['id']}: queued again; " + (f"it resumes from its checkpoint at step {step}" if step is not None
                                                  else "it trains from the start"))


def main() -> None:
    """``python -m tunesmith.server``: the serve command and the jobs commands without the main CLI."""
    app = typer.Typer(add_completion=False, no_args_is_help=True)
    app.command("serve")(serve_command)
    app.add_typer(jobs_app, name="jobs")
    try:
        app()
    except TunesmithError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
