"""Continuous batching: the completions of one loaded model share one decoding loop.

A ``Batcher`` owns a thread that repeats: take newcomers (prefill their prompts, together on the
fused decoder, and sample their first tokens), then run one decoding step for every sequence in
the batch at once, sample each row with that sequence's own settings and seeded generator (rows
that share their settings in one call), and hand each sequence its token.
Sequences join and leave between steps: a finished, stopped or cancelled sequence frees its row
at once. The thread exits when nothing is left to do and starts again with the next request.

The same seed gives the same text whether a sequence runs alone or beside others, by
construction: every sequence, alone or not, goes through this loop, and nothing a row computes
depends on the other rows. Each step runs the C++ step over the whole batch
(``Decoder.step_rows``), whose products sum every row in one fixed order whatever the batch;
where it cannot be built, the Python step runs on oneDNN's reordered bf16 weights
(``Decoder.pack``), which also give each row the bits it gets alone (tested; fp32 products there
do not keep rows apart, see bench/NOTES.md). Newcomers' prompts are prefilled together on the
reordered weights, each with its lone bits; sampling several rows gives each the draw it gets
alone. Text is therefore the same as alone for bf16 models.

Models the fused decoder supports (``decoder.Decoder``: SmolLM2, Llama) decode the whole batch
in one call over one shared cache, sequence i in row i, each row at its own position; rows are
compacted when a sequence leaves. Other Llama-shaped decoders (Mistral, Qwen2) use
``decode_step``, with attention per row over that row's own cache; other architectures run each
row as its own forward pass.
"""

from __future__ import annotations

import threading
import time
import weakref
from contextlib import closing
from dataclasses import dataclass
from typing import Callable, Iterator

from . import decode_kernel
from .config import SamplingConfig
from .errors import TunesmithError
from .generate import Chunk, Completion, Model, _kernels, _sample, _sample_each, _Text

MAX_BATCH = 16  # sequences decoded together; more wait for a row
# Prompt tokens prefilled together in one pass (the fused decoder); more wait for the next step.
PREFILL_TOKENS = 4096
# The longest an idle loop waits for requests the server has admitted but not yet submitted.
GATHER_SECONDS = 0.05


@dataclass
class Event:
    """What a sequence reports: a streamed ``chunk``, its ``done`` completion, or an ``error``."""

    kind: str  # "chunk" | "done" | "error"
    index: int  # the choice's index within its request
    chunk: Chunk | None = None
    completion: Completion | None = None
    error: BaseException | None = None


Sink = Callable[[Event], None]


class Request:
    """One submitted request: ``n`` sequences that share a prompt. ``cancel()`` frees their rows
    before the next step; a cancelled sequence reports nothing more."""

    def __init__(self, prompt_ids: list[int], params: SamplingConfig, n: int, logprobs: int | None,
                 stream: bool, sink: Sink):
        self.prompt_ids = prompt_ids
        self.params = params
        self.n = n
        self.logprobs = logprobs
        self.stream = stream
        self.sink = sink
        self.cancelled = False
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled = True


