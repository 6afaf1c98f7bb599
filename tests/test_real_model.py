"""The real bundled SmolLM2-135M-Instruct: loads from the cache, learns, writes English."""

from __future__ import annotations

import numpy as np
import pytest

from tunesmith import load
from tunesmith.tokens import pack, tokenize_rows
from tunesmith.train import TrainConfig, build_model, make_optimizer, train_step

pytestmark = pytest.mark.real_model


def test_real_model_learns_a_repeated_batch(real_base_dir):
    cfg = TrainConfig(base="smollm2-135m", block_size=128, batch_size=2, lr=1e-3)
    model, tok, device, compute = build_model(cfg)
    text = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness. " * 8
    blocks = pack(*tokenize_rows([{"text": text}], tok), cfg.block_size, tok.pad_token_id)
    opt, sched = make_optimizer(model, cfg, 100)
    idx = np.arange(min(2, len(blocks)))
    first = train_step(model, opt, sched, blocks, idx, cfg, device, compute)["loss"]
    second = train_step(model, opt, sched, blocks, idx, cfg, device, compute)["loss"]
    third = train_step(model, opt, sched, blocks, idx, cfg, device, compute)["loss"]
    assert 0 < third < first, (first, second, third)


def test_real_model_writes_repeatable_english(real_base_dir):
    model = load("smollm2-135m")
    prompt = "The capital of France is"
    a = model.generate(prompt, max_tokens=16, seed=11, temperature=0.7)[0].text
    b = model.generate(prompt, max_tokens=16, seed=11, temperature=0.7)[0].text
    assert a == b
    greedy = model.generate(prompt, max_tokens=8, temperature=0)[0].text
    assert "Paris" in greedy
    chat = model.chat_prompt([{"role": "user", "content": "Hi"}])
    assert "<|im_start|>user" in chat and chat.rstrip().endswith("<|im_start|>assistant")
