"""The fused decoding forward pass and int8 weights, checked against transformers' own forward."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tunesmith import load
from tunesmith.decoder import Decoder, Int8Linear, quantize_rows, supports
from tunesmith.errors import TunesmithError

PROMPT = "It was a bright cold day in April, and the clocks were striking"


def _hf_logits(model, ids, steps):
    """Prompt logits then one logit row per fed token, from transformers' forward and its cache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = [model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1].float()]
    for token in steps:
        out.append(model(input_ids=token[:, None], cache=cache, use_cache=True).logits[:, -1].float())
    return out


def test_decoder_matches_transformers_forward(tiny_model_dir):
    m = load("tiny-llama", dtype="float32")
    assert supports(m.model)
    ids = m._encode(PROMPT)
    steps = [torch.tensor([5]), torch.tensor([17]), torch.tensor([301])]
    with torch.inference_mode():
        ref = _hf_logits(m.model, ids, steps)
        dec = Decoder(m.model)
        cache = dec.new_cache(1, 64)
        got = [dec.forward(ids, cache)] + [dec.forward(t[:, None], cache) for t in steps]
        assert cache.filled == ids.shape[1] + len(steps)
        # the model's own forward still works on the fused weights' views, with the same result
        again = _hf_logits(m.model, ids, steps)
    for a, b, c in zip(got, ref, again):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(c, b, rtol=0, atol=0)


def test_decoder_rows_share_one_prefill(tiny_model_dir):
    """n rows: the prompt runs once, its cache is copied, then each row gets its own token."""
    m = load("tiny-llama", dtype="float32")
    ids = m._encode(PROMPT)
    with torch.inference_mode():
        dec = m.decoder
        cache = dec.new_cache(2, 64)
        dec.forward(ids, cache)
        cache.repeat_first_row()
        both = dec.forward(torch.tensor([[7], [9]]), cache)
        ref7 = _hf_logits(m.model, ids, [torch.tensor([7])])[-1]
        ref9 = _hf_logits(m.model, ids, [torch.tensor([9])])[-1]
    torch.testing.assert_close(both[0], ref7[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[1], ref9[0], rtol=1e-4, atol=1e-4)


def test_step_with_a_position_per_row_matches_separate_sequences(tiny_model_dir):
    """Two sequences at different positions in one step (as a batch that sequences join at
    different times) give each the logits it gets alone."""
    m = load("tiny-llama", dtype="float32")
    dec = m.decoder
    first, second = m._encode(PROMPT), m._encode("Call me Ishmael.")
    with torch.inference_mode():
        alone = []
        both = dec.new_cache(2, 64)
        for row, (ids, token) in enumerate(((first, 7), (second, 9))):
            cache = dec.new_cache(1, 64)
            dec.forward(ids, cache)
            both.k[:, row], both.v[:, row] = cache.k[:, 0], cache.v[:, 0]
            alone.append(dec.forward(torch.tensor([[token]]), cache)[0])
        pos = torch.tensor([first.shape[1], second.shape[1]])
        got = dec.step_static(torch.tensor([7, 9]), pos, both.k, both.v)
    assert first.shape[1] != second.shape[1]
    torch.testing.assert_close(got[0], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], alone[1], rtol=1e-4, atol=1e-4)


def test_generate_text_is_the_same_on_both_forward_passes(tiny_model_dir, monkeypatch):
    fused = load("tiny-llama", dtype="float32")
    greedy = fused.generate(PROMPT, max_tokens=24, temperature=0)[0]
    sampled = fused.generate(PROMPT, max_tokens=24, temperature=0.9, seed=3, n=2)
    import tunesmith.decoder as decoder

    monkeypatch.setattr(decoder, "supports", lambda model: False)  # transformers' forward
    plain = load("tiny-llama", dtype="float32")
    assert plain.decoder is None
    assert plain.generate(PROMPT, max_tokens=24, temperature=0)[0].text == greedy.text
    assert [c.text for c in plain.generate(PROMPT, max_tokens=24, temperature=0.9, seed=3, n=2)] == \
        [c.text for c in sampled]


def test_int8_rows_round_to_the_nearest_step():
    w = torch.tensor([[0.3, -1.0, 0.25, 0.0], [2.0, 1.2, -0.5, 0.1]])
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8
    torch.testing.assert_close(scale, torch.tensor([1.0 / 127, 2.0 / 127]))
    assert q[0].tolist() == [38, -127, 32, 0]  # 0.3 * 127 = 38.1, 0.25 * 127 = 31.75
    assert q[1].tolist() == [127, 76, -32, 6]  # 1.2 * 63.5 = 76.2, -0.5 * 63.5 = -31.75, 0.1 * 63.5 = 6.35


