"""The chunked loss must equal the plain one, value and gradients."""

import torch
import torch.nn.functional as F

from tunesmith import loss as loss_mod
from tunesmith.loss import linear_cross_entropy


def _reference(hidden, weight, targets):
    logits = hidden @ weight.T
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")


def test_matches_cross_entropy_value_and_gradients(monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK_ROWS", 7)  # several chunks, one ragged
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    targets[[2, 11, 29]] = -100

    got, correct = linear_cross_entropy(hidden, weight, targets, torch.float64)
    (got * 0.5).backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    want = _reference(hidden, weight, targets)
    (want * 0.5).backward()
    assert torch.allclose(got, want.to(got.dtype), rtol=1e-6)
    assert torch.allclose(g_hidden, hidden.grad, rtol=1e-6, atol=1e-9)
    assert torch.allclose(g_weight, weight.grad.to(g_weight.dtype), rtol=1e-5, atol=1e-7)
    argmax = (hidden @ weight.T).argmax(-1)
    assert int(correct) == int(((argmax == targets) & (targets >= 0)).sum())


def test_frozen_weight_gets_no_gradient():
    hidden = torch.randn(8, 4, requires_grad=True)
    weight = torch.randn(10, 4)  # frozen, like the tied embedding under LoRA
    total, _ = linear_cross_entropy(hidden, weight, torch.randint(0, 10, (8,)))
    total.backward()
    assert hidden.grad is not None and weight.grad is None


def test_bf16_close_to_fp32():
    torch.manual_seed(1)
    hidden = torch.randn(64, 32)
    weight = torch.randn(100, 32) * 0.1
    targets = torch.randint(0, 100, (64,))
    fp32, _ = linear_cross_entropy(hidden, weight, targets, torch.float32)
    bf16, _ = linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), targets, torch.bfloat16)
    assert abs(float(fp32) - float(bf16)) / float(fp32) < 0.02
