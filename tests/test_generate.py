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


def _generate_and_stream(model, prompt, **kw):
    """What generate() and stream() return for the same arguments: (text, finish, tokens) each."""
    full = model.generate(prompt, **kw)[0]
    chunks = list(model.stream(prompt, **kw))
    assert all(c.finish_reason is None for c in chunks[:-1])
    streamed = ("".join(c.text for c in chunks), chunks[-1].finish_reason, chunks[-1].completion_tokens)
    return (full.text, full.finish_reason, full.completion_tokens), streamed, full


def _covering_tokens(tokenizer, ids, text):
    """Reference count: the fewest leading tokens whose decoded text starts with ``text``."""
    for k in range(len(ids) + 1):
        if tokenizer.decode(ids[:k], skip_special_tokens=True).startswith(text):
            return k
    raise AssertionError("text is not written by these tokens")


@pytest.mark.parametrize("seed", [5, 11])
def test_stop_sequences_cut_generate_and_stream_alike(model, seed):
    kw = {"max_tokens": 40, "seed": seed, "temperature": 1.0}
    plain = model.generate("Words:", **kw)[0]
    assert plain.finish_reason == "length" and len(plain.text) > 12
    pieces = plain.tokens
    assert "".join(pieces) == plain.text  # whole characters per token, so offsets are known
    boundary = len(pieces[0]) + len(pieces[1]) + len(pieces[2])  # where the 4th token's text starts
    cases = [
        [plain.text[6:9]],  # somewhere in the text
        [plain.text[boundary - 1 : boundary + 1]],  # straddles the 3rd/4th token boundary
        [plain.text[boundary : boundary + 2]],  # starts exactly at a token
        [plain.text[9:12], plain.text[3:5]],  # two stops: the earlier one wins
        ["\x00not written\x00"],  # never written: same as no stop
    ]
    for stop in cases:
        got, streamed, full = _generate_and_stream(model, "Words:", stop=stop, **kw)
        assert got == streamed, stop
        hits = [plain.text.find(s) for s in stop if s in plain.text]
        if not hits:
            assert got == (plain.text, "length", plain.completion_tokens)
            continue
        cut = min(hits)
        assert got[0] == plain.text[:cut] and got[1] == "stop"
        assert not any(s in got[0] for s in stop)
        assert len(full.tokens) == got[2] == len(full.token_logprobs)
        assert "".join(full.tokens).startswith(got[0]) and plain.tokens[: got[2]] == full.tokens
        # tokens up to the stop: those that wrote some of the kept text, none wholly inside the stop
        assert got[2] == min(k for k in range(len(pieces) + 1) if "".join(pieces[:k]).startswith(got[0]))


SCRIPT = " The cat sat on the mat. The dog ran"


def _scripted(model, monkeypatch, ids):
    """Make the model write exactly ``ids`` (then max_tokens runs out), to test stops on known tokens."""
    import torch

    def steps(prompt, params, n, logprobs):
        for tid in ids[: params.max_tokens]:
            yield torch.full((n,), tid), torch.full((n,), -1.0), None

    monkeypatch.setattr(model, "_decode_steps", steps)


def test_stop_at_special_tokens_and_eos(model, monkeypatch):
    tok = model.tokenizer
    words = tok.encode(SCRIPT, add_special_tokens=False)
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    assert endoftext not in model.eos_ids and endoftext in tok.all_special_ids
    ids = words[:4] + [endoftext] + words[4:]
    _scripted(model, monkeypatch, ids)
    before = tok.decode(words[:4])

    # a stop string that is one special token: the text ends before it, and it is not counted
    for stop in (["<|endoftext|>"], ["<|endoftext|>", "never"]):
        got, streamed, full = _generate_and_stream(model, "x", max_tokens=30, stop=stop)
        assert got == streamed == (before, "stop", 4)
        assert full.tokens == [tok.decode([t]) for t in words[:4]]

    # without it, a special token is not shown but is a token the model wrote
    got, streamed, _ = _generate_and_stream(model, "x", max_tokens=30)
    assert got == streamed == (SCRIPT, "length", len(ids))

    # the model's eos (here <|im_end|>) ends the text the same way, asked for or not
    eos = model.eos_ids[0]
    _scripted(model, monkeypatch, words[:5] + [eos] + words[5:])
    for stop in ([], [tok.decode([eos])]):
        got, streamed, _ = _generate_and_stream(model, "x", max_tokens=30, stop=stop)
        assert got == streamed == (tok.decode(words[:5]), "stop", 5)


