"""Generation with the tiny random Llama: determinism, stop sequences, streaming, limits."""

from __future__ import annotations

import pytest

from tunesmith import TunesmithError, load


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load("tiny-llama")


def test_same_seed_same_text_and_different_seed_differs(model):
    a = model.generate("Once upon a time", max_tokens=20, seed=7, temperature=1.0)[0].text
    b = model.generate("Once upon a time", max_tokens=20, seed=7, temperature=1.0)[0].text
    c = model.generate("Once upon a time", max_tokens=20, seed=8, temperature=1.0)[0].text
    assert a == b and a != c


def test_n_samples_are_distinct_and_counted(model):
    out = model.generate("Hello", max_tokens=12, n=3, seed=1, temperature=1.0)
    assert len(out) == 3 and len({c.text for c in out}) == 3
    assert all(c.finish_reason in ("stop", "length") for c in out)
    assert all(c.prompt_tokens == model.count_tokens("Hello") for c in out)


def test_greedy_matches_transformers_generate(model):
    import torch

    ids = model._encode("The sea")
    with torch.inference_mode():
        ref = model.model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    want = model.tokenizer.decode(ref, skip_special_tokens=True)
    got = model.generate("The sea", max_tokens=12, temperature=0)[0]
    assert got.text == want


def test_stream_yields_the_same_text_as_generate(model):
    full = model.generate("A river", max_tokens=25, seed=3)[0]
    chunks = list(model.stream("A river", max_tokens=25, seed=3))
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[-1].finish_reason == full.finish_reason
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_stop_sequence_cuts_and_is_never_streamed(model):
    full = model.generate("Words:", max_tokens=40, seed=5, temperature=1.0)[0].text
    assert len(full) > 10
    stop = full[6:9]  # a string the model is known to write with this seed
    cut = model.generate("Words:", max_tokens=40, seed=5, temperature=1.0, stop=[stop])[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.startswith(cut.text)
    streamed = "".join(c.text for c in model.stream("Words:", max_tokens=40, seed=5, temperature=1.0, stop=[stop]))
    assert streamed == cut.text


def test_logprobs_are_log_probabilities(model):
    out = model.generate("Hi", max_tokens=5, seed=0, logprobs=3)[0]
    assert len(out.token_logprobs) == len(out.tokens)
    assert all(lp <= 0 for lp in out.token_logprobs)
    assert all(len(top) == 3 for top in out.top_logprobs)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
     ({"n": 0}, "n"), ({"max_tokens": 10**6}, "max_tokens")],
)
def test_bad_sampling_settings_name_the_field(model, kwargs, field):
    with pytest.raises(TunesmithError) as info:
        model.generate("x", **kwargs)
    assert info.value.field == field


def test_unknown_model_is_a_clear_error(tiny_model_dir):
    with pytest.raises(TunesmithError, match="unknown base model"):
        load("definitely-not-a-model")
    with pytest.raises(TunesmithError, match="not in the local Hugging Face cache"):
        load("someone/not-cached-model-xyz")