def test_int8_linear_multiplies_like_its_dequantized_weights():
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    layer = Int8Linear(w, torch.float32)
    x = torch.randn(3, 64)
    dequant = layer.qweight.float() * layer.scale[:, None]
    torch.testing.assert_close(layer(x), x @ dequant.T, rtol=1e-5, atol=1e-5)
    assert (dequant - w).abs().max() <= layer.scale.max() / 2 + 1e-6  # error at most half a step


def test_load_int8_quantizes_every_linear_layer(tiny_model_dir):
    m = load("tiny-llama", dtype="float32", quant="int8")
    assert m.quant == "int8"
    linears = [mod for mod in m.model.modules() if isinstance(mod, torch.nn.Linear)]
    assert linears == []
    plain = load("tiny-llama", dtype="float32")
    ids = m._encode(PROMPT)
    with torch.inference_mode():
        a = m.model(input_ids=ids).logits.float()
        b = plain.model(input_ids=ids).logits.float()
        # the fused decoder on int8 weights gives the model's own (int8) forward
        cache = m.decoder.new_cache(1, 64)
        c = m.decoder.forward(ids, cache)
    torch.testing.assert_close(c, a[:, -1], rtol=1e-4, atol=1e-4)
    # int8 is close to the float model, not equal to it
    assert 0 < (a - b).abs().max() < 0.05 * b.abs().max()


def test_unknown_quant_is_refused(tiny_model_dir):
    with pytest.raises(TunesmithError, match="int8"):
        load("tiny-llama", quant="int4")


def test_warm_compiles_a_step_that_matches_the_eager_one(tiny_model_dir):
    m = load("tiny-llama", dtype="float32")
    eager = m.generate(PROMPT, max_tokens=12, temperature=0)[0].text
    seconds = m.warm(rows=1, positions=64)
    assert seconds is not None and seconds > 0
    assert m._steps  # generations of this size now take the compiled step
    assert m.generate(PROMPT, max_tokens=12, temperature=0)[0].text == eager
    assert m.warm(rows=1, positions=64) == 0.0  # already built


@pytest.mark.real_model
def test_int8_real_model_keeps_perplexity_and_greedy_text(real_base_dir):
    """Held-out perplexity within 1% of bf16; the same greedy text over 32 tokens."""
    from tunesmith.tokens import pack, tokenize_rows
    from tunesmith.train import TrainConfig, evaluate

    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
            "in want of a wife. However little known the feelings or views of such a man may be on his first "
            "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that "
            "he is considered the rightful property of some one or other of their daughters.")
    bf16 = load("smollm2-135m")
    int8 = load("smollm2-135m", quant="int8")
    blocks = pack(*tokenize_rows([{"text": text}], bf16.tokenizer), 128, bf16.tokenizer.eos_token_id)
    cfg = TrainConfig(base="smollm2-135m", block_size=128)
    ppl = [math.exp(evaluate(m.model, blocks, cfg, m.device, m.model.dtype)["loss"]) for m in (bf16, int8)]
    assert abs(ppl[1] / ppl[0] - 1) < 0.01, ppl
    prompt = "The capital of France is Paris. The capital of Germany is"
    a = bf16.generate(prompt, max_tokens=32, temperature=0)[0]
    b = int8.generate(prompt, max_tokens=32, temperature=0)[0]
    assert a.completion_tokens == 32 or a.finish_reason == "stop"
    assert b.text == a.text


def test_server_model_cache_loads_with_the_servers_quant(tiny_model_dir):
    from tunesmith.server.models_cache import ModelCache

    cache = ModelCache(4 * 2**30, quant="int8")
    model = cache.get("tiny-llama")
    assert model.quant == "int8"
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.modules())
    assert ModelCache(4 * 2**30).get("tiny-llama").quant == "none"


