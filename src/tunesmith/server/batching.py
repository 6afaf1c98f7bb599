"""The server's decoding loops: one ``tunesmith.batching.Batcher`` per loaded model, shared by
every request for that model, and the bridge from the loop's thread to the event loop.

Requests for different models (a base, a fine-tune, a checkpoint) run in different loops; requests
for the same loaded model join its batch between decoding steps and leave it when they finish or
their client goes away.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from concurrent.futures import Executor
from typing import AsyncIterator

from ..batching import Batcher, Event
from ..config import SamplingConfig

# An admitted request counts as on its way to a batch for at most this long.
ARRIVAL_SECONDS = 2.0


class Batching:
    """The batchers of the loaded models; ``events`` runs one request through its model's batch."""

    def __init__(self, executor: Executor, max_batch: int):
        self.executor = executor
        self.max_batch = max_batch
        self._batchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # gone with their model
        self._lock = threading.Lock()
        self._arrivals: set[Arrival] = set()  # requests admitted and not yet submitted to a batcher

    def batcher(self, model) -> Batcher:
        with self._lock:
            found = self._batchers.get(model)
            if found is None:
                found = self._batchers[model] = Batcher(model, self.max_batch, arriving=self.arriving)
            return found

    def arrival(self) -> Arrival:
        """Count a request from its admission until it reaches its batch (or fails first), so
        an idle decoding loop waits briefly for requests sent together (Batcher._gather)."""
        arrival = Arrival(self)
        with self._lock:
            self._arrivals.add(arrival)
        return arrival

    def arriving(self) -> int:
        """Requests on their way to a batch; one counted for longer than ARRIVAL_SECONDS (a model
        still loading, a request whose end was missed) no longer is."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for a in self._arrivals if now - a.since < ARRIVAL_SECONDS)

    def batchers(self) -> list[Batcher]:
        with self._lock:
            return list(self._batchers.values())

    async def events(self, model, prompt: str, sampling: dict, *, n: int = 1, logprobs: int | None = None,
                     stream: bool = False, arrival: Arrival | None = None) -> AsyncIterator[Event]:
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

        def submit():
            try:
                return batcher.submit(prompt, params, sink, n=n, logprobs=logprobs, stream=stream)
            finally:
                if arrival is not None:
                    arrival.done()

        request = await loop.run_in_executor(self.executor, submit)
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


class Arrival:
    """One request counted by ``Batching.arriving``; ``done()`` (idempotent) stops counting it."""

    def __init__(self, batching: Batching):
        self._batching = batching
        self.since = time.monotonic()

    def done(self) -> None:
        with self._batching._lock:
            self._batching._arrivals.discard(self)
