"""Continuous batching for greedy translation: rows join and leave one running batch between steps.

`greedy` (generate.py) runs a fixed batch until its longest row ends. Here a `RunningBatch` keeps
the KV cache of every unfinished row; `step()` admits newly arrived rows and gives every running row its
next token in one forward over the real tokens of both (landermt.packing: prefill packed into the decode
step), with per-token pair ids (landermt.routing); where the model cannot pack (BLOOM) or nothing is
running, `admit()` prefills the new rows in a forward of their own and `decode()` runs the step.
A row leaves as soon as it stops (EOS, a newline, or its own `max_new_tokens`), so short translations
never wait for long ones and new requests never wait for a whole batch to finish.

Merging: rows are left-padded, so two caches of lengths T1 < T2 merge by left-padding the shorter
one with masked zeros to T2. A sliding-window cache layer (Gemma 3) keeps only its last W − 1
positions, after which padding no longer lines up; rows are therefore admitted only while the
merged length stays below W (`can_admit`), and otherwise wait. Columns that are padding in every row
are dropped as rows leave, so a busy batch stays as short as its longest live row.
Outputs equal `greedy`'s for the same rows (the padding is masked out; tests check it).

Prefix reuse (`PrefixCache`): every prompt of a pair starts the same way (the template, and in base-model mode
the few-shot examples), so the KV of the first prompt seen per pair is kept, and a later row of that pair
prefills only what follows its longest common prefix with it: the row's cache is that prefix's KV, then a gap
of masked columns, then its own tokens (positions come from the mask, so the gap changes nothing).

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

from landermt import packing
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


class PrefixCache:
    """Per pair id, one prompt's token ids and its KV per layer ([1, heads, T, dim] keys and values): the first
    prompt of the pair that was prefilled whole. KV at a position depends only on the tokens up to it, so any
    common prefix of another prompt of the same pair (same routing) has exactly this KV."""

    def __init__(self):
        self.entries: dict[int | None, tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self.reused_tokens = 0  # prompt tokens not prefilled thanks to it (tests, benchmarks)

    def match(self, pair_id: int | None, prompt_ids: list[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """How many leading tokens of `prompt_ids` have known KV (never all: the last one must run to give the
        first new token's logits), and that KV."""
        if pair_id not in self.entries:
            return 0, []
        ids, kv = self.entries[pair_id]
        length = 0
        for a, b in zip(ids, prompt_ids[:-1], strict=False):
            if a != b:
                break
            length += 1
        return length, [(k[:, :, :length], v[:, :, :length]) for k, v in kv]

    def store(self, pair_id: int | None, prompt_ids: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.entries.setdefault(pair_id, (list(prompt_ids), kv))


@dataclass(eq=False)  # compared by identity
class Prefill:
    """A row being prefilled by `RunningBatch.step`: its own cache holds its prompt's first `done` tokens, the
    first `reused` of them a known prefix's (PrefixCache)."""

    request: Request
    cache: DynamicCache
    done: int
    reused: int


class RunningBatch:
    def __init__(self, model, pad_token_id: int, stop_ids: list[int], routed: bool,
                 prefixes: PrefixCache | None = None, prefill_tokens: int | None = None):
        """`stop_ids`: the tokens that end a row (landermt.generate.stop_token_ids); `prefixes`: reuse the KV of
        prompt prefixes seen before (kept by the caller, so it outlives the batch); `prefill_tokens`: the prompt
        tokens a packed step prefills at most (None: every waiting prompt whole)."""
        self.model, self.pad, self.routed, self.prefixes = model, pad_token_id, routed, prefixes
        self.prefill_tokens = prefill_tokens
        self.prefilling: list[Prefill] = []  # taken in by `step`, prompt not yet complete (oldest first)
        self.stops = set(stop_ids)
        parameters = inspect.signature(model.forward).parameters
        self.takes_positions = "position_ids" in parameters
        self.keeps_last_logits = "logits_to_keep" in parameters  # prefill skips the LM head on every other position
        self.window = self._sliding_window(model.config)
        self.packs = self.takes_positions and packing.can_pack(model)  # prefill inside the decode step
        self.rows: list[Request] = []
        self.ids = self.mask = self.cache = None  # [B, T] tokens (the last one not yet in the cache), mask, cache

    @staticmethod
    def _sliding_window(config) -> int | None:
        types = getattr(config, "layer_types", None) or []
        return getattr(config, "sliding_window", None) if any("sliding" in t for t in types) else None

    def __len__(self) -> int:
        """Batch rows in use: running hypotheses, and the rows being prefilled (a beam's counted at its width)."""
        return len(self.rows) + sum(prefill.request.beams for prefill in self.prefilling)

    @property
    def requests(self) -> list[Request]:
        """Every request in the batch, running or being prefilled, each once."""
        return [*{id(r): r for r in self.rows}.values(), *(prefill.request for prefill in self.prefilling)]

    def can_admit(self, prompt_tokens: int) -> bool:
        """Whether a row with this many prompt tokens can join without misaligning a sliding window: the running
        batch, as wide as it will be when the row joins (after the steps that prefill it and those queued
        before it, under `step`), and the row itself must stay below the window."""
        if self.window is None or self.ids is None:
            return True
        lag = 0
        if self.packs:  # the row joins after the step's decode token, once every older prompt is prefilled
            queued = prompt_tokens + sum(p.request.prompt_tokens - p.done for p in self.prefilling)
            lag = -(-queued // self.prefill_tokens) if self.prefill_tokens else 1
        return max(self.ids.shape[1] + lag, prompt_tokens + 1) < self.window

    # --- steps ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def admit(self, requests: list[Request]) -> list[Request]:
        """Prefill `requests` (their first token is then computed) and add them to the batch; returns the
        ones that already finished. If the forward fails, the running batch is unchanged."""
        self._start_searches(requests)
        known = [self.prefixes.match(r.pair_id, r.prompt_ids) if self.prefixes else (0, []) for r in requests]
        prefix = max(length for length, _ in known)
        suffix = max(r.prompt_tokens - length for r, (length, _) in zip(requests, known, strict=True))
        width = max(self.ids.shape[1], prefix + suffix + 1) if self.ids is not None else prefix + suffix + 1
        if self.window is not None and width >= self.window:  # the gaps would push the batch past the window
            known, prefix, suffix = [(0, [])] * len(requests), 0, max(r.prompt_tokens for r in requests)
        prompt, mask = [], []
        for r, (length, _) in zip(requests, known, strict=True):
            rest = r.prompt_tokens - length
            prompt.append([self.pad] * (prefix - length) + r.prompt_ids[:length] + [self.pad] * (suffix - rest)
                          + r.prompt_ids[length:])
            mask.append([0] * (prefix - length) + [1] * length + [0] * (suffix - rest) + [1] * rest)
        prompt, mask = torch.tensor(prompt), torch.tensor(mask)
        cache = DynamicCache(config=self.model.config)
        if prefix:  # the known prefixes' KV, left-padded with masked zeros to one width
            shapes = next(kv for length, kv in known if length)
            for layer, (key, value) in enumerate(shapes):
                keys = [_pad_left(kv[layer][0] if length else key[:, :, :0], prefix) for length, kv in known]
                values = [_pad_left(kv[layer][1] if length else value[:, :, :0], prefix) for length, kv in known]
                cache.update(torch.cat(keys), torch.cat(values), layer)
            self.prefixes.reused_tokens += sum(length for length, _ in known)
        logits = self._forward(prompt[:, prefix:], mask, cache, [r.pair_id for r in requests])
        if self.prefixes is not None:
            self._remember(requests, known, cache, prefix + suffix)
        return self._join(requests, prompt, mask, cache, logits)

    @torch.no_grad()
    def decode(self) -> list[Request]:
        """One new token for every row (hypothesis); returns the requests that finished."""
        if not self.rows:
            return []
        return self._continue(self._forward(self.ids[:, -1:], self.mask, self.cache, [r.pair_id for r in self.rows]))

    @torch.no_grad()
    def step(self, requests: list[Request]) -> list[Request]:
        """Take in `requests` and run one step; returns the requests that finished. Where the model can pack
        (landermt.packing), the step is one forward over real tokens only: every running row's next token and up
        to `prefill_tokens` prompt tokens of the rows being prefilled, oldest first (a prompt over the budget is
        prefilled in chunks over several steps, so running rows never wait for a long prefill); a row whose
        prompt is complete joins the running batch with its first token. Otherwise `admit`, then `decode` (and a
        step with nothing to prefill is `decode`)."""
        if not self.packs or not (requests or self.prefilling):
            return (self.admit(requests) if requests else []) + self.decode()
        self._start_searches(requests)
        self.prefilling += [self._start_prefill(request) for request in requests]
        running, parts, ids, positions, pair_ids = len(self.rows), [], [], [], []
        if running:
            where = _positions(self.mask)[:, -1:]
            parts.append(packing.Part(0, running, self.cache, packing.masks(self.model, self.cache, 1, running,
                                                                            self.mask, where), rows=True))
            ids.append(self.ids[:, -1])
            positions.append(where[:, 0])
            pair_ids += [r.pair_id for r in self.rows]
        budget, chunks = self.prefill_tokens or sum(p.request.prompt_tokens for p in self.prefilling), []
        for prefill in self.prefilling:
            take = min(prefill.request.prompt_tokens - prefill.done, budget)
            if take <= 0:
                break
            budget -= take
            where = torch.arange(prefill.done, prefill.done + take)
            start = parts[-1].end if parts else 0
            parts.append(packing.Part(start, start + take, prefill.cache,
                                      packing.masks(self.model, prefill.cache, take, 1, None, where[None])))
            ids.append(torch.tensor(prefill.request.prompt_ids[prefill.done : prefill.done + take]))
            positions.append(where)
            pair_ids += [prefill.request.pair_id] * take
            prefill.done += take
            chunks.append((prefill, parts[-1]))
        complete = [(prefill, part) for prefill, part in chunks if prefill.done == prefill.request.prompt_tokens]
        keep = torch.tensor([*range(running), *(part.end - 1 for _, part in complete)], dtype=torch.long)
        kwargs = {"logits_to_keep": keep} if self.keeps_last_logits else {}
        with packing.packed(self.model, parts) as step, route(torch.tensor([pair_ids]) if self.routed else None):
            logits = self.model(input_ids=torch.cat(ids)[None], position_ids=torch.cat(positions)[None],
                                past_key_values=step, use_cache=True, **kwargs).logits[0]
        if not self.keeps_last_logits:
            logits = logits[keep]
        done = self._continue(logits[:running]) if running else []
        if complete:
            done += self._join_prefilled([prefill for prefill, _ in complete], logits[running:])
        return done

    def _join_prefilled(self, joining: list[Prefill], logits: torch.Tensor) -> list[Request]:
        """Rows whose prompt `step` has completed join as one left-padded batch (ids, mask, cache, as `admit`
        makes it); `logits` [rows, vocabulary] of their last prompt token."""
        self.prefilling = [prefill for prefill in self.prefilling if prefill not in joining]
        requests = [prefill.request for prefill in joining]
        width = max(r.prompt_tokens for r in requests)
        prompt = torch.stack([_pad_left(torch.tensor([r.prompt_ids]), width, self.pad)[0] for r in requests])
        mask = torch.stack([_pad_left(torch.ones(1, r.prompt_tokens, dtype=torch.long), width)[0] for r in requests])
        cache = DynamicCache(config=self.model.config)
        for layer in range(len(joining[0].cache.layers)):
            cache.update(torch.cat([_pad_left(p.cache.layers[layer].keys, width) for p in joining]),
                         torch.cat([_pad_left(p.cache.layers[layer].values, width) for p in joining]), layer)
        if self.prefixes is not None:
            self._remember(requests, [(p.reused, []) for p in joining], cache, width)
        return self._join(requests, prompt, mask, cache, logits)

    def _start_prefill(self, request: Request) -> Prefill:
        """A row about to be prefilled: its cache starts as its pair's known prompt prefix, if any."""
        reused, kv = self.prefixes.match(request.pair_id, request.prompt_ids) if self.prefixes else (0, [])
        cache = DynamicCache(config=self.model.config)
        for layer, (key, value) in enumerate(kv):
            cache.update(key, value, layer)
        if self.prefixes is not None:
            self.prefixes.reused_tokens += reused
        return Prefill(request, cache, reused, reused)

    def _continue(self, logits: torch.Tensor) -> list[Request]:
        """The running rows after a step that gave each its logits [rows, vocabulary] (its cache already holds the
        step's token): finished requests leave, beams are reordered, each row gets its next token."""
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

    def _start_searches(self, requests: list[Request]) -> None:
        for request in requests:
            if request.beams > 1:
                request.search = BeamSearch(request.beams, self.stops, request.max_new_tokens)

    def _join(self, requests: list[Request], prompt: torch.Tensor, mask: torch.Tensor, cache,
              logits: torch.Tensor) -> list[Request]:
        """Admitted rows after their prefill (left-padded prompt ids and mask [n, T], `cache` over them, logits
        [n, vocabulary] of their last position) join the running batch with their first token; returns the
        requests that already finished."""
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
            positions = _positions(mask)
            kwargs["position_ids"] = positions[:, -ids.shape[1]:]
        with route(torch.tensor(pair_ids) if self.routed else None):
            return self.model(input_ids=ids, **kwargs).logits[:, -1]

    # --- bookkeeping -----------------------------------------------------------------------------------------
    def _remember(self, requests: list[Request], known: list[tuple[int, list]], cache, width: int) -> None:
        """Keep the KV of each prompt prefilled whole (no known prefix) for its pair, if the pair has none yet:
        its last `prompt_tokens` columns of every layer (unless a sliding-window layer has cut them)."""
        if any(layer.keys.shape[-2] != width for layer in cache.layers):
            return
        for row, (request, (length, _)) in enumerate(zip(requests, known, strict=True)):
            if length == 0 and request.pair_id not in self.prefixes.entries:
                n = request.prompt_tokens
                kv = [(layer.keys[row : row + 1, :, -n:].clone(), layer.values[row : row + 1, :, -n:].clone())
                      for layer in cache.layers]
                self.prefixes.store(request.pair_id, request.prompt_ids, kv)

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


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Each column's position in its row: real tokens counted from 0, padding at 0 (masked anyway)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _pad_left(t: torch.Tensor, length: int, value: int = 0) -> torch.Tensor:
    """Left-pad the position axis (last for [B, T] ids and masks, −2 for [B, heads, T, dim] caches) to `length`."""
    if t.dim() == 2:
        return F.pad(t, (length - t.shape[-1], 0), value=value)
    return F.pad(t, (0, 0, length - t.shape[-2], 0), value=value)
