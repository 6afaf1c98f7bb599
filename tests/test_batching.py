"""The shared decoding loop in-process (tiny model): requests decoded together write what each
writes alone, join and leave between steps, and free their rows when cancelled."""

from __future__ import annotations

import threading
import time

import pytest

from tunesmith import load
from tunesmith.batching import Batcher

REQUESTS = [
    ("It was a cold night", {"max_tokens": 40, "temperature": 0.8, "seed": 7}),
    ("The recipe needs", {"max_tokens": 30, "temperature": 0}),
    ("Once upon a time", {"max_tokens": 35, "temperature": 1.0, "seed": 3, "top_p": 0.9, "top_k": 50}),
    ("The harbour at night " * 20, {"max_tokens": 25, "temperature": 0}),  # a long prefill
    ("Hello", {"max_tokens": 40, "temperature": 0.7, "seed": 1, "repetition_penalty": 1.3}),
]


def _key(c):
    return c.text, c.finish_reason, c.completion_tokens, c.token_logprobs


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load("tiny-llama")


@pytest.mark.parametrize("fused", [True, False], ids=["fused-decoder", "decode-step"])
def test_requests_decoded_together_write_what_each_writes_alone(tiny, fused):
    batcher = Batcher(tiny)
    assert batcher.fused  # the tiny model is llama-shaped: the fused decoder supports it
    batcher.fused = fused  # False: the per-row attention path of other llama-shaped models
    alone = [_key(batcher.generate(p, logprobs=2, **kw)[0]) for p, kw in REQUESTS]
    assert batcher.peak_batch == 1
    together: list = [None] * len(REQUESTS)
    start = threading.Barrier(len(REQUESTS))

    def work(i):
        prompt, kw = REQUESTS[i]
        start.wait()
        together[i] = _key(batcher.generate(prompt, logprobs=2, **kw)[0])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert batcher.peak_batch >= 3  # they did share steps
    assert together == alone  # bit for bit, logprobs included


def test_a_request_joining_midway_and_stop_sequences(tiny):
    batcher = Batcher(tiny)
    long_kw = {"max_tokens": 80, "temperature": 0.9, "seed": 11}
    short_kw = {"max_tokens": 20, "temperature": 0.9, "seed": 4, "stop": ["e"]}
    alone_long = "".join(c.text for c in batcher.stream("A long walk", **long_kw))
    alone_short = batcher.generate("Short", **short_kw)[0]
    assert alone_short.finish_reason == "stop" and "e" not in alone_short.text

    pieces = []
    joined = {}
    for i, chunk in enumerate(batcher.stream("A long walk", **long_kw)):
        pieces.append(chunk.text)
        if i == 10:  # the long one is under way: another request joins its batch
            joined["c"] = batcher.generate("Short", **short_kw)[0]
            joined["at"] = len(pieces)
    assert "".join(pieces) == alone_long
    assert _key(joined["c"]) == _key(alone_short)
    assert batcher.peak_batch == 2


def test_n_choices_use_seed_plus_index(tiny):
    batcher = Batcher(tiny)
    kw = {"max_tokens": 20, "temperature": 1.0}
    choices = batcher.generate("The sea", n=3, seed=20, **kw)
    singles = [batcher.generate("The sea", seed=20 + i, **kw)[0] for i in range(3)]
    assert [c.text for c in choices] == [s.text for s in singles]
    assert len({c.text for c in choices}) == 3


def test_a_cancelled_stream_frees_its_row(tiny):
    batcher = Batcher(tiny, max_batch=1, linger=0.2)
    stream = batcher.stream("Cancel me", max_tokens=1800, temperature=1.0, seed=2)
    for _ in range(3):
        next(stream)
    stream.close()  # the consumer goes away
    started = time.monotonic()
    done = batcher.generate("Next", max_tokens=5, temperature=0)[0]  # the only row is free again
    assert done.completion_tokens >= 1 and time.monotonic() - started < 30
    deadline = time.monotonic() + 10
    while batcher._thread is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batcher._thread is None  # nothing left: the loop's thread has ended


def test_requests_on_their_way_are_prefilled_together(tiny, monkeypatch):
    """An idle loop waits for requests the server has admitted but not yet submitted, so requests
    sent together share one prefill; each still writes what it writes alone."""
    import queue

    from tunesmith import batching
    from tunesmith.config import SamplingConfig

    monkeypatch.setattr(batching, "GATHER_SECONDS", 10.0)  # generous: the second request comes 0.2 s late
    dec = tiny.decoder
    prefills: list[int] = []
    real = dec.prefill
    monkeypatch.setattr(dec, "prefill", lambda prompts, cache, rows: (prefills.append(len(prompts)),
                                                                      real(prompts, cache, rows))[1])
    prompts = [("It was a cold night", 7), ("The recipe needs", 3)]
    alone = [Batcher(tiny).generate(p, max_tokens=12, temperature=0.8, seed=s)[0].text for p, s in prompts]
    prefills.clear()
    coming = [len(prompts)]
    batcher = Batcher(tiny, arriving=lambda: coming[0])
    sinks = []
    for prompt, seed in prompts:
        sink: queue.SimpleQueue = queue.SimpleQueue()
        batcher.submit(prompt, SamplingConfig(max_tokens=12, temperature=0.8, seed=seed), sink.put)
        coming[0] -= 1
        sinks.append(sink)
        time.sleep(0.2)
    texts = []
    for sink in sinks:
        while (event := sink.get(timeout=60)).kind != "done":
            assert event.kind != "error", event.error
        texts.append(event.completion.text)
    assert prefills == [2]
    assert texts == alone


def test_the_servers_count_of_arriving_requests():
    from tunesmith.server.batching import ARRIVAL_SECONDS, Batching

    batching = Batching(None, 4)
    first, second = batching.arrival(), batching.arrival()
    assert batching.arriving() == 2
    first.done()
    first.done()  # idempotent
    assert batching.arriving() == 1
    second.since -= ARRIVAL_SECONDS + 1  # one whose end was missed stops counting in time
    assert batching.arriving() == 0