class _Seq:
    """One completion being written: its cache, sampling state and text."""

    def __init__(self, request: Request, index: int, model: Model, kv, prompt_len: int):
        import torch

        params = request.params
        self.request = request
        self.index = index
        self.params = params
        self.kv = kv  # (layers, 2, kv_heads, prompt_len + max_tokens, head_dim), or a DynamicCache
        self.length = prompt_len  # positions held in kv
        self.prompt_len = prompt_len
        self.generator = torch.Generator(device=model.device)
        seed = params.seed + index if params.seed is not None else time.time_ns() % 2**63
        self.generator.manual_seed(seed)
        self.seen = None  # prompt + sampled ids, for the repetition penalty
        if params.repetition_penalty != 1.0:
            self.seen = torch.empty((1, prompt_len + params.max_tokens), dtype=torch.long, device=model.device)
            self.seen[0, :prompt_len] = torch.tensor(request.prompt_ids)
        self.text = _Text(model.tokenizer, params.stop, model._stop_ids(params.stop))
        self.model = model
        self.steps = 0
        self.token = 0  # the last sampled id, the next step's input
        self.sent = 0
        self.lps: list[float] = []
        self.tops: list[dict] = []
        self.first = 0.0
        self.done = False
        self.row = -1  # its row of the shared cache (fused decoder)

    def take(self, logits) -> None:
        """Sample this sequence's next token from its (1, vocab) float logits and report it."""
        token, lp, top = _sample(logits, None if self.seen is None else self.seen[:, : self.prompt_len + self.steps],
                                 self.params, self.generator, self.request.logprobs)
        self.accept(int(token[0]), lp, top)

    def shared_sampling(self):
        """What sequences must share to be sampled together (``_sample_each``), or None for a
        sequence sampled alone (a repetition penalty reads its own history)."""
        if self.seen is not None:
            return None
        p = self.params
        bias = tuple(sorted(p.logit_bias.items())) if p.logit_bias else None
        return p.temperature, p.top_k, p.top_p, bias, self.request.logprobs

    def accept(self, tid: int, lp, top) -> None:
        """Report the sampled token ``tid`` (its logprob ``lp``, a (1,) tensor, and ``top``)."""
        if self.steps == 0:
            self.first = time.perf_counter() - self.request.submitted
        self.token = tid
        if self.seen is not None:
            self.seen[0, self.prompt_len + self.steps] = tid
        self.steps += 1
        text = self.text
        if text.add(tid):
            self.lps.append(float(lp[0]))
            if top is not None:
                self.tops.append(top[0])
        if text.finish or self.steps >= self.params.max_tokens:
            self._finish()
        elif self.request.stream:
            safe = len(text.text) - text.held_back()
            if safe > self.sent:
                self.request.sink(Event("chunk", self.index, chunk=Chunk(text.text[self.sent:safe], None, len(text.ids))))
                self.sent = safe

    def _finish(self) -> None:
        text = self.text
        text.close()
        self.done = True
        self.kv = None
        if self.request.stream:
            self.request.sink(Event("chunk", self.index,
                                    chunk=Chunk(text.text[self.sent:], text.finish, text.completion_tokens)))
        kept = text.ids[: text.completion_tokens]
        decode = self.model.tokenizer.decode
        completion = Completion(
            text=text.text, finish_reason=text.finish, prompt_tokens=self.prompt_len,
            completion_tokens=text.completion_tokens, tokens=[decode([t]) for t in kept],
            token_logprobs=self.lps[: len(kept)],
            top_logprobs=self.tops[: len(kept)] if self.request.logprobs else None,
            seconds=time.perf_counter() - self.request.submitted, first_token_seconds=self.first)
        self.request.sink(Event("done", self.index, completion=completion))


def _llama_shaped(net) -> bool:
    inner = getattr(net, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or not layers or not hasattr(inner, "rotary_emb") or not hasattr(net, "lm_head"):
        return False
    attn = layers[0].self_attn
    if any(hasattr(attn, name) for name in ("q_norm", "k_norm", "sinks")):
        return False
    if getattr(net.config, "sliding_window", None) and getattr(net.config, "use_sliding_window", True):
        return False
    return all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")) and all(
        hasattr(layers[0], p) for p in ("input_layernorm", "post_attention_layernorm", "mlp"))


def decode_step(net, tokens, positions, seqs: list[_Seq]):
    """One decoding step of a Llama-shaped model for a batch: ``tokens`` and ``positions`` are
    (B,) tensors; each row reads and extends its own cache ``seqs[i].kv`` at ``seqs[i].length``.
    Returns the (B, vocab) logits in fp32. Weight products run for the batch; attention per row."""
    import torch
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = net.model
    x = inner.embed_tokens(tokens[:, None])  # (B, 1, hidden)
    cos, sin = inner.rotary_emb(x, positions[:, None])
    b = x.shape[0]
    for li, layer in enumerate(inner.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, 1, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, 1, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, 1, -1, attn.head_dim)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        outs = []
        for i, seq in enumerate(seqs):
            end = seq.length + 1
            cache = seq.kv[li]
            cache[0, :, seq.length] = k[i, :, 0]
            cache[1, :, seq.length] = v[i, 0]
            outs.append(F.scaled_dot_product_attention(q[i: i + 1], cache[0, None, :, :end], cache[1, None, :, :end],
                                                       scale=attn.scaling, enable_gqa=True))
        o = torch.cat(outs).transpose(1, 2).reshape(b, 1, -1)
        x = x + attn.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return net.lm_head(inner.norm(x))[:, -1].float()


