"""The HTTP server: an OpenAI-compatible API over tunesmith models and jobs, and the web playground.

``create_app(ServerConfig(...))`` assembles the FastAPI app from its parts:

- guard.py: host, origin and API-key checks, body limits (a middleware);
- errors.py: every error in OpenAI's shape;
- routes/: openai (models, completions, chat), files, jobs, playground, one APIRouter each;
- what the routes share, on ``app.state``: the store, the model catalog and cache, the copy indexes, the generator
  with its admission queue, the decoding loop of each loaded model (batching.py), the worker supervisor.

Nothing heavy is imported here: torch and transformers load on the first generation request (in a
worker thread), so the server starts fast.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .admission import GenerationQueue
from .batching import Batching
from .catalog import Catalog
from .config import ServerConfig
from .errors import install_error_handlers
from .generation import Generator
from .guard import GuardMiddleware
from .models_cache import ModelCache
from .routes import classify, files, jobs, openai, playground
from .store import Store
from .supervisor import Supervisor

__all__ = ["ServerConfig", "create_app"]


def create_app(config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    store = Store(config.home, busy_timeout=config.busy_timeout)
    store.remove_stale_uploads()
    catalog = Catalog(store)
    executor = ThreadPoolExecutor(max_workers=config.max_running + 1, thread_name_prefix="tunesmith-gen")
    queue = GenerationQueue(config.max_running, config.max_waiting)
    cache = config.model_cache or ModelCache(config.cache_bytes, quant=config.quant, warm=config.warm_decoding)
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
    app.state.catalog = catalog
    app.state.cache = cache
    app.state.queue = queue
    app.state.batching = Batching(executor, config.max_batch)  # one decoding loop per loaded model
    app.state.generator = Generator(cache, catalog, queue, executor, app.state.batching)
    app.state.copies = app.state.generator.copies  # the copy index of each run, opened once
    app.state.supervisor = supervisor
    install_error_handlers(app)
    for module in (playground, openai, files, jobs, classify):
        app.include_router(module.router)
    return app
