"""The request bodies of the API as pydantic models. Unknown fields are accepted and ignored, as
OpenAI's own clients send fields that tunesmith has no use for."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ..config import SamplingConfig, TrainConfig, spec

# Bounds come from the settings' one definition (tunesmith.config); OpenAI's own limits where tighter.
_TEMPERATURE = spec(SamplingConfig, "temperature")
_TOP_K = spec(SamplingConfig, "top_k")
_REPETITION = spec(SamplingConfig, "repetition_penalty")
_BLOCK = spec(TrainConfig, "block_size")
_STEPS = spec(TrainConfig, "max_steps")


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


StopField = Union[str, list[str], None]


class TunesmithOptions(BaseModel):
    """The ``tunesmith`` extension object of a generation request. Unknown keys are refused, so a
    misspelt option is an error rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")

    check_copying: bool = False  # each choice gets the spans it copied from the model's training text
    min_tokens: int = Field(default=12, ge=1, le=1000)  # the shortest span that counts as copied


class SamplingRequest(_Loose):
    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=_TEMPERATURE["min"], le=_TEMPERATURE["openai_max"])
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: StopField = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: dict | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias; checked with the model's vocabulary
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    # tunesmith extensions
    top_k: int = Field(default=_TOP_K["default"], ge=_TOP_K["min"], le=_TOP_K["openai_max"])
    repetition_penalty: float = Field(default=_REPETITION["default"], gt=_REPETITION["gt"], le=_REPETITION["max"])
    tunesmith: TunesmithOptions | None = None


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
    max_steps: int | None = Field(default=None, ge=_STEPS["min"], le=_STEPS["job_max"])
    block_size: int | None = Field(default=None, ge=_BLOCK["min"], le=_BLOCK["max"])


class JobRequest(_Loose):
    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    suffix: str | None = Field(default=None, max_length=64)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = None
    method: dict | None = None
    metadata: dict[str, str] | None = None
