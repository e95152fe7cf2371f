"""Continuous batching for greedy translation: rows join and leave one running batch between steps.

`greedy` (generate.py) runs a fixed batch until its longest row ends. Here a `RunningBatch` keeps
the KV cache of every unfinished row; `admit()` prefills newly arrived rows (one forward over just
them) and merges their cache into the running one; `decode()` runs one step for all rows with
per-row pair ids (landermt.routing). A row leaves as soon as it stops (EOS, a newline, or its own
`max_new_tokens`), so short translations never wait for long ones and new requests never wait for
a whole batch to finish.

Merging: rows are left-padded, so two caches of lengths T1 < T2 merge by left-padding the shorter
one with masked zeros to T2. A sliding-window cache layer (Gemma 3) keeps only its last W − 1
positions, after which padding no longer lines up; rows are therefore admitted only while the
merged length stays below W (`can_admit`), and otherwise wait. Columns that are padding in every row
are dropped as rows leave, so a busy batch stays as short as its longest live row.
Outputs equal `greedy`'s for the same rows (the padding is masked out; tests check it).

Beam search (`Request.beams` n > 1, landermt.beam) runs in the same batch: a row's n live hypotheses are
n batch rows, and after each step the batch's rows (ids, mask, cache) are reordered to follow the
hypotheses kept, so greedy rows and beam rows of any pairs share every forward.

A running batch holds token ids only, never a tokenizer: it runs on the server's worker thread while
requests are tokenised on the event loop, and a fast tokenizer keeps its padding settings as state
shared by every caller (two threads using one tokenizer got each other's padding). Prompts come in
as ids, are padded here, and finished rows are handed back as ids for the caller to decode.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from landermt.beam import BeamSearch
from landermt.routing import route


@dataclass
class Request:
    """One row: `key` is the caller's handle for it; `new` collects its generated ids (with beams: the best
    hypothesis', and `hypotheses` the n best, best first)."""

    key: object
    prompt_ids: list[int]
    pair_id: int | None
    max_new_tokens: int
    beams: int = 1
    new: list[int] = field(default_factory=list)
    hypotheses: list[list[int]] = field(default_factory=list)
    search: BeamSearch | None = field(default=None, repr=False)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


