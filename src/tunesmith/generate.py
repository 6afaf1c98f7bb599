"""Load a model (a run, a base name or a path) and write text with it.

The decoding loop is our own rather than ``model.generate()``: it keeps one KV cache,
runs each step under ``torch.inference_mode`` in bf16 where the CPU supports it, and
streams text with stop sequences handled exactly, which ``generate()``'s streamer does not.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from .errors import TunesmithError

MAX_TOKENS_LIMIT = 8192


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
    seconds: float = 0.0
    first_token_seconds: float = 0.0


@dataclass
class Chunk:
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None

    def check(self) -> None:
        if not 0 < self.max_tokens <= MAX_TOKENS_LIMIT:
            raise TunesmithError(f"must be between 1 and {MAX_TOKENS_LIMIT}", field="max_tokens")
        if not 0 <= self.temperature <= 5:
            raise TunesmithError("must be between 0 and 5", field="temperature")
        if not 0 < self.top_p <= 1:
            raise TunesmithError("must be in (0, 1]", field="top_p")
        if self.top_k < 0:
            raise TunesmithError("must be 0 (off) or positive", field="top_k")
        if not 0 < self.repetition_penalty <= 10:
            raise TunesmithError("must be in (0, 10]", field="repetition_penalty")


class Model:
    """A causal LM ready for generation: weights in eval mode, tokenizer, device."""

    def __init__(self, model, tokenizer, *, name: str, path: Path | None = None, base: str | None = None):
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.path = path
        self.base = base or name
        self.device = next(model.parameters()).device
        eos = model.generation_config.eos_token_id if model.generation_config else None
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        self.eos_ids = sorted(ids)
        self._cache_kwarg: str | None = None
        # bf16 weights on a CPU: decoding steps use PyTorch's own bf16 kernels (see _small_batch_kernels).
        self._cpu_bf16 = self.device.type == "cpu" and model.dtype == torch.bfloat16

    def __repr__(self) -> str:
        return f"Model({self.name!r}, device={self.device}, dtype={self.model.dtype})"

    # -- text helpers -------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def chat_prompt(self, messages: list[dict]) -> str:
        if not self.tokenizer.chat_template:
            # A plain base model has no template: fall back to a readable transcript.
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join(lines) + "\nassistant:"
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _encode(self, prompt: str):
        import torch

        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:  # an empty prompt: start from BOS (or EOS, the document separator)
            start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_ids[0]
            ids = [start]
        return torch.tensor([ids], device=self.device)

    # -- decoding -------------------------------------------------------------------------
    def _decode_steps(self, prompt: str, params: SamplingParams, n: int, logprobs: int | None):
        """Yield, per step, the sampled token ids (n,) plus their logprobs; the caller decides when to stop."""
        import torch
        from transformers import DynamicCache

        params.check()
        input_ids = self._encode(prompt)
        prompt_len = input_ids.shape[1]
        if prompt_len + params.max_tokens > self.context_length:
            raise TunesmithError(
                f"prompt ({prompt_len} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {self.context_length} tokens",
                field="max_tokens",
            )
        generator = torch.Generator(device=self.device)  # sampling happens where the logits are
        generator.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % 2**63))
        cache = DynamicCache()
        seen = None  # prompt + sampled ids, for the repetition penalty: one buffer, filled in place
        if params.repetition_penalty != 1.0:
            seen = torch.empty((n, prompt_len + params.max_tokens), dtype=torch.long, device=self.device)
            seen[:, :prompt_len] = input_ids
        with torch.inference_mode():
            out = self._forward(input_ids, cache, logits_to_keep=1)
            if n > 1:  # one prefill, then the cache is repeated for the n samples
                cache.batch_repeat_interleave(n)
            logits = out.logits[:, -1, :].float().expand(n, -1)
            for step in range(params.max_tokens):
                length = prompt_len + step
                token, lp, top = _sample(logits, None if seen is None else seen[:, :length], params, generator, logprobs)
                yield token, lp, top
                if step + 1 == params.max_tokens:
                    break  # the last token needs no forward pass after it
                if seen is not None:
                    seen[:, length] = token
                with _small_batch_kernels(self._cpu_bf16):
                    out = self._forward(token[:, None], cache)
                logits = out.logits[:, -1, :].float()

    def _forward(self, input_ids, cache, **kwargs):
        """One forward pass that extends ``cache`` (``cache=``; transformers before 5.2x calls it ``past_key_values=``)."""
        if self._cache_kwarg is None:
            import inspect

            inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            self._cache_kwarg = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
        return self.model(input_ids=input_ids, use_cache=True, **{self._cache_kwarg: cache}, **kwargs)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] | str | None = (),
        n: int = 1,
        seed: int | None = None,
        logprobs: int | None = None,
    ) -> list[Completion]:
        """Write ``n`` continuations of ``prompt`` (sampled together as one batch)."""
        if not 1 <= n <= 16:
            raise TunesmithError("must be between 1 and 16", field="n")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        params = SamplingParams(max_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed)
        start = time.perf_counter()
        first = 0.0
        tokens: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[float]] = [[] for _ in range(n)]
        tops: list[list[dict]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        prompt_tokens = 0
        for step, (token, lp, top) in enumerate(self._decode_steps(prompt, params, n, logprobs)):
            if step == 0:
                first = time.perf_counter() - start
            for i in range(n):
                if finish[i]:
                    continue
                tid = int(token[i])
                if tid in self.eos_ids:
                    finish[i] = "stop"
                    continue
                tokens[i].append(tid)
                lps[i].append(float(lp[i]))
                if top is not None:
                    tops[i].append(top[i])
                if stop and _find_stop(self.tokenizer.decode(tokens[i][-64:]), stop) is not None:
                    finish[i] = "stop"
            if all(finish):
                break
        prompt_tokens = self._encode(prompt).shape[1]
        elapsed = time.perf_counter() - start
        results = []
        for i in range(n):
            text = self.tokenizer.decode(tokens[i], skip_special_tokens=True)
            cut = _find_stop(text, stop) if stop else None
            kept = tokens[i]
            if cut is not None:
                text = text[:cut]
                kept = _tokens_within(self.tokenizer, tokens[i], text)
            results.append(
                Completion(
                    text=text,
                    finish_reason=finish[i] or "length",
                    prompt_tokens=prompt_tokens,
                    completion_tokens=len(tokens[i]) + (1 if finish[i] == "stop" and cut is None else 0),
                    tokens=[self.tokenizer.decode([t]) for t in kept],
                    token_logprobs=lps[i][: len(kept)],
                    top_logprobs=tops[i][: len(kept)] if logprobs else None,
                    seconds=elapsed,
                    first_token_seconds=first,
                )
            )
        return results

    def stream(
        self,
        prompt: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] | str | None = (),
        seed: int | None = None,
        n: int = 1,
    ) -> Iterator[Chunk]:
        """Yield text as it is written. Text that might be the start of a stop sequence is held
        back until it is known not to be one, so a stop sequence never reaches the reader."""
        if n != 1:
            raise TunesmithError("streaming writes one completion at a time", field="n")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        params = SamplingParams(max_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed)
        tokens: list[int] = []
        sent = 0
        hold = max((len(s) for s in stop), default=0)
        for token, _, _ in self._decode_steps(prompt, params, 1, None):
            tid = int(token[0])
            if tid in self.eos_ids:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                yield Chunk(text[sent:], "stop", len(tokens) + 1)
                return
            tokens.append(tid)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = _find_stop(text, stop) if stop else None
            if cut is not None:
                yield Chunk(text[sent:cut], "stop", len(tokens))
                return
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            safe = len(text) - hold
            if safe > sent:
                yield Chunk(text[sent:safe], None, len(tokens))
                sent = safe
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        yield Chunk(text[sent:], "length", len(tokens))


def _find_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _tokens_within(tokenizer, tokens: list[int], text: str) -> list[int]:
    """The longest prefix of ``tokens`` whose decoded text fits inside ``text``."""
    for k in range(len(tokens), -1, -1):
        if len(tokenizer.decode(tokens[:k], skip_special_tokens=True)) <= len(text):
            return tokens[:k]
    return []


def _sample(logits, seen, params: SamplingParams, generator, logprobs: int | None):
    """Pick the next token for each row: repetition penalty, temperature, top-k, top-p, then sample.

    Log-probabilities are those of the model (before penalty and temperature), computed for the
    picked token (and the top ``logprobs``) only, rather than as a full-vocabulary log_softmax.
    """
    import torch

    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    raw = logits
    if seen is not None:
        logits = logits.clone()
        picked = logits.gather(1, seen)
        picked = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
        logits.scatter_(1, seen, picked)
    if params.temperature == 0:
        token = logits.argmax(dim=-1)
    else:
        logits = logits / params.temperature
        if params.top_k:
            kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > params.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
        probs = logits.softmax(-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    lp = (raw.gather(1, token[:, None]) - log_norm).squeeze(1)
    top = None
    if logprobs:
        values, ids = torch.topk(raw, logprobs, dim=-1)
        values = values - log_norm
        top = [
            {str(int(i)): float(v) for i, v in zip(row_ids, row_vals)} for row_ids, row_vals in zip(ids, values)
        ]
    return token, lp, top


_kernel_lock = threading.Lock()
_kernel_users = 0  # decoding steps running now with oneDNN off
_kernel_saved = True  # oneDNN's setting before the first of them


@contextmanager
def _small_batch_kernels(cpu_bf16: bool):
    """Run a decoding step (a few rows) with oneDNN off when the weights are bf16 on a CPU.

    oneDNN's bf16 matmul is built for big batches: for the (n, 576) x (576, k) products of a
    decoding step, PyTorch's own bf16 kernels are about twice as fast (bench/results/LATEST.md).
    The switch is process-wide, so concurrent generations share it through a count and the
    last one out restores oneDNN's setting (for training and prefill).
    """
    global _kernel_users, _kernel_saved
    if not cpu_bf16:
        yield
        return
    import torch

    with _kernel_lock:
        if _kernel_users == 0:
            _kernel_saved = torch.backends.mkldnn.enabled
        _kernel_users += 1
        torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        with _kernel_lock:
            _kernel_users -= 1
            if _kernel_users == 0:
                torch.backends.mkldnn.enabled = _kernel_saved


def load(model: str | Path, *, device: str | None = None, dtype: str | None = "auto") -> Model:
    """Load a run directory, a base model name, a model directory or a ``.gguf`` file for generation."""
    from . import models, rundir
    from .device import pick_device, pick_dtype, setup_threads

    setup_threads()
    device = pick_device(device)
    torch_dtype = pick_dtype(device, dtype)
    path = Path(str(model)).expanduser()
    if rundir.is_run_dir(path):
        run = rundir.Run(path)
        net, tok = run.load_model(dtype=torch_dtype)
        net.to(device).eval()
        return Model(net, tok, name=run.name, path=path, base=run.config.get("base"))
    net, tok = models.load_base(str(model), dtype=torch_dtype)
    net.to(device).eval()
    # The tokenizer's chat template names the base; tokenizers also tell us the right eos.
    return Model(net, tok, name=str(model), path=models.resolve(str(model)), base=str(model))
