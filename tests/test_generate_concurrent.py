"""Concurrent generations with the real bundled model: each writes what it writes alone."""

from __future__ import annotations

import threading

import pytest

from tunesmith import load

pytestmark = pytest.mark.real_model

LONG = "The old lighthouse keeper climbed the stairs each evening and lit the lamp. " * 24
REQUESTS = [
    (LONG + "One night", {"max_tokens": 24, "temperature": 0}),  # a long prefill
    ("It was a cold night", {"max_tokens": 24, "temperature": 0.8, "seed": 7}),  # decodes meanwhile
    ("The recipe needs", {"max_tokens": 24, "temperature": 0}),
]


def _key(c):
    return c.text, c.completion_tokens, c.token_logprobs


def test_concurrent_requests_write_what_each_writes_alone(real_base_dir):
    model = load("smollm2-135m")
    alone = [_key(model.generate(prompt, **kw)[0]) for prompt, kw in REQUESTS]
    together: list = [None] * len(REQUESTS)
    start = threading.Barrier(len(REQUESTS))

    def work(i):
        prompt, kw = REQUESTS[i]
        start.wait()
        together[i] = _key(model.generate(prompt, **kw)[0])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the same text and the same logprobs, bit for bit: no pass ran with other kernels
    assert together == alone
