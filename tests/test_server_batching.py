"""A real `tunesmith serve` batching its users, driven by the official openai client (tiny model):
concurrent streams, n > 1, a request joining mid-way, and a client that goes away."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_server_live import servers  # noqa: F401 - the live server fixture

openai = pytest.importorskip("openai")

REQUESTS = [
    {"prompt": "It was a cold night", "max_tokens": 60, "temperature": 0.9, "seed": 7},
    {"prompt": "The recipe needs", "max_tokens": 45, "temperature": 0},
    {"prompt": "Once upon a time " * 10, "max_tokens": 50, "temperature": 1.0, "seed": 3, "top_p": 0.9},
    {"messages": [{"role": "user", "content": "Tell me about the sea"}], "max_tokens": 55, "temperature": 0.8,
     "seed": 12, "stop": ["\n\n"]},
]


def streamed(client, request: dict) -> dict:
    """One streaming request: its text, finish reason, and when its first and last chunks came."""
    start = time.monotonic()
    first = None
    pieces, finish = [], None
    if "messages" in request:
        stream = client.chat.completions.create(model="tiny-llama", stream=True, **request)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic()
                pieces.append(chunk.choices[0].delta.content)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
    else:
        stream = client.completions.create(model="tiny-llama", stream=True, **request)
        for chunk in stream:
            if chunk.choices[0].text:
                first = first or time.monotonic()
                pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
    return {"text": "".join(pieces), "finish": finish, "first": first, "end": time.monotonic(), "start": start}


def test_concurrent_streams_write_what_each_writes_alone(servers):  # noqa: F811
    client = servers().client()
    alone = [streamed(client, r) for r in REQUESTS]
    barrier = threading.Barrier(len(REQUESTS))

    def run(request):
        barrier.wait()
        return streamed(client, request)

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(run, REQUESTS))
    assert [(t["text"], t["finish"]) for t in together] == [(a["text"], a["finish"]) for a in alone]
    assert all(a["text"] for a in alone)
    # they were written at the same time: every stream had its first text before any stream ended
    assert max(t["first"] for t in together) < min(t["end"] for t in together)


def test_n_choices_streamed_and_not_match_single_requests(servers):  # noqa: F811
    client = servers().client()
    kw = {"model": "tiny-llama", "prompt": "The harbour at dawn", "max_tokens": 30, "temperature": 1.0}
    whole = client.completions.create(n=3, seed=40, **kw)
    singles = [client.completions.create(seed=40 + i, **kw).choices[0].text for i in range(3)]
    assert [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == singles
    assert len(set(singles)) == 3
    texts = {0: [], 1: [], 2: []}
    finishes = {}
    for chunk in client.completions.create(n=3, seed=40, stream=True, **kw):
        for choice in chunk.choices:
            texts[choice.index].append(choice.text)
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert ["".join(texts[i]) for i in range(3)] == singles
    assert finishes == {i: whole.choices[i].finish_reason for i in range(3)}


def test_a_request_joins_a_running_stream(servers):  # noqa: F811
    client = servers().client()
    long = {"model": "tiny-llama", "prompt": "A long walk", "max_tokens": 200, "temperature": 0.9, "seed": 11}
    short = {"model": "tiny-llama", "prompt": "Short", "max_tokens": 20, "temperature": 0.9, "seed": 4}
    alone_long = "".join(c.choices[0].text for c in client.completions.create(stream=True, **long))
    alone_short = client.completions.create(**short).choices[0].text
    pieces, joined = [], {}
    for chunk in client.completions.create(stream=True, **long):
        pieces.append(chunk.choices[0].text)
        if len(pieces) == 10:  # the long one is under way: another request joins it
            joined["text"] = client.completions.create(**short).choices[0].text
            joined["at"] = len(pieces)
    assert "".join(pieces) == alone_long and joined["text"] == alone_short
    assert joined["at"] < len(pieces) - 5  # the long stream went on after the short one was answered


def test_a_client_that_goes_away_frees_its_slot(servers):  # noqa: F811
    server = servers(args=("--max-running", "1", "--max-waiting", "0"))
    client = server.client()
    stream = client.completions.create(model="tiny-llama", prompt="Go on", max_tokens=2000 - 8, temperature=1.0,
                                       seed=1, stream=True)
    for _, _chunk in zip(range(3), stream):
        pass
    with pytest.raises(openai.RateLimitError):  # the one slot is taken
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=1)
    started = time.monotonic()
    stream.close()  # the client goes away mid-stream
    while True:
        try:
            done = client.completions.create(model="tiny-llama", prompt="Next", max_tokens=3, temperature=0)
            break
        except openai.RateLimitError:
            assert time.monotonic() - started < 10, "the slot was not freed"
            time.sleep(0.05)
    assert done.choices[0].text and done.usage.completion_tokens >= 1
