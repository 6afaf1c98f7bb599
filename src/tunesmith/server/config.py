"""``ServerConfig``: every setting of one server instance, injected into ``create_app``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .models_cache import ModelCache

MB = 1024 * 1024


@dataclass
class ServerConfig:
    home: Path | None = None
    api_key: str | None = None
    max_running: int = 8  # generation requests computing at once (decoded together, batching.py)
    max_waiting: int = 8  # more requests may wait for a slot; beyond that: 429
    cache_bytes: int | None = None  # loaded-model budget (default $TUNESMITH_MODEL_CACHE or 4 GiB)
    max_upload_bytes: int = 50 * MB
    max_body_bytes: int = 1 * MB
    max_tokens_cap: int = 2048
    max_batch: int = 16  # sequences one model decodes together (a request with n > 1 takes n)
    quant: str = "none"  # weights of loaded language models: none (their dtype) or int8 (weight-only)
    warm_decoding: bool = False  # compile each loaded model's decoding step in a background thread
    start_worker: bool = True  # run queued fine-tuning jobs in a worker process
    worker_idle_exit: float = 3.0
    supervise_interval: float = 1.0
    busy_timeout: float = 30.0  # seconds a request waits for the job database's write lock before a 503
    model_cache: ModelCache | None = None  # tests inject one with a fake loader
    # Host names requests may be addressed to (DNS-rebinding guard); None: any. `serve` sets the
    # loopback names when it listens on a loopback address.
    allowed_hosts: tuple[str, ...] | None = None
