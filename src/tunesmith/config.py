"""The settings of a training run (``TrainConfig``) and of a generation (``SamplingConfig``): each
default, bound and help text is written here once. The CLI, ``prepare``, the server's request
schemas and its worker read them from these fields.

A field's metadata holds:

- ``help``: the one-line help the CLI shows;
- ``min`` / ``max``: inclusive bounds; ``gt`` / ``lt``: exclusive ones; ``message``: the error text where
  the bounds alone would read badly;
- ``choices``: the allowed values of a text setting;
- ``cli``: the CLI's default where it differs from the library's (``tunesmith generate`` reads better
  with a little nucleus sampling and repetition penalty);
- ``openai``: the server's default where OpenAI's API defines another one;
- ``job_max`` / ``openai_max``: a tighter upper bound for what a fine-tuning job or an API request may ask.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Mapping, Sequence

from .errors import TunesmithError
from .models import DEFAULT_BASE


def setting(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, **bounds: Any) -> Any:
    """A dataclass field with its help text and bounds in the metadata."""
    return field(default=default, default_factory=factory, metadata={"help": help, **bounds})


def spec(cls: type, name: str) -> dict:
    """The metadata of field ``name`` of ``cls``, with its library default as ``default``."""
    for f in fields(cls):
        if f.name == name:
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            return {**f.metadata, "default": default}
    raise KeyError(name)


def check_fields(obj: Any, names: Sequence[str] | None = None) -> None:
    """Raise TunesmithError naming the first field of ``obj`` outside its bounds or choices."""
    for f in fields(obj):
        if names is not None and f.name not in names:
            continue
        value, meta = getattr(obj, f.name), f.metadata
        if value is None:
            continue
        choices = meta.get("choices")
        if choices and value not in choices:
            raise TunesmithError(f"must be {', '.join(choices[:-1])} or {choices[-1]}", field=f.name)
        if in_bounds(meta, value):
            continue
        raise TunesmithError(meta.get("message") or bounds_text(meta), field=f.name)


def in_bounds(meta: dict, value: Any) -> bool:
    return not (("min" in meta and value < meta["min"]) or ("gt" in meta and value <= meta["gt"])
                or ("max" in meta and value > meta["max"]) or ("lt" in meta and value >= meta["lt"]))


def bounds_text(meta: dict) -> str:
    """"must be between 0 and 1", "must be at least 1", "must be in (0, 10]"."""
    lo, hi = meta.get("min", meta.get("gt")), meta.get("max", meta.get("lt"))
    if lo is not None and hi is not None:
        if "gt" in meta and "max" in meta:
            return f"must be in ({lo}, {hi}]"
        return f"must be between {lo} and {hi}"
    return f"must be at least {lo}" if lo is not None else f"must be at most {hi}"


# Tokens per forward/backward. On a CPU this bounds activation memory (~0.7 GB per 512 tokens)
# at no cost in speed; on a GPU bigger is faster.
MICRO_BATCH_TOKENS = {"cpu": 1024, "cuda": 65536, "mps": 8192}


@dataclass
class TrainConfig:
    """Everything that decides what a run computes. Saved as the run's config.json."""

    base: str = setting(DEFAULT_BASE, "base model: a name, a model dir or a .gguf")
    method: str = setting("lora", "lora or full", choices=("lora", "full"))
    epochs: int = setting(4, "passes over the training data", min=1, job_max=50)
    lr: float | None = setting(None, "peak learning rate (default 1e-3 LoRA, 5e-5 full)", gt=0, lt=1)
    batch_size: int = setting(8, "blocks per optimizer step", min=1, job_max=256)
    micro_batch_size: int | None = setting(None, "blocks per forward/backward (default: a token budget per device)")
    block_size: int = setting(512, "tokens per block (the longest example)", min=16, max=8192)
    lora_r: int = setting(16, "LoRA rank", min=1)
    lora_alpha: int = setting(32, "LoRA scale numerator (the update is scaled by alpha / r)")
    lora_dropout: float = setting(0.0, "dropout on the LoRA input")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    warmup_fraction: float = setting(0.05, "share of the steps spent warming the learning rate up")
    max_steps: int | None = setting(None, "stop after this many optimizer steps", min=1, job_max=1_000_000)
    seed: int = setting(0, "seed of the data order, the split and the LoRA initialisation", min=0, max=2**32 - 1)
    valid_fraction: float = setting(0.05, "held-out share of the examples for validation", min=0, max=0.5)
    dtype: str = setting("auto", "auto (bf16 where supported), bf16 or fp32")
    device: str = setting("auto", "auto, cpu, cuda")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass (less memory)")
    compile: str = setting("auto", "torch.compile the layers: auto (long CPU runs), on, off",
                           choices=("auto", "on", "off"))
    save_every: int | None = setting(None, "also checkpoint every N steps", min=1)
    keep_checkpoints: int = setting(2, "how many of the newest checkpoints to keep (best/ is kept too)", min=1)
    sample_prompts: list[str] = setting(help="fixed prompt for samples.md (repeatable)", factory=list)
    sample_tokens: int = setting(60, "tokens written per sample after each epoch")
    chat_loss: str = setting("assistant", "what chat examples learn: the assistant's messages, or all tokens",
                             choices=("assistant", "all"))

    def check(self) -> None:
        check_fields(self)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.method == "lora" else 5e-5)

    @property
    def micro_batch(self) -> int:
        return micro_batch_size(self, "cpu")