class RunningBatch:
    def __init__(self, model, pad_token_id: int, stop_ids: list[int], routed: bool):
        """`stop_ids`: the tokens that end a row (landermt.generate.stop_token_ids)."""
        self.model, self.pad, self.routed = model, pad_token_id, routed
        self.stops = set(stop_ids)
        parameters = inspect.signature(model.forward).parameters
        self.takes_positions = "position_ids" in parameters
        self.keeps_last_logits = "logits_to_keep" in parameters  # prefill skips the LM head on every other position
        self.window = self._sliding_window(model.config)
        self.rows: list[Request] = []
        self.ids = self.mask = self.cache = None  # [B, T] tokens (the last one not yet in the cache), mask, cache

    @staticmethod
    def _sliding_window(config) -> int | None:
        types = getattr(config, "layer_types", None) or []
        return getattr(config, "sliding_window", None) if any("sliding" in t for t in types) else None

    def __len__(self) -> int:
        return len(self.rows)

    def can_admit(self, prompt_tokens: int) -> bool:
        """Whether a row with this many prompt tokens can join now without misaligning a sliding window."""
        if self.window is None or self.ids is None:
            return True
        return max(self.ids.shape[1], prompt_tokens + 1) < self.window

    # --- steps ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def admit(self, requests: list[Request]) -> list[Request]:
        """Prefill `requests` (their first token is then computed) and add them to the batch; returns the
        ones that already finished. If the forward fails, the running batch is unchanged."""
        for request in requests:
            if request.beams > 1:
                request.search = BeamSearch(request.beams, self.stops, request.max_new_tokens)
        length = max(r.prompt_tokens for r in requests)
        prompt = torch.tensor([[self.pad] * (length - r.prompt_tokens) + r.prompt_ids for r in requests])
        mask = torch.tensor([[0] * (length - r.prompt_tokens) + [1] * r.prompt_tokens for r in requests])
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(prompt, mask, cache, [r.pair_id for r in requests])
        order, tokens, done = self._advance(requests, logits)
        if order:
            index = torch.tensor(order)
            if order != list(range(len(requests))):
                prompt, mask = prompt[index], mask[index]
                cache.batch_select_indices(index)
            ids = torch.cat([prompt, torch.tensor(tokens)[:, None]], dim=1)
            self._merge([requests[i] for i in order], ids, F.pad(mask, (0, 1), value=1), cache)
            self._trim()  # rows that finished at once may leave columns that are padding everywhere
        return done

    @torch.no_grad()
    def decode(self) -> list[Request]:
        """One new token for every row (hypothesis); returns the requests that finished."""
        if not self.rows:
            return []
        logits = self._forward(self.ids[:, -1:], self.mask, self.cache, [r.pair_id for r in self.rows])
        order, tokens, done = self._advance(self.rows, logits)
        if not order:
            self.rows, self.ids, self.mask, self.cache = [], None, None, None
            return done
        if order != list(range(len(self.rows))):
            index = torch.tensor(order)
            self.rows = [self.rows[i] for i in order]
            self.ids, self.mask = self.ids[index], self.mask[index]
            self.cache.batch_select_indices(index)
            self._trim()
        self.ids = torch.cat([self.ids, torch.tensor(tokens)[:, None]], dim=1)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return done

    def _advance(self, rows: list[Request], logits: torch.Tensor) -> tuple[list[int], list[int], list[Request]]:
        """Each request's next tokens from its rows' logits [len(rows), vocabulary] (a beam request's rows are
        adjacent). Returns, per row of the next step, the row it continues and its new token (the one to feed
        next), and the requests that finished."""
        order, tokens, done = [], [], []
        best = logits.argmax(-1).tolist()
        start = 0
        while start < len(rows):
            request, end = rows[start], start + 1
            while end < len(rows) and rows[end] is request:
                end += 1
            if request.search is None:
                request.new.append(best[start])
                if best[start] in self.stops or len(request.new) >= request.max_new_tokens:
                    request.hypotheses = [request.new]
                    done.append(request)
                else:
                    order.append(start)
                    tokens.append(best[start])
            else:
                sources, next_tokens = request.search.step(F.log_softmax(logits[start:end].float(), dim=-1))
                order += [start + source for source in sources]
                tokens += next_tokens
                if request.search.done:
                    request.hypotheses = [list(ids) for ids in request.search.best()]
                    request.new = request.hypotheses[0]
                    done.append(request)
            start = end
        return order, tokens, done

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache, pair_ids: list[int | None]):
        kwargs = {"attention_mask": mask, "past_key_values": cache, "use_cache": True}
        if self.keeps_last_logits:
            kwargs["logits_to_keep"] = 1
        if self.takes_positions:
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            kwargs["position_ids"] = positions[:, -ids.shape[1]:]
        with route(torch.tensor(pair_ids) if self.routed else None):
            return self.model(input_ids=ids, **kwargs).logits[:, -1]

    # --- bookkeeping -----------------------------------------------------------------------------------------
    def _merge(self, admitted: list[Request], ids: torch.Tensor, mask: torch.Tensor, cache) -> None:
        """Append the admitted rows (ids [n, T'], their cache covering T' − 1 positions) to the running batch."""
        if self.ids is None:
            self.rows, self.ids, self.mask, self.cache = list(admitted), ids, mask, cache
            return
        length = max(self.ids.shape[1], ids.shape[1])
        self.ids = torch.cat([_pad_left(self.ids, length, self.pad), _pad_left(ids, length, self.pad)])
        self.mask = torch.cat([_pad_left(self.mask, length, 0), _pad_left(mask, length, 0)])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            # the cache covers every position but the newest token's
            mine.keys = torch.cat([_pad_left(mine.keys, length - 1), _pad_left(theirs.keys, length - 1)])
            mine.values = torch.cat([_pad_left(mine.values, length - 1), _pad_left(theirs.values, length - 1)])
            if hasattr(mine, "cumulative_length"):  # sliding-window layer, below its window (can_admit)
                mine.cumulative_length = length - 1
        self.rows += admitted

    def _trim(self) -> None:
        """Drop left columns that are padding in every remaining row, so a batch that never drains does not
        grow without end. A sliding-window layer that has already cut its cache no longer lines up with the
        columns: then nothing is trimmed."""
        unused = int((self.mask.cumsum(-1) == 0).all(dim=0).sum())
        layers = self.cache.layers
        if not unused or any(getattr(layer, "cumulative_length", layer.keys.shape[-2]) != layer.keys.shape[-2]
                             for layer in layers):
            return
        self.ids, self.mask = self.ids[:, unused:], self.mask[:, unused:]
        for layer in layers:
            layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = layer.keys.shape[-2]


def _pad_left(t: torch.Tensor, length: int, value: int = 0) -> torch.Tensor:
    """Left-pad the position axis (last for [B, T] ids and masks, −2 for [B, heads, T, dim] caches) to `length`."""
    if t.dim() == 2:
        return F.pad(t, (length - t.shape[-1], 0), value=value)
    return F.pad(t, (0, 0, length - t.shape[-2], 0), value=value)