def test_a_model_in_training_keeps_transformers_forward(tiny_model_dir):
    """Training's samples wrap the model being trained (LoRA not merged, weights that change):
    the fused decoder, which copies weights into fused matrices, must not take it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.generate import Model
    from tunesmith.models import load_tokenizer, resolve

    net = AutoModelForCausalLM.from_pretrained(str(resolve("tiny-llama")))
    tok = load_tokenizer("tiny-llama")
    assert Model(net, tok, name="full").decoder is None  # trainable weights
    lora = get_peft_model(net, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert Model(lora, tok, name="lora").decoder is None
    assert not supports(lora.get_base_model())  # LoRA layers in place of nn.Linear


def test_one_row_product_has_the_bits_of_that_row_in_a_batch():
    """A one-row step takes the matrix-vector path; with oneDNN on (how generation runs bf16
    steps of one row, and how the server's batch runs) it must give each row the bits that
    row gets in a batched product, or a request would write other text alone than beside others."""
    import torch

    from tunesmith.decoder import _Linear

    torch.manual_seed(0)
    assert torch.backends.mkldnn.enabled
    for out_features, in_features in ((960, 576), (3072, 576), (576, 1536), (4096, 576)):
        layer = _Linear(torch.randn(out_features, in_features, dtype=torch.bfloat16))
        layer.pack()
        rows = torch.randn(300, 1, in_features, dtype=torch.bfloat16)
        alone = torch.cat([layer(rows[r : r + 1]) for r in range(len(rows))])
        # a step's batch, a prompt, prompts prefilled together (more than one block of rows)
        for count in (2, 4, 16, 40, 129, 300):
            assert torch.equal(layer(rows[:count]), alone[:count]), count
        assert torch.equal(layer(rows[:40].reshape(2, 20, in_features)), alone[:40].reshape(2, 20, -1))
    assert layer.packed is not None  # the rows took oneDNN's reordered weights


def _prefill_matches_forward(m, prompts, exact: bool = True):
    """Prompts prefilled together, into rows of one cache in another order, give each the logits
    and cache rows that ``forward`` gives it alone: bit for bit in bf16 (oneDNN's products keep
    rows apart), within float rounding in fp32 (MKL's products do not)."""
    same = torch.equal if exact else lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    dec = m.decoder
    dec.pack()
    dec.use_kernel = False  # a one-token prompt alone would take the C++ step, which sums in its own order
    ids = [m._encode(p)[0] for p in prompts]
    rows = list(range(len(ids)))[::-1]
    with torch.inference_mode():
        shared = dec.new_cache(len(ids) + 1, 256)
        together = dec.prefill(ids, shared, rows)
        for i, prompt_ids in enumerate(ids):
            cache = dec.new_cache(1, 256)
            alone = dec.forward(prompt_ids[None], cache)
            t = len(prompt_ids)
            assert same(together[i], alone[0]), prompts[i]
            assert same(shared.k[:, rows[i], :, :t], cache.k[:, 0, :, :t])
            assert same(shared.v[:, rows[i], :, :t], cache.v[:, 0, :, :t])
    return together


PROMPTS = [PROMPT, "Call me Ishmael.", "A", "The harbour at night " * 12, "Some years ago, never mind how long"]


def test_prompts_prefilled_together_hold_the_bits_of_each_alone(tiny_model_dir):
    for dtype in ("bfloat16", "float32"):
        m = load("tiny-llama", dtype=dtype)
        logits = _prefill_matches_forward(m, PROMPTS, exact=dtype == "bfloat16")
        assert logits.shape == (len(PROMPTS), m.model.config.vocab_size)
        # and they are the model's own logits (transformers' forward, each prompt alone)
        with torch.inference_mode():
            ref = _hf_logits(m.model, m._encode(PROMPTS[1]), [])[0][0]
        tol = 1e-4 if dtype == "float32" else 0.05
        torch.testing.assert_close(logits[1], ref, rtol=tol, atol=tol)


@pytest.mark.real_model
def test_real_model_prompts_prefilled_together_hold_the_bits_of_each_alone(real_base_dir):
    _prefill_matches_forward(load("smollm2-135m"), PROMPTS + ["To Sherlock Holmes she is always the woman. " * 4])


def _kernel_or_skip(dec):
    from tunesmith import decode_kernel

    step = dec.kernel()
    if step is None:
        pytest.skip(f"the C++ decoding step is not available here: {decode_kernel.failure()}")
    return step


@pytest.mark.parametrize("quant", [None, "int8"])
def test_kernel_step_matches_transformers_and_the_python_step(tiny_model_dir, quant):
    """The C++ one-row step (decode_kernel.cpp) against transformers' own forward and against the
    Python step it replaces, cache included, in fp32: the same computation, within float rounding
    (its attention sums in another order than PyTorch's attention kernel)."""
    m = load("tiny-llama", dtype="float32", quant=quant)
    dec = m.decoder
    _kernel_or_skip(dec)
    ids = m._encode(PROMPT)
    steps = [torch.tensor([5]), torch.tensor([17]), torch.tensor([301]), torch.tensor([2])]
    with torch.inference_mode():
        kernel, python = dec.new_cache(1, 64), dec.new_cache(1, 64)
        dec.forward(ids, kernel)
        dec.forward(ids, python)
        got, want = [], []
        for token in steps:
            got.append(dec.forward(token[:, None], kernel))
            dec.use_kernel = False
            want.append(dec.forward(token[:, None], python))
            dec.use_kernel = True
        assert kernel.filled == python.filled == ids.shape[1] + len(steps)
        torch.testing.assert_close(kernel.k, python.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kernel.v, python.v, rtol=1e-5, atol=1e-5)
        assert kernel.k[:, 0, :, ids.shape[1] + len(steps) - 1].abs().sum() > 0  # the last key was written
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        if quant is None:
            ref = _hf_logits(m.model, ids, steps)[1:]
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _kernel_against_python(m, prompt: str, steps: int):
    """Teacher-forced along the Python step's greedy tokens: per step, the KL divergence of the
    C++ step's next-token distribution from the Python step's, and whether their top tokens agree."""
    dec = m.decoder
    ids = m._encode(prompt)
    kls, agree = [], 0
    with torch.inference_mode():
        kernel, python = dec.new_cache(1, ids.shape[1] + steps), dec.new_cache(1, ids.shape[1] + steps)
        dec.use_kernel = False
        want = dec.forward(ids, python)
        dec.use_kernel = True
        dec.forward(ids, kernel)
        for _ in range(steps):
            token = torch.tensor([[int(want.argmax())]])
            got = dec.forward(token, kernel)
            dec.use_kernel = False
            want = dec.forward(token, python)
            dec.use_kernel = True
            p, q = want.log_softmax(-1), got.log_softmax(-1)
            kls.append(float((p.exp() * (p - q)).sum()))
            agree += int(got.argmax()) == int(want.argmax())
    return kls, agree


@pytest.mark.parametrize("quant", [None, "int8"])
def test_kernel_step_in_bf16_keeps_the_python_steps_distribution(tiny_model_dir, quant):
    m = load("tiny-llama", dtype="bfloat16", quant=quant)
    _kernel_or_skip(m.decoder)
    kls, _ = _kernel_against_python(m, PROMPT, 24)
    assert max(kls) < 1e-2 and sum(kls) / len(kls) < 2e-3


def test_kernel_turned_off_keeps_the_python_step(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("TUNESMITH_DECODE_KERNEL", "off")
    m = load("tiny-llama", dtype="float32")
    assert m.decoder.kernel() is None
    assert m.generate(PROMPT, max_tokens=8, temperature=0)[0].completion_tokens == 8


@pytest.mark.real_model
def test_real_model_kernel_step_keeps_the_python_steps_distribution(real_base_dir):
    """bf16, the bundled model, 100 teacher-forced steps: the C++ step rounds differently from the
    Python step (its products and attention sum in other orders); measured: mean KL 6.5e-4, at
    most 4.0e-3, the top token the same in 98 of 100 steps (int8 weights: 7.0e-4, 4.9e-3, 100)."""
    m = load("smollm2-135m")
    _kernel_or_skip(m.decoder)
    prompt = "To Sherlock Holmes she is always the woman. I have seldom heard him mention her under any other name."
    kls, agree = _kernel_against_python(m, prompt, 100)
    assert sum(kls) / len(kls) < 3e-3 and max(kls) < 3e-2
    assert agree >= 95


@pytest.mark.parametrize("n,k", [(7, 100), (960, 576), (33, 1536)])
def test_kernel_products_against_a_float64_reference(n, k):
    """The step's own matrix-vector products (AVX-512 where the CPU has it), bf16 and int8 weights,
    rows and lengths that are not multiples of the vector width, three vectors at once: within
    one bf16 rounding of the exact product, and each vector's result the same bits as alone and
    at 1 and 2 threads (each vector and row is summed by one thread in one order)."""
    from tunesmith import decode_kernel

    module = decode_kernel.load(quiet=True)
    if module is None:
        pytest.skip(f"the C++ decoding step is not available here: {decode_kernel.failure()}")
    g = torch.Generator().manual_seed(n * k)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(3, k, generator=g).to(torch.bfloat16)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    cases = [(w, torch.empty(0), x.double() @ w.double().T),
             (q, scale, (x.double() @ q.double().T) * scale.double())]
    threads = torch.get_num_threads()
    for (weight, s, exact), tiles in itertools.product(cases, (True, False)):  # AMX tiles (where the CPU has them) or not
        got = module.product(weight, s, x, tiles)
        assert got.dtype == torch.bfloat16 and got.shape == (3, n)
        # one rounding to bf16 (half an ulp, 2^-9 relative) plus the fp32 sums' error
        bound = exact.abs() * 2.0**-8 + 1e-6 * (x.double().abs() @ weight.double().abs().T)
        assert ((got.double() - exact).abs() <= bound).all()
        for b in range(3):
            assert torch.equal(module.product(weight, s, x[b : b + 1], tiles)[0], got[b])
        try:
            torch.set_num_threads(1)
            alone = module.product(weight, s, x, tiles)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(alone, got)


@pytest.mark.parametrize("dtype,quant,tiles", [("bfloat16", None, True), ("bfloat16", None, False),
                                               ("bfloat16", "int8", True), ("float32", None, True)])
def test_kernel_rows_of_a_batch_hold_the_bits_of_each_alone(tiny_model_dir, dtype, quant, tiles):
    """The C++ step over several rows at their own positions (the server's batched step): each
    row's logits and cache entries are bit for bit what it gets as the only row, on AMX tiles
    (where the CPU has them) and on the AVX-512 loop (CPUs without them)."""
    m = load("tiny-llama", dtype=dtype, quant=quant)
    dec = m.decoder
    _kernel_or_skip(dec)
    from tunesmith import decode_kernel

    module = decode_kernel.load(quiet=True)
    module.set_tiles(tiles)
    try:
        _rows_hold_their_bits(m, dec)
    finally:
        module.set_tiles(True)


def _rows_hold_their_bits(m, dec):
    prompts = [m._encode(p)[0] for p in PROMPTS[:3]]
    with torch.inference_mode():
        shared = dec.new_cache(4, 128)
        alone = [dec.new_cache(1, 128) for _ in prompts]
        for row, ids in enumerate(prompts):
            dec.prefill([ids], shared, [row])
            dec.prefill([ids], alone[row], [0])
        positions = [len(ids) for ids in prompts]
        tokens = [7, 11, 301]
        for _ in range(3):
            together = dec.step_rows(tokens, positions, shared.k, shared.v)
            for row in range(len(prompts)):
                one = dec.step_rows([tokens[row]], [positions[row]], alone[row].k, alone[row].v)
                assert torch.equal(together[row], one[0])
                end = positions[row] + 1
                assert torch.equal(shared.k[:, row, :, :end], alone[row].k[:, 0, :, :end])
                assert torch.equal(shared.v[:, row, :, :end], alone[row].v[:, 0, :, :end])
            tokens = [int(t) for t in together.argmax(-1)]
            positions = [p + 1 for p in positions]
        # and the rows are the model's step: close to the Python step over the same cache
        dec.use_kernel = False
        python = dec.new_cache(1, 128)
        dec.prefill([prompts[0]], python, [0])
        want = dec.step_rows([7], [len(prompts[0])], python.k, python.v)
        dec.use_kernel = True
        fresh = dec.new_cache(1, 128)
        dec.prefill([prompts[0]], fresh, [0])
        got = dec.step_rows([7], [len(prompts[0])], fresh.k, fresh.v)
        p, q = want.log_softmax(-1), got.log_softmax(-1)
        assert float((p.exp() * (p - q)).sum()) < 1e-2


def test_kernel_products_off_the_main_thread_hold_their_bits_as_threads_grow():
    """Off the main thread the products run on the extension's own helper threads (the server's
    loop): the same bits as on the main thread, also after the thread count grows and new helpers
    join (a helper must not pick up an old job)."""
    import threading

    from tunesmith import decode_kernel

    module = decode_kernel.load(quiet=True)
    if module is None:
        pytest.skip(f"the C++ decoding step is not available here: {decode_kernel.failure()}")
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(3072, 576, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(4, 576, generator=g).to(torch.bfloat16)
    want = module.product(w, torch.empty(0), x)
    got, errors = [], []

    def work():
        try:
            for threads in (1, 2, 3, 2):
                torch.set_num_threads(threads)
                got.extend(module.product(w, torch.empty(0), x, tiles) for tiles in (True, False))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    before = torch.get_num_threads()
    try:
        worker = threading.Thread(target=work)
        worker.start()
        worker.join(60)
    finally:
        torch.set_num_threads(before)
    assert not worker.is_alive() and not errors
    assert len(got) == 8
    assert all(torch.equal(a, want) for a in got[0::2])  # tiles, as on the main thread
    assert all(torch.equal(a, got[1]) for a in got[1::2])  # the AVX-512 loop, at every thread count


def _tiles_or_skip(dec):
    _kernel_or_skip(dec)
    from tunesmith import decode_kernel

    if not decode_kernel.load(quiet=True).tiles():
        pytest.skip("this CPU has no AMX tiles: prompts are prefilled by the Python pass")


@pytest.mark.parametrize("name", ["tiny-llama", pytest.param("smollm2-135m", marks=pytest.mark.real_model)])
def test_kernel_prefill_holds_each_prompts_bits_and_the_python_prefills_distribution(tiny_model_dir, name, request):
    """bf16 prompts through the C++ step (a token per row, each into its prompt's cache row):
    prompts prefilled together get, bit for bit, the logits and cache rows each gets alone, at 1
    and 3 threads; and they are the model's prompts: the next-token distribution is close to
    the Python prefill's (the bundled model: KL at most 4.6e-3 measured, the same top token)."""
    if name == "smollm2-135m":
        request.getfixturevalue("real_base_dir")
    m = load(name, dtype="bfloat16")
    dec = m.decoder
    _tiles_or_skip(dec)
    prompts = [m._encode(p)[0] for p in PROMPTS]
    rows = list(range(len(prompts)))[::-1]
    threads = torch.get_num_threads()
    with torch.inference_mode():
        for n in (1, 3):
            torch.set_num_threads(n)
            try:
                shared = dec.new_cache(len(prompts) + 1, 256)
                together = dec.prefill(prompts, shared, rows)
                for i, ids in enumerate(prompts):
                    alone = dec.new_cache(1, 256)
                    one = dec.prefill([ids], alone, [0])
                    assert torch.equal(together[i], one[0]), (n, i)
                    t = len(ids)
                    assert torch.equal(shared.k[:, rows[i], :, :t], alone.k[:, 0, :, :t])
                    assert torch.equal(shared.v[:, rows[i], :, :t], alone.v[:, 0, :, :t])
            finally:
                torch.set_num_threads(threads)
        # long prompts go through in several calls (bounded attention scratch): the same bits
        import tunesmith.decoder as decoder_module

        small = dec.new_cache(len(prompts) + 1, 256)
        bound = decoder_module.PROMPT_ATTENDED
        decoder_module.PROMPT_ATTENDED = 64
        try:
            chunked = dec.prefill(prompts, small, rows)
        finally:
            decoder_module.PROMPT_ATTENDED = bound
        assert torch.equal(chunked, together)
        assert torch.equal(small.k, shared.k) and torch.equal(small.v, shared.v)
        # long prompts take the Python pass, alone as beside short ones through the C++ step
        cut = decoder_module.KERNEL_PROMPT_TOKENS
        decoder_module.KERNEL_PROMPT_TOKENS = 8
        dec.pack()  # as the server's loop does: the Python pass keeps rows apart on the reordered weights
        try:
            mixed = dec.prefill(prompts, dec.new_cache(len(prompts) + 1, 256), rows)
            for i, ids in enumerate(prompts):
                assert torch.equal(mixed[i], dec.prefill([ids], dec.new_cache(1, 256), [0])[0]), i
                if len(ids) > 8:
                    dec.use_kernel = False
                    assert torch.equal(mixed[i], dec.prefill([ids], dec.new_cache(1, 256), [0])[0]), i
                    dec.use_kernel = True
        finally:
            decoder_module.KERNEL_PROMPT_TOKENS = cut
            dec.use_kernel = True
        assert any(len(ids) > 8 for ids in prompts) and any(len(ids) <= 8 for ids in prompts)
        dec.use_kernel = False
        python = dec.prefill(prompts, dec.new_cache(len(prompts) + 1, 256), rows)
        dec.use_kernel = True
    p, q = python.log_softmax(-1), together.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert float(kl.max()) < 2e-2, kl
    if name == "smollm2-135m":
        assert torch.equal(python.argmax(-1), together.argmax(-1))
