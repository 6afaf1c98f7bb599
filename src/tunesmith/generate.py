"""Load a model (a run, a base name or a path) and write text with it.

The decoding loop is our own rather than ``model.generate()``: it keeps one KV cache,
runs each step under ``torch.inference_mode`` in bf16 where the CPU supports it, and
streams text with stop sequences handled exactly, which ``generate()``'s streamer does not.
Llama-family models run on ``decoder.Decoder`` (fused weights, a preallocated cache, and a
compiled one-token step once ``Model.warm()`` has built it); others on transformers' forward.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

from .config import SamplingConfig, spec
from .errors import TunesmithError

if TYPE_CHECKING:
    from .decoder import Decoder

MAX_TOKENS_LIMIT = spec(SamplingConfig, "max_tokens")["max"]


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


SamplingParams = SamplingConfig  # the earlier name


def _decoding():
    """The decoder module (imports torch, so it is loaded on first use)."""
    from . import decoder

    return decoder


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
        # bf16 weights on a CPU: decoding steps use PyTorch's own bf16 kernels (see _KernelSwitch).
        self._cpu_bf16 = self.device.type == "cpu" and model.dtype == torch.bfloat16
        self.quant = "int8" if _decoding().is_quantized(model) else "none"
        self._decoder: Decoder | None = None
        self._decoder_lock = threading.Lock()
        self._steps: dict[tuple[int, int], object] = {}  # (rows, cache length) -> compiled step
        self._compiled = None  # the compiled step function, once warm() made it
        self.compile_seconds: float | None = None  # what warm() took (None: not compiled)

    def __repr__(self) -> str:
        quant = ", quant=int8" if self.quant == "int8" else ""
        return f"Model({self.name!r}, device={self.device}, dtype={self.model.dtype}{quant})"

    # -- the decoding step ----------------------------------------------------------------
    @property
    def decoder(self) -> Decoder | None:
        """The fused forward pass (built on first use), or None where the architecture is not
        one it implements (then transformers' forward is used)."""
        if self._decoder is None and _decoding().supports(self.model):
            with self._decoder_lock:
                if self._decoder is None:
                    self._decoder = _decoding().Decoder(self.model)
        return self._decoder

    def warm(self, rows: int = 1, positions: int = 256) -> float | None:
        """Compile the one-token decoding step (``torch.compile``, inductor's C++ code on a CPU)
        for ``rows`` sequences and a cache of ``positions`` (prompt + new tokens, rounded up to a
        multiple of 256), and run it once; later generations with the same rows and cache size
        use it. Returns the seconds it took (None where there is no decoder). Compiled code is
        kept in inductor's on-disk cache, so a later process builds it much faster. Safe to call
        from a background thread while generating: generations use the eager step until the
        compiled one is ready. A failure to compile leaves the eager step in place."""
        import torch

        dec = self.decoder
        if dec is None:
            return None
        length = _decoding().cache_length(positions, self.context_length)
        key = (rows, length)
        if key in self._steps:
            return 0.0
        start = time.perf_counter()
        with self._decoder_lock:
            if self._compiled is None:
                self._compiled = torch.compile(dec.step_static, dynamic=False, fullgraph=True)
            step = self._compiled
        try:
            with torch.inference_mode():
                cache = dec.new_cache(rows, length)
                pos = torch.zeros(rows, dtype=torch.long, device=self.device)
                token = torch.zeros(rows, dtype=torch.long, device=self.device)
                # compiled outside the kernel switch: a compile of minutes must not hold up prefills
                step(token, pos, cache.k, cache.v)
        except Exception as exc:  # noqa: BLE001 - compiling is an optimisation: keep the eager step
            import warnings

            warnings.warn(f"the compiled decoding step failed ({type(exc).__name__}: {exc}); decoding stays eager",
                          stacklevel=2)
            return None
        self._steps[key] = step
        self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds

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
    def _decode_steps(self, prompt: str, params: SamplingConfig, n: int, logprobs: int | None):
        """Yield, per step, the sampled token ids (n,) plus their logprobs; the caller decides when to stop."""
        import torch

        params.check(self.vocab_size)
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
        seen = None  # prompt + sampled ids, for the repetition penalty: one buffer, filled in place
        if params.repetition_penalty != 1.0:
            seen = torch.empty((n, prompt_len + params.max_tokens), dtype=torch.long, device=self.device)
            seen[:, :prompt_len] = input_ids
        # PyTorch's own bf16 kernels for the steps of a few rows of transformers' forward pass;
        # the fused decoder picks its own products, all oneDNN's (decoder._Linear).
        small = self._cpu_bf16 and n <= SMALL_DECODE_ROWS and self.decoder is None
        if n > 1 and self.decoder is not None and self.decoder.kernel() is None:
            self.decoder.pack()  # several rows on the Python step: oneDNN's reordered weights (16 rows: +16% tokens/s)
        with torch.inference_mode():
            prefill, step = self._stepper(input_ids, n, prompt_len + params.max_tokens)
            with self._kernels(small=False):
                logits = prefill()
            for index in range(params.max_tokens):
                length = prompt_len + index
                token, lp, top = _sample(logits, None if seen is None else seen[:, :length], params, generator, logprobs)
                yield token, lp, top
                if index + 1 == params.max_tokens:
                    break  # the last token needs no forward pass after it
                if seen is not None:
                    seen[:, length] = token
                with self._kernels(small=small):
                    logits = step(token)

    def _stepper(self, input_ids, n: int, positions: int):
        """``(prefill, step)`` for one generation of ``n`` rows: ``prefill()`` runs the prompt once
        and returns logits (n, vocab); ``step(token)`` appends one token per row."""
        import torch

        dec = self.decoder
        if dec is None:  # transformers' forward on its own growing cache
            from transformers import DynamicCache

            cache = DynamicCache()

            def prefill_hf():
                out = self._forward(input_ids, cache, logits_to_keep=1)
                if n > 1:  # one prefill, then the cache is repeated for the n samples
                    cache.batch_repeat_interleave(n)
                return out.logits[:, -1, :].float().expand(n, -1)

            return prefill_hf, lambda token: self._forward(token[:, None], cache).logits[:, -1, :].float()

        length = _decoding().cache_length(positions, self.context_length)
        cache = dec.new_cache(n, length)
        compiled = self._steps.get((n, length))

        def prefill():
            logits = dec.forward(input_ids, cache)
            if n > 1:  # one prefill, then the cache is repeated for the n samples
                cache.repeat_first_row()
            return logits.expand(n, -1)

        if compiled is None:
            return prefill, lambda token: dec.forward(token[:, None], cache)
        pos = torch.zeros(n, dtype=torch.long, device=self.device)

        def prefill_then_position():
            logits = prefill()
            pos.fill_(cache.filled)
            return logits

        def step(token):
            logits = compiled(token, pos, cache.k, cache.v)
            pos.add_(1)
            return logits

        return prefill_then_position, step

    def _kernels(self, *, small: bool):
        """The CPU kernel switch for one forward pass (no switch on other devices)."""
        return _kernels(small) if self.device.type == "cpu" else nullcontext()

    def _forward(self, input_ids, cache, **kwargs):
        """One forward pass that extends ``cache`` (``cache=``; transformers before 5.2x calls it ``past_key_values=``)."""
        if self._cache_kwarg is None:
            import inspect

            inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            self._cache_kwarg = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
        return self.model(input_ids=input_ids, use_cache=True, **{self._cache_kwarg: cache}, **kwargs)

    @property
    def vocab_size(self) -> int:
        """The number of token ids the model scores (its logits' width)."""
        head = self.model.get_output_embeddings()
        rows = getattr(head, "out_features", None)  # nn.Linear and Int8Linear (whose .weight dequantizes)
        return int(rows) if rows is not None else int(self.model.config.vocab_size)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = SamplingConfig.max_tokens,
        temperature: float = SamplingConfig.temperature,
        top_p: float = SamplingConfig.top_p,
        top_k: int = SamplingConfig.top_k,
        repetition_penalty: float = SamplingConfig.repetition_penalty,
        stop: Sequence[str] | str | None = SamplingConfig.stop,
        n: int = 1,
        seed: int | None = None,
        logprobs: int | None = None,
        logit_bias: Mapping[int, float] | None = None,
    ) -> list[Completion]:
        """Write ``n`` continuations of ``prompt`` (sampled together as one batch)."""
        if not 1 <= n <= 16:
            raise TunesmithError("must be between 1 and 16", field="n")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        params = SamplingConfig(max_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed, logit_bias)
        start = time.perf_counter()
        first = 0.0
        stop_ids = self._stop_ids(stop)
        texts = [_Text(self.tokenizer, stop, stop_ids) for _ in range(n)]
        lps: list[list[float]] = [[] for _ in range(n)]
        tops: list[list[dict]] = [[] for _ in range(n)]
        for step, (token, lp, top) in enumerate(self._decode_steps(prompt, params, n, logprobs)):
            if step == 0:
                first = time.perf_counter() - start
            for i, text in enumerate(texts):
                if text.finish:
                    continue
                if text.add(int(token[i])):
                    lps[i].append(float(lp[i]))
                    if top is not None:
                        tops[i].append(top[i])
            if all(t.finish for t in texts):
                break
        prompt_tokens = self._encode(prompt).shape[1]
        elapsed = time.perf_counter() - start
        results = []
        for i, text in enumerate(texts):
            text.close()
            kept = text.ids[: text.completion_tokens]
            results.append(
                Completion(
                    text=text.text,
                    finish_reason=text.finish,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=text.completion_tokens,
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
        max_tokens: int = SamplingConfig.max_tokens,
        temperature: float = SamplingConfig.temperature,
        top_p: float = SamplingConfig.top_p,
        top_k: int = SamplingConfig.top_k,
        repetition_penalty: float = SamplingConfig.repetition_penalty,
        stop: Sequence[str] | str | None = SamplingConfig.stop,
        seed: int | None = None,
        n: int = 1,
        logit_bias: Mapping[int, float] | None = None,
    ) -> Iterator[Chunk]:
        """Yield text as it is written. Text that might be the start of a stop sequence is held
        back until it is known not to be one, so a stop sequence never reaches the reader.
        The chunks join to the text ``generate()`` writes with the same arguments, and the last
        chunk carries the same finish_reason and completion_tokens."""
        if n != 1:
            raise TunesmithError("streaming writes one completion at a time", field="n")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        params = SamplingConfig(max_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed, logit_bias)
        text = _Text(self.tokenizer, stop, self._stop_ids(stop))
        sent = 0
        for token, _, _ in self._decode_steps(prompt, params, 1, None):
            text.add(int(token[0]))
            if text.finish:
                break
            safe = len(text.text) - text.held_back()
            if safe > sent:
                yield Chunk(text.text[sent:safe], None, len(text.ids))
                sent = safe
        text.close()
        yield Chunk(text.text[sent:], text.finish, text.completion_tokens)

    def _stop_ids(self, stop: Sequence[str]) -> set[int]:
        """Token ids that end a completion: the model's eos, and any stop string that is one
        special token (such as ``<|im_end|>``), which decoded text never shows."""
        ids = set(self.eos_ids)
        special = set(self.tokenizer.all_special_ids)
        for s in stop:
            if s:
                enc = self.tokenizer.encode(s, add_special_tokens=False)
                if len(enc) == 1 and enc[0] in special:
                    ids.add(enc[0])
        return ids


class _Text:
    """One completion's text, built a token at a time with stop sequences applied.

    ``generate()`` and ``stream()`` both use it, so they cut at the same place and count the same
    tokens. A stop token (eos, or a stop string that is one special token) ends the text and is not
    counted. A stop string ends the text where it begins; the tokens counted are those that wrote
    some of the kept text (a token that holds both the last kept characters and the start of the
    stop string counts; tokens wholly inside or after the stop string do not). Special tokens are
    not shown in the text.
    """

    def __init__(self, tokenizer, stop: Sequence[str], stop_ids: set[int]):
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self._stop), default=0)
        self._stop_ids = stop_ids
        self.ids: list[int] = []
        self._starts: list[int] = []  # where each token's text begins in self.text
        self.text = ""
        self.finish: str | None = None
        self.completion_tokens = 0
        # ids[_prefix:_read] decode to the end of self.text; ids[_read:] are not shown yet
        # (half of a multi-byte character). Decoding a short window keeps each step cheap and
        # lets byte-level and sentencepiece tokenizers join pieces as a full decode would.
        self._prefix = 0
        self._read = 0
        self._cut = False  # a stop string cut the text

    def add(self, token: int) -> bool:
        """Take the next sampled token; False when it is a stop token (not part of the completion)."""
        if token in self._stop_ids:
            self.finish = "stop"
            return False
        self.ids.append(token)
        self._starts.append(len(self.text))
        self.completion_tokens = len(self.ids)
        self._read_text(final=False)
        return True

    def close(self) -> None:
        """The completion ends here: show any held-back bytes, and say why it ended."""
        if not self._cut:
            self._read_text(final=True)
        if self.finish is None:
            self.finish = "length"

    def held_back(self) -> int:
        """How many characters at the end of the text could be the start of a stop string."""
        for k in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0

    def _read_text(self, *, final: bool) -> None:
        if self._read == len(self.ids):
            return
        decode = self._tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        now = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if not final and (len(now) <= len(before) or now.endswith("\ufffd")):
            return  # nothing visible yet, or half a character: wait for the next token
        old = len(self.text)
        self.text += now[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        if self._stop:
            hits = [h for h in (self.text.find(s, max(0, old - self._longest + 1)) for s in self._stop) if h >= 0]
            if hits:
                cut = min(hits)
                self.text = self.text[:cut]
                self.completion_tokens = sum(1 for start in self._starts if start < cut)
                self.finish = "stop"
                self._cut = True


TOP_P_CANDIDATES = 256  # first candidates of top-p sampling; more are taken when they do not reach top_p


def _sample(logits, seen, params: SamplingConfig, generator, logprobs: int | None):
    """Pick the next token for each row: logit bias, repetition penalty, temperature, top-k, top-p,
    then sample.

    Log-probabilities are those of the model (before penalty and temperature), computed for the
    picked token (and the top ``logprobs``) only, rather than as a full-vocabulary log_softmax.
    """
    import torch

    log_norm = _log_norm(logits)
    values, ids = _candidates(logits, seen, params)
    if params.temperature == 0:
        token = values.argmax(dim=-1)
    else:
        token = torch.multinomial(values.softmax(-1), 1, generator=generator)
        token = (token if ids is None else ids.gather(1, token)).squeeze(1)
    return (token, *_logprobs(logits, token, log_norm, logprobs))


def _logprobs(logits, token, log_norm, logprobs: int | None):
    """The model's logprob of each row's ``token`` and, when asked, its ``logprobs`` most likely
    tokens ({id: logprob} per row)."""
    import torch

    lp = (logits.gather(1, token[:, None]) - log_norm).squeeze(1)
    top = None
    if logprobs:
        values, ids = torch.topk(logits, logprobs, dim=-1)
        values = values - log_norm
        top = [
            {str(int(i)): float(v) for i, v in zip(row_ids, row_vals)} for row_ids, row_vals in zip(ids, values)
        ]
    return lp, top


def _shape_logits(logits, seen, params: SamplingConfig):
    """The logits sampling draws from: the repetition penalty on ``seen`` ids (a positive logit is
    divided by it, a negative one multiplied, once per id), then, unless greedy, temperature,
    top-k (the k most likely), and top-p (the smallest set of most likely tokens whose
    probability reaches top_p); removed tokens get -inf."""
    import torch

    values, ids = _candidates(logits, seen, params)
    if ids is None:
        return values
    return torch.full_like(logits, float("-inf")).scatter(1, ids, values)


def _biased(logits, params: SamplingConfig):
    """``logits`` with ``params.logit_bias`` added to its tokens' columns (a copy), or ``logits``."""
    import torch

    if not params.logit_bias:
        return logits
    ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=logits.device)
    bias = torch.tensor([float(v) for v in params.logit_bias.values()], dtype=logits.dtype, device=logits.device)
    out = logits.clone()
    out[:, ids] += bias
    return out


