"""Next-token loss computed chunk by chunk, without materialising the full logits.

A batch of 8 x 512 tokens over SmolLM2's 49,152-token vocabulary gives 201M logits:
1.6 GB in fp32, twice that with their gradient. transformers computes them whole; this
module computes the gradient of each chunk of rows during the forward pass and keeps only
that (the "fused linear cross-entropy" trick), so peak memory stays flat in the vocabulary.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype):
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)
        loss_sum = torch.zeros((), dtype=torch.promote_types(compute_dtype, torch.float32), device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            h = hidden[start : start + CHUNK_ROWS].to(compute_dtype)
            t = targets[start : start + CHUNK_ROWS]
            valid = t >= 0
            safe_t = t.clamp(min=0)
            logits = h @ w.T
            if logits.dtype in (torch.bfloat16, torch.float16):
                logits = logits.float()  # softmax and log-sum-exp in fp32
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
            loss_sum += ((lse - target_logit) * valid).sum()
            correct += ((logits.argmax(dim=-1) == t) & valid).sum()
            if need_h or need_w:
                # d(sum of losses)/d(logits) = softmax - onehot, on rows that count.
                grad = torch.exp(logits.sub_(lse[:, None]))
                grad[torch.arange(len(t), device=t.device), safe_t] -= 1.0
                grad *= valid[:, None]
                grad = grad.to(compute_dtype)
                if need_h:
                    grad_h[start : start + CHUNK_ROWS] = (grad @ w).to(hidden.dtype)
                if need_w:
                    grad_w += (grad.T @ h).to(acc)
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_h, grad_w = ctx.saved_tensors
        out_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        out_w = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return out_h, out_w, None, None


def linear_cross_entropy(hidden, weight, targets, compute_dtype=None):
    """Sum of next-token losses and count of correct argmax predictions.

    ``hidden`` (N, H) final hidden states, ``weight`` (V, H) the output embedding,
    ``targets`` (N,) token ids with -100 for positions that do not count.
    """
    dtype = compute_dtype or hidden.dtype
    if dtype == torch.float32 and hidden.dtype != torch.float32:
        dtype = hidden.dtype
    return _LinearCrossEntropy.apply(hidden, weight, targets, dtype)