def test_scripted_stops_on_known_tokens(model, monkeypatch):
    tok = model.tokenizer
    ids = tok.encode(SCRIPT, add_special_tokens=False)
    pieces = [tok.decode([t]) for t in ids]
    assert "".join(pieces) == SCRIPT
    _scripted(model, monkeypatch, ids)
    for stop, want in [
        ("t on", " The cat sa"),  # starts inside " sat" and runs into " on"
        (" on", " The cat sat"),  # starts exactly at a token
        (". The", " The cat sat on the mat"),
        ("ran", " The cat sat on the mat. The dog "),  # the last token
        (" The", ""),  # the very first token
    ]:
        got, streamed, _ = _generate_and_stream(model, "x", max_tokens=30, stop=[stop])
        assert got == streamed == (want, "stop", _covering_tokens(tok, ids, want)), stop
    assert _covering_tokens(tok, ids, " The cat sa") == 3 and _covering_tokens(tok, ids, " The cat sat") == 3
    # max_tokens runs out before the stop would be written
    got, streamed, _ = _generate_and_stream(model, "x", max_tokens=3, stop=[" on"])
    assert got == streamed == (" The cat sat", "length", 3)


def test_stream_holds_back_only_a_possible_stop_start(model, monkeypatch):
    tok = model.tokenizer
    ids = tok.encode(" caf\u00e9 \u2615 done", add_special_tokens=False)
    _scripted(model, monkeypatch, ids)
    got, streamed, _ = _generate_and_stream(model, "x", max_tokens=30, stop=["dog"])
    assert got == streamed == (" caf\u00e9 \u2615 done", "length", len(ids))
    chunks = [c.text for c in model.stream("x", max_tokens=30, stop=["dog"])]
    assert len(chunks) > 2  # written as it comes, not all at the end
    assert not any("\ufffd" in c for c in chunks)  # never half a character

    ids = tok.encode(SCRIPT, add_special_tokens=False)
    pieces = [tok.decode([t]) for t in ids]
    _scripted(model, monkeypatch, ids)
    chunks = [c.text for c in model.stream("x", max_tokens=30, stop=["mat!"])]
    mat = pieces.index(" mat")
    # " mat" might begin "mat!": only "mat" waits for the next token; everything else goes out at once
    assert chunks == pieces[:mat] + [" ", "mat" + pieces[mat + 1]] + pieces[mat + 2 :] + [""]


def _reference_logprobs(model, prompt, ids):
    """log_softmax of the logits of one full forward pass over prompt + ids, in fp32."""
    import torch

    context = torch.tensor([model.tokenizer.encode(prompt, add_special_tokens=False) + ids])
    with torch.no_grad():
        logits = model.model(input_ids=context).logits[0].float()
    start = context.shape[1] - len(ids) - 1
    return torch.log_softmax(logits[start : start + len(ids)], dim=-1)


@pytest.fixture(scope="module")
def model32(tiny_model_dir):
    return load("tiny-llama", dtype="fp32")


def test_logprobs_equal_log_softmax_of_the_logits(model32):
    out = model32.generate("Hi there", max_tokens=6, temperature=0, logprobs=3)[0]
    ids = [int(max(top, key=top.get)) for top in out.top_logprobs]  # greedy: the top-1 id is the pick
    assert out.tokens == [model32.tokenizer.decode([t]) for t in ids]
    ref = _reference_logprobs(model32, "Hi there", ids)
    for step, (lp, top) in enumerate(zip(out.token_logprobs, out.top_logprobs)):
        assert lp == pytest.approx(float(ref[step, ids[step]]), abs=1e-4)
        values, best = ref[step].topk(3)
        assert list(top) == [str(int(i)) for i in best]
        assert list(top.values()) == pytest.approx([float(v) for v in values], abs=1e-4)