class Batcher:
    """The decoding loop of one loaded model, shared by every request for it."""

    def __init__(self, model: Model, max_batch: int = MAX_BATCH, linger: float = 30.0,
                 arriving: Callable[[], int] | None = None):
        self._model = weakref.ref(model)  # the loop holds the model only while it runs (and lingers)
        self.max_batch = max_batch
        self.linger = linger  # seconds the loop's thread waits for new work before it ends
        # How many requests are on their way to submit() (the server counts them from admission):
        # an idle loop gives them up to GATHER_SECONDS to arrive, so requests sent together are
        # prefilled together. A request alone waits for nothing.
        self._arriving = arriving
        self._cond = threading.Condition()
        self._pending: list[Request] = []
        self._thread: threading.Thread | None = None
        self.llama_shaped = _llama_shaped(model.model)
        # Models with a fused decoder (decoder.Decoder) decode the batch in one call over one
        # shared cache, sequence i in row i; others use decode_step or a forward pass per row.
        self.fused = model.decoder is not None
        self._cache = None  # the fused path's decoder.KVCache, while the loop runs
        self.peak_batch = 0  # the most sequences one step has decoded (for tests and the bench)

    # -- submitting -----------------------------------------------------------------------
    def submit(self, prompt: str, params: SamplingConfig, sink: Sink, *, n: int = 1, logprobs: int | None = None,
               stream: bool = False) -> Request:
        """Queue ``n`` completions of ``prompt``; ``sink`` receives their events from the loop's
        thread (choice ``i`` samples with seed ``params.seed + i``)."""
        model = self._model()
        if not 1 <= n <= self.max_batch:
            raise TunesmithError(f"must be between 1 and {self.max_batch}", field="n")
        params.check(model.vocab_size)
        ids = model._encode(prompt)[0].tolist()
        if len(ids) + params.max_tokens > model.context_length:
            raise TunesmithError(
                f"prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {model.context_length} tokens", field="max_tokens")
        request = Request(ids, params, n, logprobs, stream, sink)
        with self._cond:
            self._pending.append(request)
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, args=(model,), daemon=True,
                                                name=f"tunesmith-batch-{model.name}")
                self._thread.start()
        return request

    def generate(self, prompt: str, *, n: int = 1, logprobs: int | None = None, **sampling) -> list[Completion]:
        """``Model.generate`` through the shared loop: ``n`` completions, choice ``i`` with seed ``seed + i``."""
        done: list[Completion | None] = [None] * n
        with closing(self._events(prompt, n=n, logprobs=logprobs, stream=False, **sampling)) as events:
            for event in events:
                done[event.index] = event.completion
                if all(done):
                    break
        return done  # type: ignore[return-value]

    def stream(self, prompt: str, **sampling) -> Iterator[Chunk]:
        """``Model.stream`` through the shared loop: the chunks of one completion as they are written."""
        with closing(self._events(prompt, n=1, logprobs=None, stream=True, **sampling)) as events:
            for event in events:
                if event.kind == "chunk":
                    yield event.chunk
                elif event.kind == "done":
                    return

    def _events(self, prompt: str, *, n: int, logprobs: int | None, stream: bool, **sampling) -> Iterator[Event]:
        import queue

        stop = sampling.pop("stop", None)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        params = SamplingConfig(**sampling, stop=stop)
        q: queue.SimpleQueue = queue.SimpleQueue()
        request = self.submit(prompt, params, q.put, n=n, logprobs=logprobs, stream=stream)
        try:
            while True:
                event = q.get()
                if event.kind == "error":
                    raise event.error
                yield event
        finally:
            request.cancel()

    # -- the loop --------------------------------------------------------------------------
    def _take_newcomers(self, free: int) -> list[Request]:
        """The waiting requests that fit in ``free`` rows, in order, with at most
        PREFILL_TOKENS prompt tokens in all (the first one whatever its length)."""
        with self._cond:
            self._pending = [r for r in self._pending if not r.cancelled]
            taken: list[Request] = []
            tokens = 0
            while self._pending and self._pending[0].n <= free:
                size = len(self._pending[0].prompt_ids)
                if taken and tokens + size > PREFILL_TOKENS:
                    break
                request = self._pending.pop(0)
                taken.append(request)
                free -= request.n
                tokens += size
            return taken

    def _loop(self, model: Model) -> None:
        active: list[_Seq] = []
        while True:
            active = self._keep(active)
            with self._cond:
                self._pending = [r for r in self._pending if not r.cancelled]
                if not active and not self._pending:
                    # Wait a while for the next request rather than start a new thread for it.
                    self._cond.wait_for(lambda: self._pending, timeout=self.linger)
                    if not self._pending:
                        self._thread = None
                        self._cache = None
                        return
            if not active:
                self._gather()
            newcomers = self._take_newcomers(self.max_batch - len(active))
            # the fused decoder prefills the newcomers in one pass, other models one by one
            for group in ([newcomers] if self.fused and newcomers else [[r] for r in newcomers]):
                try:
                    prefill = self._prefill_fused if self.fused else self._prefill
                    active.extend(prefill(model, group, len(active)))
                except Exception as exc:  # noqa: BLE001 - reported to the requests of that prefill
                    for request in group:
                        request.sink(Event("error", 0, error=exc))
            running = self._keep(active)
            if not running:
                active = running
                continue
            self.peak_batch = max(self.peak_batch, len(running))
            try:
                self._step(model, running)
            except Exception as exc:  # noqa: BLE001 - reported to every request in the step
                for seq in running:
                    seq.done = True
                    seq.request.sink(Event("error", seq.index, error=exc))
            active = running

    def _gather(self) -> None:
        """Wait (at most GATHER_SECONDS) while requests are still on their way to submit()."""
        if self._arriving is None:
            return
        deadline = time.monotonic() + GATHER_SECONDS
        while self._arriving() > 0 and time.monotonic() < deadline:
            time.sleep(0.001)

    def _keep(self, seqs: list[_Seq]) -> list[_Seq]:
        """The sequences still running, in order; on the fused path each moves down to the row
        of its new index (a subsequence only moves down, so no row is overwritten before it is read)."""
        kept = [s for s in seqs if not s.done and not s.request.cancelled]
        if self._cache is not None:
            for row, seq in enumerate(kept):
                if seq.row != row:
                    self._cache.move_row(seq.row, row, seq.length)
                    seq.row = row
        return kept

    def _rows(self, model: Model, rows: int, positions: int) -> None:
        """Make the shared cache hold at least ``rows`` rows of ``positions`` positions (it grows
        by doubling its rows and in 256-position steps, keeping what it holds)."""
        from .decoder import cache_length

        cache = self._cache
        if cache is not None and cache.k.shape[1] >= rows and cache.length >= positions:
            return
        have_rows = 0 if cache is None else cache.k.shape[1]
        want_rows = min(self.max_batch, max(rows, 2 * have_rows, 1))
        want_length = cache_length(max(positions, 0 if cache is None else cache.length), model.context_length)
        if cache is None:
            self._cache = model.decoder.new_cache(want_rows, want_length)
        else:
            self._cache = cache.grown(want_rows, want_length)

    def _prefill_fused(self, model: Model, requests: list[Request], first_row: int) -> list[_Seq]:
        """Run the newcomers' prompts in one ``Decoder.prefill`` (each prompt once, its weights
        read once for all of them), give each of a request's sequences a copy of its cache row
        and sample their first tokens. The sequences take rows ``first_row`` on, in order."""
        import torch

        model.decoder.pack()  # on this thread: the loop's own (once; every row then keeps its bits)
        rows, row = [], first_row
        for request in requests:
            rows.append(row)
            row += request.n
        positions = max(len(r.prompt_ids) + r.params.max_tokens for r in requests)
        self._rows(model, row, positions)
        prompts = [torch.tensor(r.prompt_ids, device=model.device) for r in requests]
        with torch.inference_mode(), _kernels(small=False):
            logits = model.decoder.prefill(prompts, self._cache, rows)
        seqs = []
        for i, (request, start) in enumerate(zip(requests, rows)):
            length = len(request.prompt_ids)
            for index in range(request.n):
                if index:
                    self._cache.move_row(start, start + index, length)
                seq = _Seq(request, index, model, None, length)
                seq.row = start + index
                with torch.inference_mode():
                    seq.take(logits[i : i + 1])
                seqs.append(seq)
        return seqs

    def _prefill(self, model: Model, requests: list[Request], first_row: int) -> list[_Seq]:
        """Run the prompt of the one request in ``requests`` once, give each of its sequences a
        copy of its cache and its first token (models without the fused decoder)."""
        import torch
        from transformers import DynamicCache

        (request,) = requests
        ids = torch.tensor([request.prompt_ids], device=model.device)
        length = ids.shape[1]
        cache = DynamicCache()
        with torch.inference_mode(), _kernels(small=False):
            logits = model._forward(ids, cache, logits_to_keep=1).logits[:, -1, :].float()
        seqs = []
        for index in range(request.n):
            if self.llama_shaped:
                first = cache.layers[0].keys
                kv = torch.empty((len(cache.layers), 2, first.shape[1], length + request.params.max_tokens,
                                  first.shape[3]), dtype=first.dtype, device=first.device)
                for li, layer in enumerate(cache.layers):
                    kv[li, 0, :, :length] = layer.keys[0]
                    kv[li, 1, :, :length] = layer.values[0]
            else:
                kv = cache if index == request.n - 1 else _copy_cache(cache)
            seq = _Seq(request, index, model, kv, length)
            with torch.inference_mode():
                seq.take(logits)
            seqs.append(seq)
        return seqs

    def _step(self, model: Model, seqs: list[_Seq]) -> None:
        import torch

        with torch.inference_mode():
            with _kernels(small=False):
                if self.fused:
                    logits = model.decoder.step_rows([s.token for s in seqs], [s.length for s in seqs],
                                                     self._cache.k, self._cache.v)
                elif self.llama_shaped:
                    tokens = torch.tensor([s.token for s in seqs], device=model.device)
                    positions = torch.tensor([s.length for s in seqs], device=model.device)
                    logits = decode_step(model.model, tokens, positions, seqs)
                else:
                    rows = [model._forward(torch.tensor([[s.token]], device=model.device), s.kv).logits[:, -1, :]
                            for s in seqs]
                    logits = torch.cat(rows).float()
            groups: dict = {}
            for i, seq in enumerate(seqs):
                seq.length += 1
                if not seq.request.cancelled:
                    key = seq.shared_sampling()
                    if key is None:
                        seq.take(logits[i: i + 1])
                    else:
                        groups.setdefault(key, []).append(i)
            with decode_kernel.one_thread():
                for rows in groups.values():
                    first = seqs[rows[0]]
                    index = torch.tensor(rows, device=logits.device)
                    tokens, lps, tops = _sample_each(logits.index_select(0, index), first.params,
                                                     [seqs[i].generator for i in rows], first.request.logprobs)
                    for j, i in enumerate(rows):
                        seqs[i].accept(int(tokens[j]), lps[j : j + 1], None if tops is None else [tops[j]])


def _copy_cache(cache):
    import copy

    return copy.deepcopy(cache)