def _sampler(logits):
    """The C++ sampling passes (``decode_kernel``: ``log_norms``, ``candidates``) for float logits
    on a CPU, or None (other dtypes and devices, or no extension): PyTorch's operators then."""
    import torch

    if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() != 2:
        return None
    from . import decode_kernel

    return decode_kernel.load(quiet=True)


def _log_norm(logits):
    """logsumexp of each row, computed row by row: over several rows at once PyTorch splits the
    work differently and a row's sum can differ in the last bit from that row's alone."""
    import torch

    fast = _sampler(logits)
    if fast is not None:
        return fast.log_norms(logits.contiguous())
    if logits.shape[0] == 1:
        return torch.logsumexp(logits, dim=-1, keepdim=True)
    return torch.cat([torch.logsumexp(row, dim=-1, keepdim=True) for row in logits.split(1)])


def _sample_each(logits, params: SamplingConfig, generators: list, logprobs: int | None):
    """``_sample`` for rows that share ``params`` (without a repetition penalty) and draw from
    generators of their own: row ``i`` gets what ``_sample(logits[i:i+1], None, params,
    generators[i], logprobs)`` gives it (tested bit for bit), with the shaping done once for all
    rows (the server's batch: 0.3 ms a row and step instead of 0.6)."""
    import torch

    log_norm = _log_norm(logits)
    if params.temperature == 0:
        token = _biased(logits, params).argmax(dim=-1)
    else:
        values, ids, short, counts = _candidate_rows(logits, None, params, widen=False)
        picked = []
        for i, generator in enumerate(generators):
            row_values, row_ids = values[i : i + 1], None if ids is None else ids[i : i + 1]
            if counts is not None:  # the row's own candidates, without the other rows' width
                row_values, row_ids = row_values[:, : counts[i]], row_ids[:, : counts[i]]
            elif short is not None and bool(short[i]):  # its candidates fell short of top_p: widen them alone
                row_values, row_ids = _candidates(logits[i : i + 1], None, params)
            row = torch.multinomial(row_values.softmax(-1), 1, generator=generator)
            picked.append(row if row_ids is None else row_ids.gather(1, row))
        token = torch.cat(picked).squeeze(1)
    return (token, *_logprobs(logits, token, log_norm, logprobs))


