"""The next-token loss on labelled positions only: one function for training, dev loss, scoring and
perplexity.

A causal LM's forward applies the LM head at every position; Gemma 3's head (262,144 entries) costs
more per token than all 18 layers together, and the float32 logits of a batch of 8 × 160 tokens
take 1.3 GB. The loss only needs the positions whose *next* token is labelled (labels != IGNORE;
the prompt is never scored). So: run the backbone, gather those positions' final hidden states,
and apply the head (and the family's final logit soft-capping, as its forward does) to them alone,
a chunk at a time. Under autograd the chunks go through `LinearCrossEntropy`, which computes each
chunk's gradient with respect to the hidden states (and the head's weight, when it trains) in the
same pass as its loss, so float32 logits never exist for more than one chunk and are never
recomputed: two head matmuls per target position, as plain autograd would need, in a fraction of
its memory.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from landermt.models import native_cpu_bf16
from landermt.prompts import IGNORE

CHUNK_TOKENS = 256  # target positions per head chunk: 256 × 262,144 float32 logits = 256 MiB


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside a PEFT wrapper (whose adapter layers stay in place inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _logits(weight: torch.Tensor, softcap: float | None, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits, tanh of the soft-capping or None) as the causal LM's forward computes them."""
    z = F.linear(hidden, weight)
    if softcap is None:
        return z.float(), None
    t = torch.tanh(z / softcap)
    return (t * softcap).float(), t


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `targets` [n] from hidden states [n, d] through a bias-free head `weight` [V, d]
    (with tanh soft-capping), chunk by chunk; the backward pass only scales gradients made in the forward:
    d/dlogits = softmax − onehot, times 1 − tanh² under soft-capping."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                chunk_tokens: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        # The gradient matmuls reduce over the vocabulary (262,144 for Gemma). In emulated bf16 (CPUs without
        # AVX-512 BF16 / AMX) that GEMM ran 70x slower than in float32 (103 s against 1.4 s for 60 rows): there,
        # they run in float32.
        emulated = weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and not native_cpu_bf16()
        grad_dtype = torch.float32 if emulated else weight.dtype
        head = weight.to(grad_dtype)
        for start in range(0, len(targets), chunk_tokens):
            h, y = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
            logits, t = _logits(weight, softcap, h)
            rows = torch.arange(len(y), device=y.device)
            total += (torch.logsumexp(logits, dim=-1) - logits[rows, y]).sum()
            grad = torch.softmax(logits, dim=-1)
            grad[rows, y] -= 1
            if t is not None:
                grad *= 1 - t.float() ** 2
            grad = grad.to(grad_dtype)
            grad_hidden[start : start + chunk_tokens] = grad @ head
            if grad_weight is not None:
                grad_weight += (grad.T @ h.to(grad_dtype)).to(weight.dtype)
        ctx.save_for_backward(grad_hidden, *([] if grad_weight is None else [grad_weight]))
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, *grad_weight = ctx.saved_tensors
        scale = grad_total.to(grad_hidden.dtype)
        return grad_hidden * scale, grad_weight[0] * scale if grad_weight else None, None, None, None


def target_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                reduction: Literal["mean", "sum"] = "mean", chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Next-token cross-entropy over the labelled positions of `labels` (not shifted: labels[t] is the token at t),
    averaged or summed. Equals the loss of the full logits and its gradients (tests, every family); a batch with no
    targets has loss 0 and gradient exactly 0."""
    lm = causal_lm(model)
    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    scored = targets != IGNORE
    hidden, targets = hidden[:, :-1][scored], targets[scored]
    head, softcap = lm.get_output_embeddings(), getattr(lm.config, "final_logit_softcapping", None)
    if head.bias is not None:
        raise ValueError("the LM head of a supported family has no bias")
    if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
        total = LinearCrossEntropy.apply(hidden, head.weight, targets, softcap, chunk_tokens)
    else:
        total = sum((_cross_entropy(head.weight, softcap, hidden[i : i + chunk_tokens], targets[i : i + chunk_tokens])
                     for i in range(0, len(targets), chunk_tokens)), hidden.new_zeros((), dtype=torch.float32))
    return total / max(len(targets), 1) if reduction == "mean" else total


def _cross_entropy(weight: torch.Tensor, softcap: float | None, hidden: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_logits(weight, softcap, hidden)[0], targets, reduction="sum")
