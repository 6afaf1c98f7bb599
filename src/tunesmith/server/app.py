"""The HTTP server: an OpenAI-compatible API over tunesmith models and jobs, and the web playground.

``create_app(ServerConfig(...))`` builds the FastAPI app. Nothing heavy is imported here: torch and
transformers load on the first generation request (in a worker thread), so the server starts fast.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Union

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import TunesmithError
from .models_cache import ModelCache
from .store import (
    FILE_ID_RE,
    JOB_ID_RE,
    Store,
    checkpoint_object,
    file_object,
    job_object,
    new_id,
    restart_hint,
)

PLAYGROUND_DIR = Path(__file__).parent / "playground"
MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,199}$")
SUFFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
EXT_RE = re.compile(r"^\.[a-z0-9]{1,10}$")
MB = 1024 * 1024


@dataclass
class ServerConfig:
    home: Path | None = None
    api_key: str | None = None
    max_running: int = 2  # generation requests computing at once
    max_waiting: int = 8  # more requests may wait for a slot; beyond that: 429
    cache_bytes: int | None = None  # loaded-model budget (default $TUNESMITH_MODEL_CACHE or 4 GiB)
    max_upload_bytes: int = 50 * MB
    max_body_bytes: int = 1 * MB
    max_tokens_cap: int = 2048
    start_worker: bool = True  # run queued fine-tuning jobs in a worker process
    worker_idle_exit: float = 3.0
    supervise_interval: float = 1.0
    model_cache: ModelCache | None = None  # tests inject one with a fake loader
    # Host names requests may be addressed to (DNS-rebinding guard); None: any. `serve` sets the
    # loopback names when it listens on a loopback address.
    allowed_hosts: tuple[str, ...] | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _error_bytes(message: str, type: str, param: str | None, code: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}}).encode()


class RequestTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body too large: the limit is {limit:,} bytes")


def _param_from_loc(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    # pydantic names union branches ("str", "list[str]", "function-after[...]"); they are not fields
    parts = [p for p in parts if not re.match(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|literal\[.*\]|function-.*|union\[.*\]|json-or-python\[.*\])$", p)]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


# ---------------------------------------------------------------------------------------------
# Admission control for generation


class QueueFull(APIError):
    def __init__(self, running: int, waiting: int):
        super().__init__(
            429,
            f"the server is busy: {running} generation request(s) are running and {waiting} are waiting; "
            "try again shortly",
            type="requests",
            code="rate_limit_exceeded",
        )


class Ticket:
    """One admitted request: ``await acquire()`` waits for a running slot; ``release()`` is idempotent."""

    def __init__(self, queue: "GenerationQueue"):
        self.queue = queue
        self.running = False
        self.released = False

    async def acquire(self) -> None:
        await self.queue._sem.acquire()
        self.running = True

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self.running:
            self.queue._sem.release()
        self.queue.admitted -= 1

    async def __aenter__(self) -> "Ticket":
        await self.acquire()
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()


class GenerationQueue:
    """At most ``max_running`` generations run at once and ``max_waiting`` more wait; any more are refused."""

    def __init__(self, max_running: int = 2, max_waiting: int = 8):
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.admitted = 0
        self._sem = asyncio.Semaphore(max_running)

    def admit(self) -> Ticket:
        if self.admitted >= self.max_running + self.max_waiting:
            raise QueueFull(self.max_running, self.max_waiting)
        self.admitted += 1
        return Ticket(self)


# ---------------------------------------------------------------------------------------------
# Middleware: auth and body limits (pure ASGI so it also guards unknown routes and streaming bodies)


class GuardMiddleware:
    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.config.allowed_hosts is not None and _hostname(host) not in self.config.allowed_hosts:
            return await _send_json(send, 403, _error_bytes(
                f"requests addressed to host '{_hostname(host)[:100]}' are not accepted: this server listens on "
                "a loopback address", "invalid_request_error", None, "forbidden_host"))
        origin = headers.get("origin")
        if origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != host.lower()):
            # Browsers send Origin on cross-site requests: another web page must not drive this API.
            return await _send_json(send, 403, _error_bytes(
                "cross-origin requests are not accepted", "invalid_request_error", None, "cross_origin"))
        if self.config.api_key and (path == "/v1" or path.startswith("/v1/")):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode("utf-8", "replace"), self.config.api_key.encode("utf-8")
            )
            if not ok:
                message = ("Incorrect API key provided." if auth else
                           "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.")
                return await _send_json(send, 401, _error_bytes(message, "invalid_request_error", None, "invalid_api_key"),
                                        extra=[(b"www-authenticate", b"Bearer")])
        limit = self.config.max_upload_bytes if path.rstrip("/") == "/v1/files" else self.config.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > limit + (64 * 1024 if limit == self.config.max_upload_bytes else 0)
            except ValueError:
                too_big = False
            if too_big:
                return await _send_json(send, 413, _error_bytes(
                    f"request body too large: the limit is {limit:,} bytes", "invalid_request_error", None,
                    "request_too_large"))
        seen = 0
        slack = 64 * 1024 if limit == self.config.max_upload_bytes else 0  # multipart framing

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit + slack:
                    raise RequestTooLarge(limit)
            return message

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        return await self.app(scope, limited_receive, guarded_send)


def _hostname(host: str) -> str:
    """``example.com:8000`` -> ``example.com``; ``[::1]:8000`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


async def _send_json(send, status: int, body: bytes, extra: list | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + (extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------
# Request bodies


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


StopField = Union[str, list[str], None]


class SamplingRequest(_Loose):
    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: StopField = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: dict | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    # tunesmith extensions
    top_k: int = Field(default=0, ge=0, le=1000)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[int], None] = ""
    max_tokens: int | None = Field(default=None, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None


class ChatMessage(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = None


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class Hyperparameters(_Loose):
    n_epochs: Union[Literal["auto"], int, None] = "auto"
    batch_size: Union[Literal["auto"], int, None] = "auto"
    learning_rate_multiplier: Union[Literal["auto"], float, None] = "auto"
    # tunesmith extensions
    max_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    block_size: int | None = Field(default=None, ge=16, le=8192)


class JobRequest(_Loose):
    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    suffix: str | None = Field(default=None, max_length=64)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = None
    method: dict | None = None
    metadata: dict[str, str] | None = None


# ---------------------------------------------------------------------------------------------
# The worker supervisor: keeps one training worker process alive while jobs are queued


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
            self.store.finish_job(job["id"], "failed", error={"code": "worker_died", "message": message, "param": None})
            self.store.add_event(job["id"], message, level="error")
        if orphans:
            self._failed_starts = 0
            return
        self._failed_starts += 1
        if self._failed_starts >= 3:
            self._failed_starts = 0
            queued = self.store.jobs_with_status("queued")
            if queued:
                job = queued[0]
                tail = _log_tail(self.store.logs_dir / "worker.log")
                message = (f"the training worker could not start ({how}, 3 times)"
                           + (f": {tail}" if tail else "") + f"; see {self.store.logs_dir / 'worker.log'}")
                self.store.finish_job(job["id"], "failed", error={"code": "worker_failed", "message": message,
                                                                  "param": None})
                self.store.add_event(job["id"], message, level="error")

    def _spawn(self) -> subprocess.Popen:
        self.store.logs_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.store.logs_dir / "worker.log", "ab")
        env = {**os.environ, "TUNESMITH_HOME": str(self.store.root), "PYTHONUNBUFFERED": "1"}
        src = str(Path(__file__).resolve().parents[2])  # so an uninstalled checkout works too
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "tunesmith.server.worker", "--home", str(self.store.root),
                 "--idle-exit", str(self.config.worker_idle_exit)],
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


# ---------------------------------------------------------------------------------------------
# Helpers


def _log_tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])[:500]


def _now() -> int:
    return int(time.time())


def _stop_list(stop: StopField) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4:
        raise APIError(400, "at most 4 stop sequences are allowed", param="stop")
    return [s for s in stops if s]


def _message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") in ("text", "input_text") and isinstance(part.get("text"), str):
            parts.append(part["text"])
        else:
            raise APIError(400, "only text content parts are supported", param="messages")
    return "".join(parts)


def _auto_epochs(nbytes: int) -> int:
    if nbytes < 1 * MB:
        return 4
    if nbytes < 10 * MB:
        return 3
    return 2


def _auto_batch(nbytes: int) -> int:
    # ~4 bytes per token, 512-token blocks: a tiny file has only a few blocks
    blocks = max(1, nbytes // 2048)
    return max(1, min(8, blocks // 4))


def resolve_hyperparameters(req: JobRequest, training_bytes: int) -> dict:
    hp = (req.hyperparameters or Hyperparameters()).model_dump()
    method = req.method
    if method is not None:
        kind = method.get("type", "supervised")
        if kind != "supervised":
            raise APIError(400, f"method type '{kind}' is not supported; tunesmith fine-tunes with 'supervised'",
                           param="method.type")
        sup = (method.get("supervised") or {}).get("hyperparameters") or {}
        try:
            parsed = Hyperparameters(**sup).model_dump(exclude_unset=True)
        except Exception as exc:
            raise APIError(400, f"invalid method.supervised.hyperparameters: {exc}",
                           param="method.supervised.hyperparameters") from None
        hp.update(parsed)

    def pick(name: str, auto, lo, hi, kind):
        value = hp.get(name)
        if value in (None, "auto"):
            return auto
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
            raise APIError(400, f"must be 'auto' or a{'n integer' if kind is int else ' number'}",
                           param=f"hyperparameters.{name}")
        if not lo <= value <= hi:
            raise APIError(400, f"must be between {lo} and {hi}, got {value}", param=f"hyperparameters.{name}")
        return kind(value)

    out = {
        "n_epochs": pick("n_epochs", _auto_epochs(training_bytes), 1, 50, int),
        "batch_size": pick("batch_size", _auto_batch(training_bytes), 1, 256, int),
        "learning_rate_multiplier": 1.0,
    }
    lrm = hp.get("learning_rate_multiplier")
    if lrm not in (None, "auto"):
        if isinstance(lrm, bool) or not isinstance(lrm, (int, float)) or not 0 < lrm <= 100:
            raise APIError(400, "must be 'auto' or a number in (0, 100]", param="hyperparameters.learning_rate_multiplier")
        out["learning_rate_multiplier"] = float(lrm)
    for extra in ("max_steps", "block_size"):
        if hp.get(extra) is not None:
            out[extra] = int(hp[extra])
    return out


# ---------------------------------------------------------------------------------------------
# The app


def create_app(config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    store = Store(config.home)
    cache = config.model_cache or ModelCache(config.cache_bytes)
    gen_queue = GenerationQueue(config.max_running, config.max_waiting)
    executor = ThreadPoolExecutor(max_workers=config.max_running + 1, thread_name_prefix="tunesmith-gen")
    supervisor = Supervisor(store, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if config.start_worker:
            supervisor.start()
        try:
            yield
        finally:
            if config.start_worker:
                await asyncio.get_running_loop().run_in_executor(None, supervisor.stop)
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="tunesmith", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(GuardMiddleware, config=config)
    app.state.config = config
    app.state.store = store
    app.state.cache = cache
    app.state.queue = gen_queue
    app.state.supervisor = supervisor

    # -- errors ---------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(TunesmithError)
    async def _tunesmith_error(request: Request, exc: TunesmithError):
        return error_response(400, str(exc), "invalid_request_error", exc.field, None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "We could not parse the JSON body of your request: "
                                  f"{(first.get('ctx') or {}).get('error', 'invalid JSON')}. "
                                  "Send a valid JSON object.", param=None, code="invalid_json")
        param = _param_from_loc(tuple(first.get("loc", ())))
        msg = first.get("msg", "invalid value")
        if first.get("type") == "missing":
            message = f"Missing required parameter: '{param}'."
            code = "missing_required_parameter"
        else:
            message = f"Invalid value for '{param}': {msg}." if param else f"Invalid request: {msg}."
            code = "invalid_value"
        return error_response(400, message, "invalid_request_error", param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, RequestTooLarge):
            exc = exc.__cause__
        if exc.status_code == 404 and exc.detail in ("Not Found", None):
            return error_response(404, f"Unknown request URL: {request.method} {request.url.path}. "
                                  "Please check the URL for typos.", code="unknown_url")
        if exc.status_code == 405:
            return error_response(405, f"Method {request.method} is not allowed for {request.url.path}.",
                                  code="method_not_allowed")
        if exc.status_code == 413:
            return error_response(413, str(exc.detail), code="request_too_large")
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        import traceback

        traceback.print_exception(exc)
        return error_response(500, f"The server had an error while processing your request: "
                              f"{type(exc).__name__}: {exc}", "server_error")

    # -- model ids ------------------------------------------------------------------------------
    def _check_model_id(model_id: str, param: str = "model") -> None:
        if not MODEL_ID_RE.match(model_id) or ".." in model_id:
            raise APIError(400, f"invalid model id {model_id[:80]!r}: letters, digits and . _ : + - only",
                           param=param, code="invalid_model")

    _bases_cache: dict = {"at": 0.0, "rows": []}

    def base_models() -> list[dict]:
        if time.monotonic() - _bases_cache["at"] > 5:
            from ..models import list_models

            _bases_cache["rows"] = [m for m in list_models() if m.get("available")]
            _bases_cache["at"] = time.monotonic()
        return _bases_cache["rows"]

    def finished_runs() -> list[tuple[str, Path, int]]:
        """(id, path, created) for succeeded run directories under $TUNESMITH_HOME/runs that no job owns."""
        from ..rundir import is_run_dir

        out = []
        root = store.runs_dir
        if not root.is_dir():
            return out
        for path in sorted(root.iterdir()):
            name = path.name
            if name.startswith(".") or JOB_ID_RE.match(name) or not MODEL_ID_RE.match(name):
                continue
            if not is_run_dir(path):
                continue
            try:
                status = json.loads((path / "status.json").read_text()).get("status")
            except (OSError, json.JSONDecodeError):
                continue
            if status == "succeeded":
                out.append((name, path, int(path.stat().st_mtime)))
        return out

    def model_objects() -> list[dict]:
        rows = []
        for m in base_models():
            rows.append({"id": m["name"], "object": "model", "created": 0, "owned_by": "tunesmith",
                         "kind": "base", "description": m.get("description", "")})
        for job in reversed(store.succeeded_jobs()):
            rows.append({"id": job["fine_tuned_model"], "object": "model", "created": job["finished_at"] or job["created_at"],
                         "owned_by": "user", "kind": "fine-tune", "parent": job["model"], "job": job["id"]})
        for name, path, created in finished_runs():
            rows.append({"id": name, "object": "model", "created": created, "owned_by": "user", "kind": "run"})
        return rows

    def resolve_model(model_id: str) -> tuple[str, str]:
        """(cache key, what generate.load takes) for an allowed model id, else 404."""
        _check_model_id(model_id)
        if model_id.startswith("ft:"):
            job = store.find_job_by_model(model_id)
            if job and job["status"] == "succeeded":
                return model_id, job["run_dir"]
        elif any(m["name"] == model_id for m in base_models()):
            return model_id, model_id
        else:
            for name, path, _ in finished_runs():
                if name == model_id:
                    return model_id, str(path)
        raise APIError(404, f"The model '{model_id}' does not exist. GET /v1/models lists the available ones.",
                       param="model", code="model_not_found")

    async def get_model(model_id: str):
        key, source = resolve_model(model_id)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, cache.get, key, source)

    def _max_tokens(value: int | None, default: int) -> int:
        value = default if value is None else value
        if value > config.max_tokens_cap:
            raise APIError(400, f"max_tokens is too large: {value}. This server allows at most "
                           f"{config.max_tokens_cap}.", param="max_tokens", code="invalid_value")
        return value

    def _fit_context(model, prompt_tokens: int, max_tokens: int, explicit: bool) -> int:
        ctx = int(getattr(model, "context_length", 2048))
        if prompt_tokens + max_tokens <= ctx:
            return max_tokens
        if not explicit and ctx - prompt_tokens >= 1:
            return ctx - prompt_tokens
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                       f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                       "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                       code="context_length_exceeded")

    def _sampling(req: SamplingRequest, max_tokens: int, stop: list[str]) -> dict:
        rep = req.repetition_penalty
        if rep == 1.0 and req.frequency_penalty:
            rep = 1.0 + max(0.0, float(req.frequency_penalty)) * 0.5  # a rough stand-in
        return {
            "max_tokens": max_tokens,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "top_k": req.top_k,
            "repetition_penalty": rep,
            "stop": stop,
            "seed": req.seed,
        }

    async def _run(fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, lambda: fn(*args, **kwargs))

    async def _stream_thread(model, prompt: str, kwargs: dict) -> AsyncIterator[Any]:
        """Run ``model.stream`` in the pool and yield its chunks as they are produced. Stops the
        thread after its next token if the consumer goes away."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def put(item):
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the loop is gone
                cancelled.set()

        def work():
            try:
                for chunk in model.stream(prompt, **kwargs):
                    if cancelled.is_set():
                        break
                    put(("chunk", chunk))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                put(("error", exc))
            finally:
                put(("end", None))

        fut = loop.run_in_executor(executor, work)
        try:
            while True:
                kind, item = await q.get()
                if kind == "end":
                    break
                if kind == "error":
                    raise item
                yield item
        finally:
            cancelled.set()
            try:
                await asyncio.shield(fut)
            except BaseException:
                pass

    def _sse(obj: Any) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    def _stream_error(exc: BaseException) -> bytes:
        if isinstance(exc, TunesmithError):
            err = {"message": str(exc), "type": "invalid_request_error", "param": exc.field, "code": None}
        else:
            err = {"message": f"generation failed: {type(exc).__name__}: {exc}", "type": "server_error",
                   "param": None, "code": None}
        return _sse({"error": err})

    # -- routes: meta ----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(PLAYGROUND_DIR / "index.html", media_type="text/html", headers={
            "content-security-policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
            "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            "cache-control": "no-cache",
        })

    @app.get("/playground/{name}", include_in_schema=False)
    async def playground_asset(name: str):
        types = {"app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml"}
        if name not in types:
            raise APIError(404, f"no such playground file: {name[:60]}", code="not_found")
        return FileResponse(PLAYGROUND_DIR / name, media_type=types[name], headers={"cache-control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return FileResponse(PLAYGROUND_DIR / "favicon.svg", media_type="image/svg+xml")

    @app.get("/config", include_in_schema=False)
    async def server_config():
        from .. import __version__

        return {"auth_required": bool(config.api_key), "max_tokens": config.max_tokens_cap,
                "max_upload_bytes": config.max_upload_bytes, "version": __version__}

    @app.get("/health", include_in_schema=False)
    async def health():
        return {"status": "ok"}

    # -- routes: models -------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models_route():
        rows = await asyncio.get_running_loop().run_in_executor(None, model_objects)
        return {"object": "list", "data": rows}

    @app.get("/v1/models/{model_id:path}")
    async def get_model_route(model_id: str):
        _check_model_id(model_id)
        for row in await asyncio.get_running_loop().run_in_executor(None, model_objects):
            if row["id"] == model_id:
                return row
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")

    # -- routes: completions ---------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompt = req.prompt if req.prompt is not None else ""
        if isinstance(prompt, list):
            if prompt and all(isinstance(p, int) for p in prompt):
                prompt = ("ids", list(prompt))
            elif len(prompt) == 1:
                prompt = prompt[0]
            else:
                raise APIError(400, "send exactly one prompt per request (a string or a list of one string)",
                               param="prompt")
        stop = _stop_list(req.stop)
        max_tokens = _max_tokens(req.max_tokens, 16)
        if req.stream and req.logprobs:
            raise APIError(400, "logprobs are not available when streaming", param="logprobs")
        ticket = gen_queue.admit()
        try:
            await ticket.acquire()
            model = await get_model(req.model)
            if isinstance(prompt, tuple):
                prompt = model.tokenizer.decode(prompt[1])
            prompt_tokens = await _run(model.count_tokens, prompt)
            max_tokens = _fit_context(model, max(prompt_tokens, 1), max_tokens, req.max_tokens is not None)
            kwargs = _sampling(req, max_tokens, stop)
        except BaseException:
            ticket.release()
            raise
        cid = new_id("cmpl")
        created = _now()

        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))

            async def events():
                completion_tokens = 0
                try:
                    for index in range(req.n):
                        kw = dict(kwargs)
                        if kw["seed"] is not None:
                            kw["seed"] = kw["seed"] + index
                        if req.echo:
                            yield _sse({"id": cid, "object": "text_completion", "created": created, "model": req.model,
                                        "choices": [{"text": prompt, "index": index, "logprobs": None, "finish_reason": None}]})
                        async with aclosing(_stream_thread(model, prompt, kw)) as chunks:
                            async for chunk in chunks:
                                if chunk.finish_reason:
                                    completion_tokens += chunk.completion_tokens
                                yield _sse({"id": cid, "object": "text_completion", "created": created, "model": req.model,
                                            "choices": [{"text": chunk.text, "index": index, "logprobs": None,
                                                         "finish_reason": chunk.finish_reason}]})
                    if include_usage:
                        yield _sse({"id": cid, "object": "text_completion", "created": created, "model": req.model,
                                    "choices": [], "usage": _usage(prompt_tokens * req.n, completion_tokens)})
                except Exception as exc:
                    yield _stream_error(exc)
                finally:
                    ticket.release()
                yield b"data: [DONE]\n\n"

            return _sse_response(events(), ticket)

        try:
            results = await _run(model.generate, prompt, n=req.n,
                                 logprobs=req.logprobs if req.logprobs else None, **kwargs)
        finally:
            ticket.release()
        choices = []
        for i, c in enumerate(results):
            text = (prompt + c.text) if req.echo else c.text
            logprobs = None
            if req.logprobs is not None:
                offset = len(prompt) if req.echo else 0
                offsets = []
                for tok in c.tokens:
                    offsets.append(offset)
                    offset += len(tok)
                logprobs = {
                    "tokens": list(c.tokens),
                    "token_logprobs": list(c.token_logprobs),
                    "top_logprobs": [_named_top(model, t) for t in c.top_logprobs] if c.top_logprobs else None,
                    "text_offset": offsets,
                }
            choices.append({"text": text, "index": i, "logprobs": logprobs, "finish_reason": c.finish_reason})
        completion_tokens = sum(c.completion_tokens for c in results)
        return {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                "system_fingerprint": "tunesmith", "choices": choices,
                "usage": _usage(results[0].prompt_tokens if results else prompt_tokens, completion_tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        messages = []
        for m in req.messages:
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": _message_text(m.content)})
        stop = _stop_list(req.stop)
        explicit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = _max_tokens(explicit, config.max_tokens_cap)
        if req.stream and req.logprobs:
            raise APIError(400, "logprobs are not available when streaming", param="logprobs")
        top_logprobs = req.top_logprobs if req.logprobs else None
        if top_logprobs and top_logprobs > 5:
            raise APIError(400, "top_logprobs: tunesmith returns at most 5 alternatives", param="top_logprobs")
        ticket = gen_queue.admit()
        try:
            await ticket.acquire()
            model = await get_model(req.model)
            try:
                prompt = await _run(model.chat_prompt, messages)
            except TunesmithError:
                raise
            except Exception as exc:
                raise APIError(400, f"the model's chat template rejected these messages: {exc}",
                               param="messages") from None
            prompt_tokens = await _run(model.count_tokens, prompt)
            max_tokens = _fit_context(model, max(prompt_tokens, 1), max_tokens, explicit is not None)
            kwargs = _sampling(req, max_tokens, stop)
        except BaseException:
            ticket.release()
            raise
        cid = new_id("chatcmpl")
        created = _now()

        def chunk_obj(choices: list, usage: dict | None = None) -> dict:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                   "system_fingerprint": "tunesmith", "choices": choices}
            if usage is not None:
                obj["usage"] = usage
            return obj

        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))

            async def events():
                completion_tokens = 0
                try:
                    for index in range(req.n):
                        kw = dict(kwargs)
                        if kw["seed"] is not None:
                            kw["seed"] = kw["seed"] + index
                        yield _sse(chunk_obj([{"index": index, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]))
                        async with aclosing(_stream_thread(model, prompt, kw)) as chunks:
                            async for chunk in chunks:
                                if chunk.text:
                                    yield _sse(chunk_obj([{"index": index, "delta": {"content": chunk.text},
                                                           "logprobs": None, "finish_reason": None}]))
                                if chunk.finish_reason:
                                    completion_tokens += chunk.completion_tokens
                                    yield _sse(chunk_obj([{"index": index, "delta": {}, "logprobs": None,
                                                           "finish_reason": chunk.finish_reason}]))
                    if include_usage:
                        yield _sse(chunk_obj([], _usage(prompt_tokens * req.n, completion_tokens)))
                except Exception as exc:
                    yield _stream_error(exc)
                finally:
                    ticket.release()
                yield b"data: [DONE]\n\n"

            return _sse_response(events(), ticket)

        try:
            results = await _run(model.generate, prompt, n=req.n, logprobs=top_logprobs or None, **kwargs)
        finally:
            ticket.release()
        choices = []
        for i, c in enumerate(results):
            logprobs = None
            if req.logprobs:
                content = []
                for j, (tok, lp) in enumerate(zip(c.tokens, c.token_logprobs)):
                    tops = []
                    if c.top_logprobs and j < len(c.top_logprobs):
                        tops = [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                for t, v in _named_top(model, c.top_logprobs[j]).items()]
                    content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": tops})
                logprobs = {"content": content, "refusal": None}
            choices.append({"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                            "logprobs": logprobs, "finish_reason": c.finish_reason})
        completion_tokens = sum(c.completion_tokens for c in results)
        return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "system_fingerprint": "tunesmith", "choices": choices,
                "usage": _usage(results[0].prompt_tokens if results else prompt_tokens, completion_tokens)}

    # -- routes: files ---------------------------------------------------------------------------
    def _check_file_id(file_id: str, param: str = "file_id") -> None:
        if not FILE_ID_RE.match(file_id):
            raise APIError(400, f"invalid file id {file_id[:80]!r}: expected 'file-' and 24 hex digits",
                           param=param, code="invalid_file_id")

    def _get_file_or_404(file_id: str, param: str = "file_id") -> dict:
        _check_file_id(file_id, param)
        row = store.get_file(file_id)
        if row is None:
            raise APIError(404, f"No such File object: {file_id}", param=param, code="file_not_found")
        return row

    @app.post("/v1/files")
    def upload_file(file: UploadFile = File(...), purpose: str = Form(...)):
        if purpose != "fine-tune":
            raise APIError(400, f"purpose '{purpose[:40]}' is not supported; tunesmith stores files for 'fine-tune'",
                           param="purpose")
        filename = Path((file.filename or "upload.txt").replace("\\", "/")).name[:255] or "upload.txt"
        ext = Path(filename).suffix.lower()
        if not EXT_RE.match(ext):
            raise APIError(400, f"{filename}: the file needs an extension that says its format "
                           "(.txt, .md, .jsonl, .json, .csv or .tsv)", param="file", code="invalid_file_format")
        file_id = new_id("file")
        store.files_dir.mkdir(parents=True, exist_ok=True)
        tmp = store.files_dir / f".upload-{file_id}{ext}"
        final = store.files_dir / f"{file_id}{ext}"
        try:
            size = 0
            with open(tmp, "wb") as out:
                while True:
                    block = file.file.read(1024 * 1024)
                    if not block:
                        break
                    size += len(block)
                    if size > config.max_upload_bytes:
                        raise APIError(413, f"{filename}: file too large: the limit is {config.max_upload_bytes:,} bytes",
                                       param="file", code="file_too_large")
                    out.write(block)
            if size == 0:
                raise APIError(400, f"{filename}: the file is empty", param="file", code="invalid_file_format")
            _validate_upload(tmp, filename)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return file_object(store.add_file(file_id, filename, final, size))

    @app.get("/v1/files")
    async def list_files(purpose: str | None = Query(default=None, max_length=40),
                         limit: int = Query(default=10000, ge=1, le=10000)):
        rows = store.list_files(purpose)
        return {"object": "list", "data": [file_object(r) for r in rows[:limit]], "has_more": len(rows) > limit}

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        return file_object(_get_file_or_404(file_id))

    @app.get("/v1/files/{file_id}/content")
    async def get_file_content(file_id: str):
        row = _get_file_or_404(file_id)
        path = Path(row["path"])
        if path.parent.resolve() != store.files_dir.resolve() or not path.is_file():
            raise APIError(404, f"the content of {file_id} is missing", param="file_id", code="file_not_found")
        return FileResponse(path, media_type="application/octet-stream",
                            headers={"content-disposition": f'attachment; filename="{file_id}{path.suffix}"'})

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        _get_file_or_404(file_id)
        users = store.jobs_using_file(file_id)
        if users:
            raise APIError(400, f"{file_id} is used by fine-tuning job {users[0]}, which has not finished; "
                           "cancel it first", param="file_id", code="file_in_use")
        store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- routes: fine-tuning ---------------------------------------------------------------------
    def _get_job_or_404(job_id: str) -> dict:
        if not JOB_ID_RE.match(job_id):
            raise APIError(400, f"invalid fine-tuning job id {job_id[:80]!r}: expected 'ftjob-' and 24 hex digits",
                           param="fine_tuning_job_id", code="invalid_job_id")
        job = store.get_job(job_id)
        if job is None:
            raise APIError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id", code="job_not_found")
        return job

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(req: JobRequest):
        _check_model_id(req.model)
        bases = [m["name"] for m in base_models()]
        if req.model not in bases:
            hint = f"; the base models here are: {', '.join(bases)}" if bases else ""
            raise APIError(400, f"model '{req.model}' is not a base model that can be fine-tuned{hint}",
                           param="model", code="model_not_available")
        training = _get_file_or_400(req.training_file, "training_file")
        if req.validation_file:
            _get_file_or_400(req.validation_file, "validation_file")
        if req.suffix is not None and not SUFFIX_RE.match(req.suffix):
            raise APIError(400, "suffix: 1 to 40 letters, digits, '-' or '_'", param="suffix")
        hp = resolve_hyperparameters(req, int(training["bytes"]))
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        job = store.create_job(model=req.model, training_file=req.training_file, validation_file=req.validation_file,
                               suffix=req.suffix, seed=seed, hyperparameters=hp, metadata=req.metadata)
        supervisor.wake()
        if not config.start_worker:
            store.add_event(job["id"], "This server does not run training jobs (started without a worker)", level="warn")
        return job_object(job)

    def _get_file_or_400(file_id: str, param: str) -> dict:
        if not FILE_ID_RE.match(file_id):
            raise APIError(400, f"invalid {param} {file_id[:80]!r}: expected 'file-' and 24 hex digits", param=param,
                           code="invalid_file_id")
        row = store.get_file(file_id)
        if row is None:
            raise APIError(400, f"invalid {param}: no uploaded file {file_id}", param=param, code="file_not_found")
        return row

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(after: str | None = Query(default=None, max_length=64),
                        limit: int = Query(default=20, ge=1, le=100)):
        jobs, has_more = store.list_jobs(after=after, limit=limit)
        return {"object": "list", "data": [job_object(j) for j in jobs], "has_more": has_more}

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str):
        return job_object(_get_job_or_404(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        job = _get_job_or_404(job_id)
        if job["status"] in ("succeeded", "failed"):
            raise APIError(400, f"job {job_id} has already {job['status']}; there is nothing to cancel",
                           param="fine_tuning_job_id", code="job_already_finished")
        return job_object(store.request_cancel(job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def job_events(job_id: str, after: str | None = Query(default=None, max_length=64),
                         limit: int = Query(default=20, ge=1, le=1000)):
        _get_job_or_404(job_id)
        events, has_more = store.list_events(job_id, after=after, limit=limit)
        return {"object": "list", "data": events, "has_more": has_more}

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def job_checkpoints(job_id: str, after: str | None = Query(default=None, max_length=64),
                              limit: int = Query(default=10, ge=1, le=100)):
        job = _get_job_or_404(job_id)
        rows, has_more = store.list_checkpoints(job_id, after=after, limit=limit)
        data = [checkpoint_object(job, r) for r in rows]
        return {"object": "list", "data": data, "has_more": has_more,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    @app.get("/v1/fine_tuning/jobs/{job_id}/metrics")
    async def job_metrics(job_id: str):
        """tunesmith extension: every training/validation metrics point, oldest first (for loss curves)."""
        _get_job_or_404(job_id)
        return {"object": "list", "data": store.metrics(job_id)}

    return app


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _named_top(model, top: dict) -> dict:
    """``{token id: logprob}`` from generate becomes ``{token text: logprob}`` as OpenAI returns it."""
    out: dict[str, float] = {}
    for key, value in top.items():
        try:
            text = model.tokenizer.decode([int(key)])
        except (ValueError, TypeError):
            text = str(key)
        out.setdefault(text, value)
    return out


def _sse_response(gen, ticket: Ticket) -> StreamingResponse:
    from starlette.background import BackgroundTask

    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
                             background=BackgroundTask(ticket.release))


def _validate_upload(path: Path, filename: str) -> None:
    """Run the corpus checks on an upload; a problem becomes a 400 that names the line (and the
    user's file name, not our temporary one)."""
    try:
        from ..corpus import validate_file
    except ImportError:  # pragma: no cover - corpus.py not present
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise APIError(400, f"{filename}: not UTF-8 text ({exc})", param="file", code="invalid_file_format") from None
        return
    try:
        validate_file(path)
    except TunesmithError as err:
        message = str(err).replace(str(path), filename).replace(path.name, filename)
        if err.file is None:
            message = f"{filename}: {message}"
        raise APIError(400, message, param="file", code="invalid_file_format") from None