def _candidates(logits, seen, params: SamplingConfig):
    """``_shape_logits`` over the tokens top-k and top-p may keep: ``(values, ids)``, the shaped
    logits of each row's candidates (most likely first, -inf for the ones the row drops) and their
    token ids; ``ids`` is None when every token is a candidate (values: the whole vocabulary).
    Sampling among a few hundred candidates instead of the vocabulary saves a multinomial draw
    over 49,152 probabilities per row and step."""
    values, ids, _, _ = _candidate_rows(logits, seen, params, widen=True)
    return values, ids


def _candidate_rows(logits, seen, params: SamplingConfig, widen: bool):
    """``_candidates``, plus ``short`` and ``counts``.

    ``short``: for top-p without top-k, the rows whose candidates do not reach top_p yet (a bool
    tensor; None where that cannot happen). ``widen`` takes more candidates until no row is short;
    without it, short rows are the caller's to widen (alone, so that every other row keeps the
    candidates, and the random draws, it has alone).

    ``counts``: where the C++ passes chose the candidates (float logits on a CPU, ``_sampler``),
    each row's number of kept candidates (a list): its first ``counts[i]`` columns; the columns
    after them, up to the widest row, are other tokens with -inf. Never short then."""
    import torch

    logits = _biased(logits, params)
    if seen is not None:
        logits = logits.clone()
        picked = logits.gather(1, seen)
        picked = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
        logits.scatter_(1, seen, picked)
    if params.temperature == 0:
        return logits, None, None, None
    fast = _sampler(logits) if params.top_k or params.top_p < 1.0 else None
    if fast is not None:
        values, ids, counts = fast.candidates(logits.contiguous(), float(params.temperature), int(params.top_k),
                                              float(params.top_p))
        return values, ids, None, counts.tolist()
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    values, ids, short = logits, None, None
    if params.top_k:
        values, ids = torch.topk(logits, min(params.top_k, vocab), dim=-1)
    if params.top_p < 1.0:
        if ids is not None:  # top-p within the top-k: probabilities renormalised over them
            probs = values.softmax(-1)
            drop = probs.cumsum(-1) - probs >= params.top_p  # the mass above this token already reaches top_p
        else:
            # The most likely tokens first: a partial sort (top-k) of a few hundred candidates,
            # widened until the last candidate is dropped in every row, costs a tenth of sorting
            # the vocabulary.
            log_norm = _log_norm(logits)
            k = min(TOP_P_CANDIDATES, vocab)
            while True:
                values, ids = torch.topk(logits, k, dim=-1)
                probs = (values - log_norm).exp()
                drop = probs.cumsum(-1) - probs >= params.top_p
                short = None if k == vocab else ~drop[:, -1]
                if short is None or not widen or not bool(short.any()):
                    break
                k = min(vocab, 8 * k)
        values = values.masked_fill(drop, float("-inf"))
    return values, ids, short, None


