"""``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``.

The two generation routes are thin adapters: each checks what only it knows (a prompt of text or
token ids; chat messages and their template) and hands one ``Generation`` to the one generation
path in generation.py.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from fastapi import APIRouter, Depends

from ...config import SamplingConfig, spec
from ...errors import TunesmithError
from ..catalog import Catalog
from ..config import ServerConfig
from ..deps import get_catalog, get_config, get_generator
from ..errors import APIError
from ..generation import ChatFormat, Generation, Generator, TextFormat
from ..schemas import ChatRequest, CompletionRequest, SamplingRequest, StopField

router = APIRouter()

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the server's cap


@router.get("/v1/models")
async def list_models(catalog: Catalog = Depends(get_catalog)):
    rows = await asyncio.get_running_loop().run_in_executor(None, catalog.model_objects)
    return {"object": "list", "data": rows}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, catalog: Catalog = Depends(get_catalog)):
    return await asyncio.get_running_loop().run_in_executor(None, catalog.model_object, model_id)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, config: ServerConfig = Depends(get_config),
                      generator: Generator = Depends(get_generator)):
    prompt = text_prompt(req.prompt)
    stop = stop_list(req.stop)
    max_tokens = check_max_tokens(req.max_tokens, COMPLETION_MAX_TOKENS, config.max_tokens_cap)
    if req.stream and req.logprobs:
        raise APIError(400, "logprobs are not available when streaming", param="logprobs")
    gen = Generation(
        model=req.model, prompt=prompt, format=TextFormat,
        sampling=sampling(req, stop), max_tokens=max_tokens, max_tokens_explicit=req.max_tokens is not None,
        n=req.n, stream=req.stream, include_usage=include_usage(req), logprobs=req.logprobs,
        want_logprobs=req.logprobs is not None, echo=req.echo, check_copying=check_copying(req),
    )
    return await generator.handle_completion(gen)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, config: ServerConfig = Depends(get_config),
                           generator: Generator = Depends(get_generator)):
    messages = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        messages.append({"role": role, "content": message_text(m.content)})
    stop = stop_list(req.stop)
    explicit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = check_max_tokens(explicit, config.max_tokens_cap, config.max_tokens_cap)
    if req.stream and req.logprobs:
        raise APIError(400, "logprobs are not available when streaming", param="logprobs")
    top_logprobs = req.top_logprobs if req.logprobs else None
    if top_logprobs and top_logprobs > 5:
        raise APIError(400, "top_logprobs: tunesmith returns at most 5 alternatives", param="top_logprobs")
    gen = Generation(
        model=req.model, prompt=lambda model: chat_prompt(model, messages), format=ChatFormat,
        sampling=sampling(req, stop), max_tokens=max_tokens, max_tokens_explicit=explicit is not None,
        n=req.n, stream=req.stream, include_usage=include_usage(req), logprobs=top_logprobs,
        want_logprobs=req.logprobs, check_copying=check_copying(req),
    )
    return await generator.handle_completion(gen)


# ---------------------------------------------------------------------------------------------
# What the adapters check


def text_prompt(prompt: str | list | None) -> Callable[[Any], str]:
    """The completion prompt, as text once the model is loaded: a string (or a list of one), or
    token ids that the model's tokenizer decodes."""
    if isinstance(prompt, list):
        if prompt and all(isinstance(p, int) for p in prompt):
            ids = list(prompt)
            return lambda model: decode_prompt_ids(model, ids)
        if len(prompt) != 1:
            raise APIError(400, "send exactly one prompt per request (a string or a list of one string)",
                           param="prompt")
        prompt = prompt[0]
    text = prompt if prompt is not None else ""
    return lambda model: text


def decode_prompt_ids(model, ids: list[int]) -> str:
    """A prompt given as token ids, as text; every id must be in the model's vocabulary."""
    vocab = len(model.tokenizer)
    for position, token in enumerate(ids):
        if not 0 <= token < vocab:
            raise APIError(400, f"Invalid value for 'prompt': token id {token} at position {position} is not "
                           f"in this model's vocabulary (ids 0 to {vocab - 1}).", param="prompt",
                           code="invalid_value")
    return model.tokenizer.decode(ids)


def chat_prompt(model, messages: list[dict]) -> str:
    try:
        return model.chat_prompt(messages)
    except TunesmithError:
        raise
    except Exception as exc:
        raise APIError(400, f"the model's chat template rejected these messages: {exc}", param="messages") from None


def check_max_tokens(value: int | None, default: int, cap: int) -> int:
    value = default if value is None else value
    if value > cap:
        raise APIError(400, f"max_tokens is too large: {value}. This server allows at most {cap}.",
                       param="max_tokens", code="invalid_value")
    return value


def stop_list(stop: StopField) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4:
        raise APIError(400, "at most 4 stop sequences are allowed", param="stop")
    return [s for s in stops if s]


def message_text(content: Any) -> str:
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


def sampling(req: SamplingRequest, stop: list[str]) -> dict:
    rep = req.repetition_penalty
    if rep == 1.0 and req.frequency_penalty:
        rep = 1.0 + max(0.0, float(req.frequency_penalty)) * 0.5  # a rough stand-in
    return {
        "temperature": spec(SamplingConfig, "temperature")["openai"] if req.temperature is None else req.temperature,
        "top_p": SamplingConfig.top_p if req.top_p is None else req.top_p,
        "top_k": req.top_k,
        "repetition_penalty": rep,
        "stop": stop,
        "seed": req.seed,
        "logit_bias": logit_bias(req.logit_bias),
    }


def logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's ``logit_bias`` (token ids as JSON keys) with integer ids; its bounds are checked
    where the model's vocabulary is known (SamplingConfig.check)."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias: {key!r} is not a token id", param="logit_bias") from None
        out[token] = value
    return out


def include_usage(req: SamplingRequest) -> bool:
    return bool((req.stream_options or {}).get("include_usage"))


def check_copying(req: SamplingRequest) -> int | None:
    """The shortest copied span to report when the request asks for copied spans, else None."""
    options = req.tunesmith
    return options.min_tokens if options is not None and options.check_copying else None
