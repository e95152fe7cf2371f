"""The next-token loss on labelled positions only: one function for training, dev loss, scoring and
perplexity.

A causal LM's forward applies the LM head at every position; Gemma 3's head (262,144 entries) costs
more per token than all 18 layers together, and the float32 logits of a batch of 8 × 160 tokens
take 1.3 GB. The loss only needs the positions whose *next* token is labelled (labels != IGNORE;
the prompt is never scored). So: run the backbone, gather those positions' final hidden states,
and apply the head (and the family's final logit soft-capping, as its forward does) to them alone,
a chunk at a time. Under autograd each chunk is checkpointed: its logits are recomputed in the
backward pass instead of being kept, so float32 logits never exist for more than one chunk.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from landermt.prompts import IGNORE

CHUNK_TOKENS = 256  # target positions per head chunk: 256 × 262,144 float32 logits = 256 MiB


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside a PEFT wrapper (whose adapter layers stay in place inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _head_loss(head: nn.Module, softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `targets` [n] from final hidden states [n, d]: the causal LM's logits, computed as
    its forward computes them (head, then tanh soft-capping if the family has it), in float32."""
    logits = head(hidden)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def target_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                reduction: Literal["mean", "sum"] = "mean", chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Next-token cross-entropy over the labelled positions of `labels` (not shifted: labels[t] is the token at t),
    averaged or summed. Equals the loss of the full logits (tests, every family)."""
    lm = causal_lm(model)
    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    scored = targets != IGNORE
    hidden, targets = hidden[:, :-1][scored], targets[scored]
    head, softcap = lm.get_output_embeddings(), getattr(lm.config, "final_logit_softcapping", None)
    total = hidden.sum().float() * 0  # no targets: a loss of 0 whose gradient is exactly 0 (nothing to learn)
    for start in range(0, len(targets), chunk_tokens):
        chunk = (hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens])
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(_head_loss, head, softcap, *chunk, use_reentrant=False)
        else:
            total = total + _head_loss(head, softcap, *chunk)
    return total / max(len(targets), 1) if reduction == "mean" else total