class _KernelSwitch:
    """oneDNN off for decoding steps of bf16 weights on a CPU, without changing other generation work.

    oneDNN's bf16 matmul is built for big batches: for the (n, 576) x (576, k) products of a
    decoding step of a few rows, PyTorch's own bf16 kernels are faster (bench/NOTES.md). The switch
    (``torch.backends.mkldnn.enabled``) is process-wide and the two kernels round differently,
    so every forward pass of a generation on a CPU goes through this switch: decoding steps
    (``small=True``) run together, any other pass (prefill, fp32 models) waits until none of
    them is running, and the other way round. A prefill never runs with oneDNN off, whatever
    other requests are doing, so the same seed gives the same text alone or under load.
    Waiters of the other kind stop new entries, so neither kind starves. Work outside
    generation (training in another thread) does not take this switch: run it in another
    process while generating, as the server's job worker does.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._small: bool | None = None  # the kind running now
        self._active = 0
        self._waiting = {True: 0, False: 0}
        self._saved = True  # the process's oneDNN setting when no decoding step runs

    @contextmanager
    def __call__(self, small: bool):
        import torch

        with self._cond:
            self._waiting[small] += 1
            while self._active and (self._small != small or self._waiting[not small]):
                self._cond.wait()
            self._waiting[small] -= 1
            if not self._active:
                if small:
                    self._saved = torch.backends.mkldnn.enabled
                    torch.backends.mkldnn.enabled = False
                self._small = small
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    if self._small:
                        torch.backends.mkldnn.enabled = self._saved
                    self._small = None
                    self._cond.notify_all()


_kernels = _KernelSwitch()
# Decoding steps of at most this many rows use PyTorch's own bf16 kernels; wider ones (eval's
# batches of 16 samples) are faster with oneDNN: 16 rows wrote 51-71 tok/s against 32-35 with
# the switch on, 4 rows 26-30 against 19-20, while 2 and 3 rows were within noise of each other.
SMALL_DECODE_ROWS = 3


QUANT_CHOICES = ("none", "int8")
# `generate --compile auto` compiles the decoding step only when a call writes at least this many
# tokens (n x max_tokens): the compile takes minutes on 2 cores and the compiled step was not
# faster than the eager fused one where it was measured (bench/NOTES.md), so only very long
# runs risk it.
COMPILE_MIN_DECODE_TOKENS = 20000


def should_compile(mode: str, tokens: int) -> bool:
    """``--compile`` auto|on|off for a call that writes ``tokens`` tokens in all."""
    return mode == "on" or (mode == "auto" and tokens >= COMPILE_MIN_DECODE_TOKENS)


def check_quant(quant: str | None) -> str:
    """``quant`` as load() takes it: none (the model's dtype) or int8 (weight-only int8)."""
    quant = quant or "none"
    if quant not in QUANT_CHOICES:
        raise TunesmithError(f"unknown quantization {quant!r}: use one of {', '.join(QUANT_CHOICES)}", field="quant")
    return quant


def quantize(net, quant: str | None):
    """Ready a loaded model for generation, in place: weights frozen (which lets llama-family
    models decode on the fused decoder), and ``quant`` applied (int8: every linear layer of the
    decoder and the output head hold int8 weights with one scale per row; not for training)."""
    net.requires_grad_(False)
    if check_quant(quant) == "int8" and not _decoding().is_quantized(net):
        _decoding().quantize_int8(net)
    return net


def load(model: str | Path, *, device: str | None = None, dtype: str | None = "auto",
         quant: str | None = None) -> Model:
    """Load a run directory, a base model name, a model directory or a ``.gguf`` file for generation.
    ``quant="int8"`` holds the weights as int8 (weight-only: about half the bytes per token)."""
    from . import models, rundir
    from .device import pick_device, pick_dtype, setup_threads

    check_quant(quant)
    setup_threads()
    device = pick_device(device)
    torch_dtype = pick_dtype(device, dtype)
    path = Path(str(model)).expanduser()
    if rundir.is_run_dir(path):
        run = rundir.Run(path)
        net, tok = run.load_model(dtype=torch_dtype)
        quantize(net.to(device).eval(), quant)
        return Model(net, tok, name=run.name, path=path, base=run.config.get("base"))
    net, tok = models.load_base(str(model), dtype=torch_dtype)
    quantize(net.to(device).eval(), quant)
    # The tokenizer's chat template names the base; tokenizers also tell us the right eos.
    return Model(net, tok, name=str(model), path=models.resolve(str(model)), base=str(model))
