"""One generation path for ``/v1/completions`` and ``/v1/chat/completions``.

Each route turns its request into a ``Generation`` (routes/openai.py): the prompt, how to build its
text once the model is loaded, sampling, and the response ``Format`` (text or chat). From there one
function serves it: ``Generator.handle_completion`` admits it, loads the model, fits it into the
context, and answers with ``complete`` (one JSON body) or ``stream`` (server-sent events ending in
``data: [DONE]``). The formats differ only in how a choice and a chunk look.

A request that asks for ``"tunesmith": {"check_copying": true}`` gets the spans each choice copied
from the model's training text in a ``tunesmith`` field of the choice (copying.py); when
streaming, in the last chunk of each choice (the one with its ``finish_reason``).
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from ..classify import is_classifier_run
from ..errors import TunesmithError
from .admission import GenerationQueue, Ticket
from .batching import Batching
from .catalog import Catalog
from .copying import CopyIndexes, copying_field, training_run
from .errors import APIError
from .models_cache import ModelCache
from .store import new_id


class TextFormat:
    """``text_completion`` objects: the choice is text (with the prompt when echoing)."""

    kind = chunk_kind = "text_completion"
    id_prefix = "cmpl"
    chunk_fingerprint = False

    @staticmethod
    def opening(gen: Generation, index: int, prompt: str) -> list[dict]:
        return [{"text": prompt, "index": index, "logprobs": None, "finish_reason": None}] if gen.echo else []

    @staticmethod
    def pieces(index: int, chunk) -> list[dict]:
        return [{"text": chunk.text, "index": index, "logprobs": None, "finish_reason": chunk.finish_reason}]

    @staticmethod
    def choice(gen: Generation, index: int, c, prompt: str, model) -> dict:
        logprobs = None
        if gen.want_logprobs:
            offset = len(prompt) if gen.echo else 0
            offsets = []
            for tok in c.tokens:
                offsets.append(offset)
                offset += len(tok)
            logprobs = {
                "tokens": list(c.tokens),
                "token_logprobs": list(c.token_logprobs),
                "top_logprobs": [named_top(model, t) for t in c.top_logprobs] if c.top_logprobs else None,
                "text_offset": offsets,
            }
        text = (prompt + c.text) if gen.echo else c.text
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": c.finish_reason}


class ChatFormat:
    """``chat.completion`` objects: the choice is an assistant message; chunks carry deltas."""

    kind = "chat.completion"
    chunk_kind = "chat.completion.chunk"
    id_prefix = "chatcmpl"
    chunk_fingerprint = True

    @staticmethod
    def opening(gen: Generation, index: int, prompt: str) -> list[dict]:
        return [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]

    @staticmethod
    def pieces(index: int, chunk) -> list[dict]:
        out = []
        if chunk.text:
            out.append({"index": index, "delta": {"content": chunk.text}, "logprobs": None, "finish_reason": None})
        if chunk.finish_reason:
            out.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": chunk.finish_reason})
        return out

    @staticmethod
    def choice(gen: Generation, index: int, c, prompt: str, model) -> dict:
        logprobs = None
        if gen.want_logprobs:
            content = []
            for j, (tok, lp) in enumerate(zip(c.tokens, c.token_logprobs)):
                tops = []
                if c.top_logprobs and j < len(c.top_logprobs):
                    tops = [{"token": t, "logprob": v, "bytes": list(t.encode())}
                            for t, v in named_top(model, c.top_logprobs[j]).items()]
                content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": tops})
            logprobs = {"content": content, "refusal": None}
        return {"index": index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": logprobs, "finish_reason": c.finish_reason}


@dataclass
class Generation:
    """One generation request, whichever endpoint it came in through."""

    model: str
    prompt: Callable[[Any], str]  # the prompt text, built from the loaded model (runs in the pool)
    format: type[TextFormat] | type[ChatFormat]
    sampling: dict  # temperature, top_p, top_k, repetition_penalty, stop, seed (as Model.generate takes them)
    max_tokens: int
    max_tokens_explicit: bool  # asked for by the request (else shortened to fit the context)
    n: int = 1
    stream: bool = False
    include_usage: bool = False  # streaming: a last chunk with the token counts
    logprobs: int | None = None  # alternatives per token to ask the model for
    want_logprobs: bool = False  # choices carry a logprobs object
    echo: bool = False
    check_copying: int | None = None  # the shortest copied span to report (min tokens); None: no check


class Generator:
    """Generation for the routes: admission, model loading in a thread pool, and decoding in the
    loaded model's shared batch (batching.py)."""

    def __init__(self, cache: ModelCache, catalog: Catalog, queue: GenerationQueue, executor: ThreadPoolExecutor,
                 batching: Batching, copies: CopyIndexes | None = None):
        self.cache = cache
        self.catalog = catalog
        self.queue = queue
        self.executor = executor
        self.batching = batching
        self.copies = copies if copies is not None else CopyIndexes()

    async def run(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    async def model(self, model_id: str):
        key, source = self.catalog.resolve(model_id)
        if is_classifier_run(source):
            raise APIError(400, f"the model '{model_id}' is a classifier or regressor run and writes no text; "
                           "use /v1/classifications", param="model", code="model_not_generative")
        return await self.run(self.cache.get, key, source)

    async def handle_completion(self, gen: Generation) -> dict | StreamingResponse:
        ticket = self.queue.admit()
        arrival = self.batching.arrival()  # counted until it reaches its batch (Batcher._gather)
        try:
            await ticket.acquire()
            index = None
            if gen.check_copying is not None:
                _, source = self.catalog.resolve(gen.model)
                index = await self.run(self.copies.get, training_run(gen.model, source))
            model = await self.model(gen.model)
            prompt = await self.run(gen.prompt, model)
            prompt_tokens = await self.run(model.count_tokens, prompt)
            max_tokens = fit_context(model, max(prompt_tokens, 1), gen.max_tokens, gen.max_tokens_explicit)
            kwargs = {**gen.sampling, "max_tokens": max_tokens}
        except BaseException:
            arrival.done()
            ticket.release()
            raise
        if gen.stream:
            return sse_response(self.stream(gen, model, prompt, prompt_tokens, kwargs, ticket, index, arrival),
                                ticket, arrival)
        try:
            return await self.complete(gen, model, prompt, prompt_tokens, kwargs, index, arrival)
        finally:
            arrival.done()
            ticket.release()

    async def complete(self, gen: Generation, model, prompt: str, prompt_tokens: int, kwargs: dict,
                       index=None, arrival=None) -> dict:
        fmt = gen.format
        cid, created = new_id(fmt.id_prefix), int(time.time())
        results: list = [None] * gen.n
        async with aclosing(self.batching.events(model, prompt, kwargs, n=gen.n, logprobs=gen.logprobs or None,
                                                 arrival=arrival)) as ev:
            async for event in ev:
                results[event.index] = event.completion
        choices = [fmt.choice(gen, i, c, prompt, model) for i, c in enumerate(results)]
        if index is not None:
            for choice, c in zip(choices, results):
                choice["tunesmith"] = await self.run(copying_field, index, c.text, gen.check_copying,
                                                     self._echoed(gen, prompt))
        completion_tokens = sum(c.completion_tokens for c in results)
        usage = _usage(results[0].prompt_tokens if results else prompt_tokens, completion_tokens)
        return envelope(fmt.kind, cid, created, gen.model, choices, usage)

    @staticmethod
    def _echoed(gen: Generation, prompt: str) -> int:
        """Characters of the choice's text before the generated text (an echoed prompt)."""
        return len(prompt) if gen.echo and gen.format is TextFormat else 0

    async def stream(self, gen: Generation, model, prompt: str, prompt_tokens: int, kwargs: dict,
                     ticket: Ticket, copy_index=None, arrival=None) -> AsyncIterator[bytes]:
        fmt = gen.format
        cid, created = new_id(fmt.id_prefix), int(time.time())

        def event(choices: list, usage: dict | None = None) -> bytes:
            return sse(envelope(fmt.chunk_kind, cid, created, gen.model, choices, usage,
                                fingerprint=fmt.chunk_fingerprint))

        completion_tokens = 0
        try:
            for index in range(gen.n):
                for choice in fmt.opening(gen, index, prompt):
                    yield event([choice])
            text: list[list[str]] = [[] for _ in range(gen.n)]
            async with aclosing(self.batching.events(model, prompt, kwargs, n=gen.n, stream=True,
                                                     arrival=arrival)) as events:
                async for ev in events:
                    if ev.kind != "chunk":
                        continue
                    chunk, index = ev.chunk, ev.index
                    text[index].append(chunk.text)
                    pieces = fmt.pieces(index, chunk)
                    if chunk.finish_reason:
                        completion_tokens += chunk.completion_tokens
                        if copy_index is not None and pieces:
                            pieces[-1]["tunesmith"] = await self.run(
                                copying_field, copy_index, "".join(text[index]), gen.check_copying,
                                self._echoed(gen, prompt))
                    for choice in pieces:
                        yield event([choice])
            if gen.include_usage:
                yield event([], _usage(prompt_tokens * gen.n, completion_tokens))
        except Exception as exc:
            yield stream_error(exc)
        finally:
            if arrival is not None:
                arrival.done()
            ticket.release()
        yield b"data: [DONE]\n\n"


def fit_context(model, prompt_tokens: int, max_tokens: int, explicit: bool) -> int:
    """``max_tokens``, shortened to what the context leaves when the request did not ask for it."""
    ctx = int(model.context_length)
    if prompt_tokens + max_tokens <= ctx:
        return max_tokens
    if not explicit and ctx - prompt_tokens >= 1:
        return ctx - prompt_tokens
    raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                   f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                   "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                   code="context_length_exceeded")


def envelope(kind: str, cid: str, created: int, model: str, choices: list, usage: dict | None = None, *,
             fingerprint: bool = True) -> dict:
    obj: dict = {"id": cid, "object": kind, "created": created, "model": model}
    if fingerprint:
        obj["system_fingerprint"] = "tunesmith"
    obj["choices"] = choices
    if usage is not None:
        obj["usage"] = usage
    return obj


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def named_top(model, top: dict) -> dict:
    """``{token id: logprob}`` from generate becomes ``{token text: logprob}`` as OpenAI returns it."""
    out: dict[str, float] = {}
    for key, value in top.items():
        try:
            text = model.tokenizer.decode([int(key)])
        except (ValueError, TypeError):
            text = str(key)
        out.setdefault(text, value)
    return out


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def stream_error(exc: BaseException) -> bytes:
    if isinstance(exc, TunesmithError):
        err = {"message": str(exc), "type": "invalid_request_error", "param": exc.field, "code": None}
    else:
        err = {"message": f"generation failed: {type(exc).__name__}: {exc}", "type": "server_error",
               "param": None, "code": None}
    return sse({"error": err})


def sse_response(events: AsyncIterator[bytes], ticket: Ticket, arrival=None) -> StreamingResponse:
    def release() -> None:  # also when the client went away before the stream started
        if arrival is not None:
            arrival.done()
        ticket.release()

    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
                             background=BackgroundTask(release))
