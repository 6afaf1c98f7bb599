"""Admission control for generation: at most ``max_running`` requests compute at once and
``max_waiting`` more wait for a slot; any more are refused with a 429 at once."""

from __future__ import annotations

import asyncio

from .errors import APIError


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

    def __init__(self, queue: GenerationQueue):
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

    async def __aenter__(self) -> Ticket:
        await self.acquire()
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()


class GenerationQueue:
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