def test_sampled_logprobs_are_the_models_not_the_shaped_ones(model32):
    # with temperature, top-k and a repetition penalty, the logprob is still the model's own
    out = model32.generate("Hi there", max_tokens=5, temperature=1.7, top_k=5, repetition_penalty=1.5,
                           seed=3, logprobs=20)[0]
    ids = []
    for piece, top in zip(out.tokens, out.top_logprobs):
        matches = [int(i) for i in top if model32.tokenizer.decode([int(i)]) == piece]
        assert len(matches) == 1  # the shaped top 5 lies in the model's top 20
        ids.append(matches[0])
    ref = _reference_logprobs(model32, "Hi there", ids)
    assert out.token_logprobs == pytest.approx([float(ref[s, t]) for s, t in enumerate(ids)], abs=1e-4)


# -- sampling rules against small reference implementations ---------------------------------

LOGITS = [2.0, 1.2, 0.9, 0.3, -0.4, -1.0, -2.5, 0.0]


def _ref_probs(logits, *, temperature=1.0, top_k=0, top_p=1.0, penalty=1.0, seen=(), bias=None):
    """Plain-Python reference: logit bias, penalty, temperature, top-k, top-p (smallest top set reaching top_p)."""
    import math

    x = list(logits)
    for i, b in (bias or {}).items():
        x[i] += b
    for i in set(seen):
        x[i] = x[i] / penalty if x[i] > 0 else x[i] * penalty
    x = [v / temperature for v in x]
    keep = set(range(len(x)))
    order = sorted(range(len(x)), key=lambda i: -x[i])
    if top_k:
        keep = set(order[:top_k])
    weights = [math.exp(x[i]) if i in keep else 0.0 for i in range(len(x))]
    total = sum(weights)
    probs = [w / total for w in weights]
    if top_p < 1.0:
        mass, kept = 0.0, set()
        for i in order:
            if i in keep and mass < top_p:
                kept.add(i)
                mass += probs[i]
        weights = [probs[i] if i in kept else 0.0 for i in range(len(x))]
        probs = [w / sum(weights) for w in weights]
    return probs


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 1.0},
        {"temperature": 0.5},
        {"temperature": 2.0},
        {"top_k": 1},
        {"top_k": 3},
        {"top_k": 3, "temperature": 0.7},
        {"top_p": 0.3},
        {"top_p": 0.5},
        {"top_p": 0.8},
        {"top_p": 0.95, "temperature": 1.5},
        {"top_k": 4, "top_p": 0.6},
        {"penalty": 1.5, "seen": [0, 0, 4]},
        {"penalty": 2.0, "seen": [1, 5], "top_k": 2},
        {"penalty": 0.5, "seen": [3]},
        {"bias": {0: -100.0}},
        {"bias": {5: 2.5, 1: -1.0}, "top_p": 0.8},
        {"bias": {2: 1.0}, "penalty": 1.5, "seen": [2], "top_k": 3},
    ],
)
def test_shaped_distribution_matches_the_reference(settings):
    import torch

    from tunesmith.generate import SamplingParams, _shape_logits

    s = dict(settings)
    params = SamplingParams(temperature=s.get("temperature", 1.0), top_k=s.get("top_k", 0),
                            top_p=s.get("top_p", 1.0), repetition_penalty=s.get("penalty", 1.0),
                            logit_bias=s.get("bias"))
    seen = torch.tensor([s["seen"]]) if "seen" in s else None
    probs = _shape_logits(torch.tensor([LOGITS]), seen, params).softmax(-1)[0]
    assert probs.tolist() == pytest.approx(_ref_probs(LOGITS, **s), abs=1e-6)


@pytest.mark.parametrize("scale,top_p", [(0.05, 0.9), (0.5, 0.95), (3.0, 0.5), (8.0, 0.99)])
def test_top_p_over_a_large_vocabulary_matches_the_reference(scale, top_p):
    """Flat and peaked rows over 3,000 tokens, two rows at once: the candidates are widened past
    the first few hundred when a flat row needs more of them to reach top_p."""
    import torch

    from tunesmith.generate import SamplingParams, _shape_logits

    rows = (torch.randn(2, 3000, generator=torch.Generator().manual_seed(1)) * torch.tensor([[scale], [0.05]])).double()
    params = SamplingParams(temperature=1.0, top_p=top_p)
    probs = _shape_logits(rows, None, params).softmax(-1)
    for row in range(2):
        want = _ref_probs(rows[row].tolist(), top_p=top_p)
        assert probs[row].tolist() == pytest.approx(want, abs=1e-9)
    assert int((probs[1] > 0).sum()) > 256  # the flat row kept more than the first candidates


