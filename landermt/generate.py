"""Greedy batched translation with per-row pair ids: one line in, one line out.

Rows are left-padded so every row's next token is at the last position. Generation of a row stops
at EOS or at its first newline (translations are single lines; a base model would otherwise go on
with another prompt); the batch stops when every row has stopped or at `max_new_tokens`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from landermt.routing import route


@functools.lru_cache(maxsize=8)
def _stop_ids(tokenizer) -> tuple[int, ...]:
    newline = [i for token, i in tokenizer.get_vocab().items() if "\n" in tokenizer.convert_tokens_to_string([token])]
    return tuple(sorted({tokenizer.eos_token_id, *newline}))


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and every token whose text contains a newline (computed once per tokenizer)."""
    return list(_stop_ids(tokenizer))


def first_line(text: str) -> str:
    """A translation is one line: the decoded text up to its first newline, stripped."""
    return text.strip().split("\n", 1)[0].strip()


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int  # up to and including the token that stopped the row


def decoded(tokenizer, prompt_tokens: int, new_ids: list[int]) -> Generation:
    """A row's result from the ids it generated (up to and including its stop token): their first line."""
    return Generation(first_line(tokenizer.decode(new_ids, skip_special_tokens=True)), prompt_tokens, len(new_ids))


class FirstToken(LogitsProcessor):
    """Calls `callback` once, when the logits of the first new token are ready (time to first token)."""

    def __init__(self, callback: Callable[[], None]):
        self.callback: Callable[[], None] | None = callback

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.callback is not None:
            self.callback()
            self.callback = None
        return scores


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], pair_ids: list[int] | None, max_new_tokens: int,
           on_first_token: Callable[[], None] | None = None) -> list[Generation]:
    """Translate `prompts` in one batch; row r runs with pair id `pair_ids[r]` (None: base model).
    `on_first_token` is called once, as soon as the batch's first new token is computed."""
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    ids = None if pair_ids is None else torch.tensor(pair_ids)
    stops = stop_token_ids(tokenizer)
    with route(ids):
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                pad_token_id=tokenizer.pad_token_id,
                                logits_processor=LogitsProcessorList([FirstToken(on_first_token)] if on_first_token
                                                                     else []))
    generated = output[:, encoded["input_ids"].shape[1]:]
    stopped = torch.isin(generated, torch.tensor(stops))
    new_tokens = torch.where(stopped.any(dim=1), stopped.int().argmax(dim=1) + 1, generated.shape[1])
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [Generation(first_line(text), int(n_prompt), int(n_new))
            for text, n_prompt, n_new in zip(texts, encoded["attention_mask"].sum(dim=1), new_tokens, strict=True)]