def micro_batch_size(cfg: TrainConfig, device) -> int:
    """Blocks per forward/backward: small on a CPU (memory), the whole batch on a GPU (throughput)."""
    budget = MICRO_BATCH_TOKENS.get(getattr(device, "type", str(device)).split(":")[0], MICRO_BATCH_TOKENS["cpu"])
    micro = cfg.micro_batch_size or max(1, budget // cfg.block_size)
    return max(1, min(micro, cfg.batch_size))


@dataclass
class SamplingConfig:
    """How a continuation is sampled. ``Model.generate`` and ``Model.stream`` take these as keywords."""

    max_tokens: int = setting(256, "most new tokens", min=1, max=8192, cli=200)
    temperature: float = setting(0.8, "0 = greedy", min=0, max=5, openai=1.0, openai_max=2)
    top_p: float = setting(1.0, "nucleus sampling: keep the likeliest tokens up to this probability",
                           gt=0, max=1, cli=0.95)
    top_k: int = setting(0, "keep only the k likeliest tokens (0 = off)", min=0, openai_max=1000,
                       message="must be 0 (off) or positive")
    repetition_penalty: float = setting(1.0, "penalise tokens already seen (1 = off)", gt=0, max=10,
                                        cli=1.1)
    stop: Sequence[str] = setting((), "stop at this text (repeatable)")
    seed: int | None = setting(None, "same seed, same text")
    # token id -> added to its logit before sampling; -100 bans a token, 100 all but forces it
    logit_bias: Mapping[int, float] | None = setting(None, "add to these tokens' logits", min=-100, max=100,
                                                     tokens=300)

    def check(self, vocab: int | None = None) -> None:
        """Raise TunesmithError naming the first bad field; ``vocab`` bounds logit_bias's token ids."""
        check_fields(self, [f.name for f in fields(self) if f.name != "logit_bias"])
        bias = self.logit_bias
        if not bias:
            return
        meta = spec(SamplingConfig, "logit_bias")
        if len(bias) > meta["tokens"]:
            raise TunesmithError(f"at most {meta['tokens']} tokens, got {len(bias)}", field="logit_bias")
        for token, value in bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0 or (vocab is not None and token >= vocab):
                top = f" below {vocab}" if vocab is not None else ""
                raise TunesmithError(f"token id {token!r} must be an integer from 0{top}", field="logit_bias")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                    or not in_bounds(meta, value):
                raise TunesmithError(f"bias {value!r} of token {token} must be between {meta['min']} and {meta['max']}",
                                     field="logit_bias")


def with_overrides(config: TrainConfig, overrides: dict) -> TrainConfig:
    """``config`` with the given fields replaced; a name that is not a field is an error."""
    from dataclasses import replace

    unknown = set(overrides) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise TunesmithError(f"unknown option(s): {', '.join(sorted(unknown))}")
    return replace(config, **overrides)
