"""Greedy batched translation with per-row pair ids: one line in, one line out.

Rows are left-padded so every row's next token is at the last position. Generation of a row stops
at EOS or at its first newline (translations are single lines; a base model would otherwise go on
with another prompt); the batch stops when every row has stopped or at `max_new_tokens`.
"""

from __future__ import annotations

import functools

import torch

from landermt.routing import route


@functools.lru_cache(maxsize=8)
def _stop_ids(tokenizer) -> tuple[int, ...]:
    newline = [i for token, i in tokenizer.get_vocab().items() if "\n" in tokenizer.convert_tokens_to_string([token])]
    return tuple(sorted({tokenizer.eos_token_id, *newline}))


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and every token whose text contains a newline (computed once per tokenizer)."""
    return list(_stop_ids(tokenizer))


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], pair_ids: list[int] | None, max_new_tokens: int) -> list[str]:
    """Translate `prompts` in one batch; row r runs with pair id `pair_ids[r]` (None: base model)."""
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    ids = None if pair_ids is None else torch.tensor(pair_ids)
    with route(ids):
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return [text.strip().split("\n", 1)[0].strip() for text in texts]