def test_sampling_draws_follow_the_shaped_distribution():
    import torch

    from tunesmith.generate import SamplingParams, _sample

    draws = 20000
    for settings in ({"top_k": 3}, {"top_p": 0.8}, {"temperature": 0.5}):
        params = SamplingParams(temperature=settings.get("temperature", 1.0), top_k=settings.get("top_k", 0),
                                top_p=settings.get("top_p", 1.0))
        gen = torch.Generator().manual_seed(0)
        token, _, _ = _sample(torch.tensor([LOGITS]).expand(draws, -1), None, params, gen, None)
        freq = torch.bincount(token, minlength=len(LOGITS)).double() / draws
        want = _ref_probs(LOGITS, **settings)
        assert all(f == 0 for f, p in zip(freq.tolist(), want) if p == 0)  # filtered tokens never drawn
        assert freq.tolist() == pytest.approx(want, abs=0.015)  # > 5 standard errors


def test_temperature_zero_is_argmax_after_the_penalty():
    import torch

    from tunesmith.generate import SamplingParams, _sample

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    token, _, _ = _sample(logits, None, SamplingParams(temperature=0, top_k=3, top_p=0.1), gen, None)
    assert token.tolist() == logits.argmax(-1).tolist()
    # a penalty moves the argmax once it is large enough: 2.0 / 1.5 < 1.5 < 2.0 / 1.1,
    # and -0.5 * 1.5 < -0.6 < -0.5 * 1.1
    rows = torch.tensor([[2.0, 1.5, -3.0], [-0.5, -0.6, -3.0]])
    seen = torch.tensor([[0], [0]])
    token, _, _ = _sample(rows, seen, SamplingParams(temperature=0, repetition_penalty=1.1), gen, None)
    assert token.tolist() == [0, 0]
    token, _, _ = _sample(rows, seen, SamplingParams(temperature=0, repetition_penalty=1.5), gen, None)
    assert token.tolist() == [1, 1]


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
     ({"n": 0}, "n"), ({"max_tokens": 10**6}, "max_tokens"), ({"logit_bias": {0: 101}}, "logit_bias"),
     ({"logit_bias": {-1: 1.0}}, "logit_bias"), ({"logit_bias": {10**9: 1.0}}, "logit_bias"),
     ({"logit_bias": {0: float("nan")}}, "logit_bias"), ({"logit_bias": {i: 1.0 for i in range(301)}}, "logit_bias")],
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


def test_a_pass_outside_decoding_steps_waits_until_onednn_is_back_on():
    import threading

    import torch

    from tunesmith.generate import _kernels

    was = torch.backends.mkldnn.enabled
    seen = []
    in_step, release, prefilled = threading.Event(), threading.Event(), threading.Event()

    def decoding_step():
        with _kernels(True):
            seen.append(("step", torch.backends.mkldnn.enabled))
            in_step.set()
            release.wait(10)

    def prefill():
        with _kernels(False):
            seen.append(("prefill", torch.backends.mkldnn.enabled))
        prefilled.set()

    step = threading.Thread(target=decoding_step)
    step.start()
    assert in_step.wait(10)
    other = threading.Thread(target=prefill)
    other.start()
    assert not prefilled.wait(0.3)  # held while the step runs with oneDNN off
    release.set()
    step.join()
    other.join()
    assert seen == [("step", False), ("prefill", was)]
    assert torch.backends.mkldnn.enabled == was


