"""The server's decoding loops: one ``tunesmith.batching.Batcher`` per loaded model, shared by
every request for that model, and the bridge from the loop's thread to the event loop.

Requests for different models (a base, a fine-tune, a checkpoint) run in different loops; requests
for the same loaded model join its batch between decoding steps and leave it when they finish or
their client goes away.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from concurrent.futures import Executor
from typing import AsyncIterator

from ..batching import Batcher, Event
from ..config import SamplingConfig


class Batching:
    """The batchers of the loaded models; ``events`` runs one request through its model's batch."""

    def __init__(self, executor: Executor, max_batch: int):
        self.executor = executor
        self.max_batch = max_batch
        self._batchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # gone with their model
        self._lock = threading.Lock()

    def batcher(self, model) -> Batcher:
        with self._lock:
            found = self._batchers.get(model)
            if found is None:
                found = self._batchers[model] = Batcher(model, self.max_batch)
            return found

    def batchers(self) -> list[Batcher]:
        with self._lock:
            return list(self._batchers.values())

    async def events(self, model, prompt: str, sampling: dict, *, n: int = 1, logprobs: int | None = None,
                     stream: bool = False) -> AsyncIterator[Event]:
        """The events of ``n`` completions of ``prompt`` (``sampling``: SamplingConfig's fields) as
        the batch writes them, ending after the last one's ``done``. Closing the iterator early
        (a client that went away) frees the request's rows before the next step."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        sampling = dict(sampling)
        stop = sampling.pop("stop", None)
        params = SamplingConfig(**sampling, stop=[stop] if isinstance(stop, str) else list(stop or []))
        request = None

        def sink(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone
                if request is not None:
                    request.cancel()

        batcher = self.batcher(model)
        request = await loop.run_in_executor(
            self.executor, lambda: batcher.submit(prompt, params, sink, n=n, logprobs=logprobs, stream=stream))
        try:
            left = n
            while left:
                event = await queue.get()
                if event.kind == "error":
                    raise event.error
                if event.kind == "done":
                    left -= 1
                yield event
        finally:
            request.cancel()
