"""Prefill packed into the decode step: one forward for the running rows' next tokens and new rows' prompts.

Without it, admitting rows costs a forward of its own (their prompts) before the decode step (every running row's
next token): two passes over the weights. Packed, the step's tokens are laid out as one sequence [1, N], the
running rows' next token each and then every admitted prompt, nothing padded, so the embeddings, projections,
FFNs, routing (per-token pair ids) and LM head (each row's last position only) see real tokens only, once.

Attention is the one part that needs each row's own past. The forward runs under a registered attention
implementation (`packed_attention`) that cuts the packed queries, keys and values into the step's parts again:
  * the running rows: their B tokens become a batch of B one-token rows, appended to the running batch's padded
    cache, attending with the mask the model itself builds for a decode step;
  * each admitted prompt: its own cache (a reused prompt prefix, or empty), attending causally;
and hands each part to the model's own attention function with its own mask, so each part computes what the two
separate forwards computed. The masks are built before the forward by transformers' own mask functions.

Only families whose attention goes through transformers' AttentionInterface (Gemma, Llama, Qwen, GPT-2) can pack;
BLOOM (ALiBi from the padding mask) keeps separate prefill (`can_pack`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

NAME = "landermt_packed"
MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


@dataclass
class Part:
    """A slice [start, end) of the packed tokens and the cache it attends over. `rows`: the running rows (one
    token each, a batch row each); otherwise one prompt. `masks`: the attention mask per layer kind."""

    start: int
    end: int
    cache: DynamicCache
    masks: dict[str, torch.Tensor | None]
    rows: bool = False


class PackedStep:
    """The parts of one packed forward. Passed to the model as its `past_key_values`: attention layers hand it
    their new keys and values, and `packed_attention` stores them in each part's own cache."""

    def __init__(self, parts: list[Part], kinds: list[str], attention):
        self.parts, self.kinds, self.attention = parts, kinds, attention

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        return keys, values


_STEP: ContextVar[PackedStep | None] = ContextVar("landermt_packed_step", default=None)


def packed_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs):
    """[1, heads, N, dim] packed queries, keys, values → [1, N, heads, dim], part by part (module docstring)."""
    step = _STEP.get()
    kind = step.kinds[module.layer_idx]
    outputs = []
    for part in step.parts:
        q, k, v = (x[:, :, part.start : part.end] for x in (query, key, value))
        if part.rows:  # [1, heads, B, dim] → [B, heads, 1, dim]
            q, k, v = (x.transpose(0, 2) for x in (q, k, v))
        k, v = part.cache.update(k, v, module.layer_idx)
        out, _ = step.attention(module, q, k, v, part.masks[kind], **kwargs)  # [batch, tokens, heads, dim]
        outputs.append(out.transpose(0, 1) if part.rows else out)
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(NAME, packed_attention)


def can_pack(model) -> bool:
    """Whether the model's attention runs through transformers' AttentionInterface, with layer kinds it names."""
    config = model.config
    module = sys.modules[type(model).__module__]
    sliding_unnamed = getattr(config, "sliding_window", None) and not getattr(config, "layer_types", None)
    return hasattr(module, "ALL_ATTENTION_FUNCTIONS") and not sliding_unnamed


def layer_kinds(config) -> list[str]:
    return list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)


def masks(model, cache: DynamicCache, tokens: int, batch: int, attention_mask: torch.Tensor | None,
          positions: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The masks the model's own forward would build for `tokens` new tokens per row over `cache`, per layer kind."""
    embeds = torch.empty(batch, tokens, model.config.hidden_size, dtype=model.dtype)
    return {kind: MASK_FUNCTIONS[kind](config=model.config, inputs_embeds=embeds, attention_mask=attention_mask,
                                       past_key_values=cache, position_ids=positions)
            for kind in set(layer_kinds(model.config))}


@contextmanager
def packed(model, parts: list[Part]) -> Iterator[PackedStep]:
    """The model's attention runs `packed_attention` over `parts` inside; the step is the forward's cache."""
    config = model.config
    original = config._attn_implementation
    module = sys.modules[type(model).__module__]
    attention = AttentionInterface().get_interface(original, getattr(module, "eager_attention_forward", None))
    step = PackedStep(parts, layer_kinds(config), attention)
    token = _STEP.set(step)
    config._attn_implementation = NAME
    try:
        yield step
    finally:
        config._attn_implementation = original
        _STEP.reset(token)