@pytest.mark.parametrize("settings", [
    {"temperature": 0.0},
    {"temperature": 0.8, "top_p": 0.95},
    {"temperature": 1.0, "top_k": 50},
    {"temperature": 0.7, "top_k": 40, "top_p": 0.9},
    {"temperature": 1.2},
    {"temperature": 1.0, "top_p": 0.99},  # flat rows need more than the first 256 candidates
    {"temperature": 0.8, "top_p": 0.95, "logit_bias": {7: -100, 11: 5.0}},
    {"temperature": 0.0, "logit_bias": {3: 30.0}},
])
def test_rows_sampled_together_draw_what_each_draws_alone(settings):
    """The server samples the rows of a step together, each with its own generator: every row must
    get the token, logprob and top logprobs it gets sampled alone, bit for bit, step after step
    (its generator is left where sampling alone leaves it)."""
    import torch

    from tunesmith.generate import SamplingParams, _sample, _sample_each

    params = SamplingParams(**settings)
    rows = torch.randn(5, 49152, generator=torch.Generator().manual_seed(2)) * torch.tensor(
        [[6.0], [0.02], [3.0], [1.0], [0.05]])
    together = [torch.Generator().manual_seed(100 + i) for i in range(5)]
    alone = [torch.Generator().manual_seed(100 + i) for i in range(5)]
    for _ in range(3):
        tokens, lps, tops = _sample_each(rows, params, together, 3)
        for i in range(5):
            token, lp, top = _sample(rows[i : i + 1], None, params, alone[i], 3)
            assert int(tokens[i]) == int(token[0])
            assert torch.equal(lps[i : i + 1], lp)
            assert tops[i] == top[0]
    if settings.get("temperature") and not settings.get("top_k") and settings.get("top_p", 1.0) < 1.0:
        # draws differ between rows (their own generators), and tokens lie within each row's top-p set
        assert len({int(t) for t in tokens}) > 1


def test_logit_bias_bans_and_forces_tokens(model):
    """-100 on the greedy choice's token moves greedy decoding off it at every step; +100 on one
    token makes it every sampled token; the same request without a bias is unchanged."""
    plain = model.generate("The", max_tokens=6, temperature=0)[0]
    first = model.tokenizer.encode(plain.tokens[0], add_special_tokens=False)[0]
    banned = model.generate("The", max_tokens=6, temperature=0, logit_bias={first: -100})[0]
    ids = [model.tokenizer.encode(t, add_special_tokens=False) for t in banned.tokens]
    assert all(first not in i for i in ids)
    assert banned.text != plain.text
    forced = model.generate("The", max_tokens=5, temperature=1.0, seed=3, logit_bias={42: 100})[0]
    assert forced.text == model.tokenizer.decode([42] * 5)
    assert model.generate("The", max_tokens=6, temperature=0)[0].text == plain.text


@pytest.mark.parametrize("scale,top_k,top_p", [(0.05, 0, 0.9), (0.5, 0, 0.95), (3.0, 0, 0.5), (8.0, 0, 0.99),
                                               (2.0, 40, 0.9), (1.0, 300, 1.0), (0.02, 5000, 0.95)])
def test_cpp_candidates_keep_what_pytorch_keeps(scale, top_k, top_p):
    """The C++ sampling passes (float logits on a CPU) keep the tokens PyTorch's operators keep
    (float64 logits take those) with the same shaped values, for flat and peaked rows over the
    real vocabulary size, and draw each row as alone."""
    import torch

    from tunesmith import decode_kernel
    from tunesmith.generate import SamplingParams, _candidate_rows, _shape_logits

    module = decode_kernel.load(quiet=True)
    if module is None:
        pytest.skip("the C++ extension is not built here")
    rows = torch.randn(3, 49152, generator=torch.Generator().manual_seed(4)) * torch.tensor([[scale], [0.05], [6.0]])
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p)
    fast = _shape_logits(rows, None, params)
    slow = _shape_logits(rows.double(), None, params)
    kept = torch.isfinite(fast)
    assert torch.equal(kept, torch.isfinite(slow))
    torch.testing.assert_close(fast[kept], slow[kept].float())
    _, _, _, counts = _candidate_rows(rows, None, params, widen=False)
    assert counts == kept.sum(-1).tolist()
    # log-sum-exp as PyTorch computes it, within float rounding
    torch.testing.assert_close(module.log_norms(rows), torch.logsumexp(rows.double(), -1, keepdim=True).float())
