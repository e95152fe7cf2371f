"""Continuous batching (landermt/decode.py): rows that join a running batch mid-flight, with different
pair ids, generate exactly what each generates alone through `greedy`."""

from __future__ import annotations

import pytest
import torch

from landermt.decode import Request, RunningBatch
from landermt.families import family_of
from landermt.generate import greedy
from landermt.routing import patch
from tests.conftest import FAMILY_NAMES, tiny_model

PROMPTS = ["Translate English to German: The weather is nice today.", "Hello", "Good",
           "Where is the train station in the old town of the city?", "Das Wetter", "Il fait beau aujourd'hui."]
PAIR_IDS = [1, 2, 0, 1, 2, 2]
MAX_NEW = 12


def routed(model: torch.nn.Module) -> torch.nn.Module:
    family = family_of(model)
    generator = torch.Generator().manual_seed(1)
    tables = {i: torch.rand(3, family.intermediate_size(model), generator=generator) * 2 for i in (1, 2)}
    for table in tables.values():
        table[0] = 1.0
    patch(model, family, tables)
    return model


def run_staggered(model, tokenizer, arrivals: dict[int, list[int]]) -> tuple[dict, int]:
    """Rows arrive at the given decode steps; returns ({row: Generation}, largest batch seen)."""
    batch = RunningBatch(model, tokenizer, routed=True)
    waiting: list[Request] = []
    out, largest, step = {}, 0, 0
    while step <= max(arrivals) or waiting or len(batch):
        waiting += [Request(i, PROMPTS[i], PAIR_IDS[i], MAX_NEW) for i in arrivals.get(step, [])]
        admitted = [r for r in waiting if batch.can_admit(batch.prompt_tokens(r.prompt))]
        waiting = [r for r in waiting if r not in admitted]
        done = batch.admit(admitted) if admitted else []
        largest = max(largest, len(batch))
        done += batch.decode()
        out.update({request.key: generation for request, generation in done})
        step += 1
    return out, largest


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_rows_joining_mid_flight_match_each_row_alone(family, tokenizer):
    model = routed(tiny_model(family, len(tokenizer)))
    alone = [greedy(model, tokenizer, [p], [i], MAX_NEW)[0] for p, i in zip(PROMPTS, PAIR_IDS, strict=True)]
    together, largest = run_staggered(model, tokenizer, {0: [0, 1], 1: [2], 3: [3, 4, 5]})
    assert [together[i] for i in range(len(PROMPTS))] == alone
    if family != "gemma":  # the tiny Gemma's 16-token window keeps most rows apart (next test)
        assert largest >= 3  # rows really shared the batch


def test_sliding_window_rows_merge_below_the_window_and_wait_above_it(tokenizer):
    model = routed(tiny_model("gemma", len(tokenizer), sliding_window=64))
    alone = [greedy(model, tokenizer, [p], [i], MAX_NEW)[0] for p, i in zip(PROMPTS, PAIR_IDS, strict=True)]
    together, largest = run_staggered(model, tokenizer, {0: [0, 1], 2: [2, 3], 4: [4, 5]})
    assert [together[i] for i in range(len(PROMPTS))] == alone and largest >= 3

    batch = RunningBatch(model, tokenizer, routed=True)
    assert batch.can_admit(70)  # an empty batch takes any row
    batch.admit([Request("running", PROMPTS[3], 1, 30)])
    assert batch.prompt_tokens(PROMPTS[3]) + 1 < 64
    assert batch.can_admit(10) and not batch.can_admit(70)  # 70 + 1 ≥ 64: its cache could not line up


def test_each_row_stops_at_its_own_limit(tokenizer):
    model = routed(tiny_model("llama", len(tokenizer)))
    batch = RunningBatch(model, tokenizer, routed=True)
    requests = [Request(n, PROMPTS[0], 1, n) for n in (1, 3, 5)]
    done = batch.admit(requests)
    while len(batch):
        done += batch.decode()
    lengths = {request.key: generation.new_tokens for request, generation in done}
    assert all(lengths[n] <= n for n in (1, 3, 5)) and len(lengths) == 3


def test_padding_left_by_finished_rows_is_trimmed(tokenizer):
    model = routed(tiny_model("gemma", len(tokenizer), sliding_window=64))
    batch = RunningBatch(model, tokenizer, routed=True)
    batch.admit([Request("long", PROMPTS[3], 1, 1), Request("short", PROMPTS[1], 2, MAX_NEW)])
    # the long row stopped at its 1-token limit; only the short row's own columns remain
    assert [r.key for r in batch.rows] == ["short"]
    assert batch.ids.shape[1] == batch.prompt_tokens(PROMPTS[1]) + 1
    assert all(layer.keys.shape[-2] == batch.ids.shape[1] - 1 for layer in batch.cache.layers)
