"""Continuous batching (landermt/decode.py): rows that join a running batch mid-flight, with different
pair ids, generate exactly what each generates alone through `greedy`."""

from __future__ import annotations

import pytest
import torch

from landermt.beam import BeamSearch
from landermt.decode import PrefixCache, Request, RunningBatch
from landermt.families import family_of
from landermt.generate import decoded, greedy, stop_token_ids
from landermt.prompts import DEFAULT_TEMPLATE, render_prompt
from landermt.routing import patch, route
from tests.conftest import FAMILY_NAMES, PARALLEL, tiny_model
from tests.test_delta import attention_patched
from tests.test_routing import random_partition

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


def running_batch(model, tokenizer) -> RunningBatch:
    return RunningBatch(model, tokenizer.pad_token_id, stop_token_ids(tokenizer), routed=True)


def request(tokenizer, key, prompt: str, pair_id: int, max_new_tokens: int) -> Request:
    return Request(key, tokenizer(prompt).input_ids, pair_id, max_new_tokens)


def advance(batch: RunningBatch, new: list[Request], packed: bool) -> list[Request]:
    """One step of the batch with `new` rows admitted: packed into the decode step's forward (RunningBatch.step,
    the engine's way), or admitted in a forward of their own and then decoded."""
    if packed:
        return batch.step(new)
    return (batch.admit(new) if new else []) + batch.decode()


def run_staggered(model, tokenizer, arrivals: dict[int, list[int]], packed: bool = True) -> tuple[dict, int]:
    """Rows arrive at the given decode steps; returns ({row: Generation}, largest batch seen)."""
    batch = running_batch(model, tokenizer)
    waiting: list[Request] = []
    out, largest, step = {}, 0, 0
    while step <= max(arrivals) or waiting or len(batch):
        waiting += [request(tokenizer, i, PROMPTS[i], PAIR_IDS[i], MAX_NEW) for i in arrivals.get(step, [])]
        admitted = [r for r in waiting if batch.can_admit(r.prompt_tokens)]
        waiting = [r for r in waiting if r not in admitted]
        largest = max(largest, len(batch) + len(admitted))
        done = advance(batch, admitted, packed)
        out.update({r.key: decoded(tokenizer, r.prompt_tokens, r.new) for r in done})
        step += 1
    return out, largest


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_rows_joining_mid_flight_match_each_row_alone(family, packed, tokenizer):
    model = routed(tiny_model(family, len(tokenizer)))
    assert running_batch(model, tokenizer).packs == (family != "bloom")  # BLOOM's ALiBi: separate prefill only
    alone = [greedy(model, tokenizer, [p], [i], MAX_NEW)[0] for p, i in zip(PROMPTS, PAIR_IDS, strict=True)]
    together, largest = run_staggered(model, tokenizer, {0: [0, 1], 1: [2], 3: [3, 4, 5]}, packed)
    assert [together[i] for i in range(len(PROMPTS))] == alone
    if family != "gemma":  # the tiny Gemma's 16-token window keeps most rows apart (next test)
        assert largest >= 3  # rows really shared the batch


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_delta_routed_rows_packed_into_decode_steps_match_each_row_alone(family, tokenizer):
    """The delta rule, neuron and attention updates, with per-token pair ids in packed steps."""
    model = tiny_model(family, len(tokenizer), sliding_window=128)
    attention_patched(model, random_partition(model))
    alone = [greedy(model, tokenizer, [p], [i], MAX_NEW)[0] for p, i in zip(PROMPTS, PAIR_IDS, strict=True)]
    together, largest = run_staggered(model, tokenizer, {0: [0, 1], 1: [2], 3: [3, 4, 5]})
    assert [together[i] for i in range(len(PROMPTS))] == alone and largest >= 3


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prompts_prefilled_in_chunks_over_several_steps_match_each_row_alone(family, tokenizer):
    """A 5-token budget per step: prompts are prefilled a chunk at a time, beside running rows, oldest first."""
    model = routed(tiny_model(family, len(tokenizer), sliding_window=64))
    alone = [greedy(model, tokenizer, [p], [i], MAX_NEW)[0] for p, i in zip(PROMPTS, PAIR_IDS, strict=True)]
    batch = RunningBatch(model, tokenizer.pad_token_id, stop_token_ids(tokenizer), True, prefill_tokens=5)
    arrivals, waiting, out, chunked, step = {0: [0, 1], 2: [2, 3], 4: [4, 5]}, [], {}, 0, 0
    while step <= max(arrivals) or waiting or len(batch):
        waiting += [request(tokenizer, i, PROMPTS[i], PAIR_IDS[i], MAX_NEW) for i in arrivals.get(step, [])]
        admitted = [r for r in waiting if batch.can_admit(r.prompt_tokens)]
        waiting = [r for r in waiting if r not in admitted]
        done = batch.step(admitted)
        chunked += bool(batch.rows and batch.prefilling and 0 < batch.prefilling[0].done)
        out.update({r.key: decoded(tokenizer, r.prompt_tokens, r.new) for r in done})
        step += 1
    assert [out[i] for i in range(len(PROMPTS))] == alone
    if family != "bloom":  # BLOOM prefills whole prompts in forwards of their own
        assert chunked  # a prompt was part-way prefilled while other rows ran


def test_sliding_window_rows_merge_below_the_window_and_wait_above_it(tokenizer):
    model = routed(tiny_model("gemma", len(tokenizer), sliding_window=64))
    alone = [greedy(model, tokenizer, [p], [i], MAX_NEW)[0] for p, i in zip(PROMPTS, PAIR_IDS, strict=True)]
    together, largest = run_staggered(model, tokenizer, {0: [0, 1], 2: [2, 3], 4: [4, 5]})
    assert [together[i] for i in range(len(PROMPTS))] == alone and largest >= 3

    batch = running_batch(model, tokenizer)
    assert batch.can_admit(70)  # an empty batch takes any row
    batch.admit([request(tokenizer, "running", PROMPTS[3], 1, 30)])
    assert batch.rows[0].prompt_tokens + 1 < 64
    assert batch.can_admit(10) and not batch.can_admit(70)  # 70 + 1 ≥ 64: its cache could not line up


def test_each_row_stops_at_its_own_limit(tokenizer):
    model = routed(tiny_model("llama", len(tokenizer)))
    batch = running_batch(model, tokenizer)
    done = batch.admit([request(tokenizer, n, PROMPTS[0], 1, n) for n in (1, 3, 5)])
    while len(batch):
        done += batch.decode()
    lengths = {r.key: len(r.new) for r in done}
    assert all(lengths[n] <= n for n in (1, 3, 5)) and len(lengths) == 3


def test_padding_left_by_finished_rows_is_trimmed(tokenizer):
    model = routed(tiny_model("gemma", len(tokenizer), sliding_window=64))
    batch = running_batch(model, tokenizer)
    batch.admit([request(tokenizer, "long", PROMPTS[3], 1, 1), request(tokenizer, "short", PROMPTS[1], 2, MAX_NEW)])
    # the long row stopped at its 1-token limit; only the short row's own columns remain
    assert [r.key for r in batch.rows] == ["short"]
    assert batch.ids.shape[1] == batch.rows[0].prompt_tokens + 1
    assert all(layer.keys.shape[-2] == batch.ids.shape[1] - 1 for layer in batch.cache.layers)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_evaluation_on_the_continuous_decoder_equals_greedy_sentence_by_sentence(family, tokenizer):
    """training.evaluate.translate (the server's decoder, rows joining as others finish) gives each sentence what
    `greedy` gives it alone, under the same per-sentence cap of 2 × source tokens + 16."""
    from training.evaluate import translate

    model = routed(tiny_model(family, len(tokenizer), sliding_window=64))
    sources = [en for en, _ in PARALLEL["de"]] + ["Hi", "Where is the train station in the old town of the city?"]
    got = translate(model, tokenizer, DEFAULT_TEMPLATE, "en", "de", sources, pair_id=2, batch_size=3,
                    max_new_tokens=MAX_NEW)
    want = [greedy(model, tokenizer, [render_prompt(DEFAULT_TEMPLATE, "en", "de", s)], [2],
                   min(MAX_NEW, 2 * len(tokenizer(s, add_special_tokens=False).input_ids) + 16))[0].text
            for s in sources]
    assert got == want


def test_evaluation_streams_every_direction_through_one_decoder(tokenizer):
    """Sentences of several directions (pair ids) share the running batch; each still gets its solo output."""
    from training.evaluate import Sentence, translate_all

    model = routed(tiny_model("llama", len(tokenizer)))
    sentences = [Sentence("en", "de", en, 1) for en, _ in PARALLEL["de"][:4]]
    sentences += [Sentence("fr", "en", fr, 2) for _, fr in PARALLEL["fr"][:4]]
    got = translate_all(model, tokenizer, DEFAULT_TEMPLATE, sentences, batch_size=3, max_new_tokens=MAX_NEW)
    want = [greedy(model, tokenizer, [render_prompt(DEFAULT_TEMPLATE, s.source_lang, s.target_lang, s.text)],
                   [s.pair_id], MAX_NEW)[0].text for s in sentences]
    assert got == want


# --- beam search (landermt/beam.py) in the running batch ---------------------------------------------------------

@torch.no_grad()
def beam_alone(model, prompt_ids: list[int], pair_id: int, width: int, max_new: int, stops: list[int]):
    """The reference: the same search, every step a full forward of prompt + hypothesis (no cache, no padding,
    no other rows)."""
    search = BeamSearch(width, set(stops), max_new)
    while not search.done:
        ids = torch.tensor([prompt_ids + list(h.ids) for h in search.live])
        with route(torch.full((len(ids),), pair_id)):
            logits = model(input_ids=ids).logits[:, -1]
        search.step(torch.log_softmax(logits.float(), dim=-1))
    return [list(ids) for ids in search.best()]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_beam_rows_share_the_batch_with_greedy_rows_and_match_each_alone(family, packed, tokenizer):
    model = routed(tiny_model(family, len(tokenizer)))
    stops = stop_token_ids(tokenizer)
    widths = [3, 1, 2, 4, 1, 2]
    want = {i: beam_alone(model, tokenizer(p).input_ids, PAIR_IDS[i], widths[i], MAX_NEW, stops)
            for i, p in enumerate(PROMPTS) if widths[i] > 1}
    batch = running_batch(model, tokenizer)
    arrivals = {0: [0, 1], 2: [2, 3], 3: [4], 6: [5]}
    got, step, waiting = {}, 0, []
    while step <= max(arrivals) or waiting or len(batch):
        waiting += [Request(i, tokenizer(PROMPTS[i]).input_ids, PAIR_IDS[i], MAX_NEW, beams=widths[i])
                    for i in arrivals.get(step, [])]
        new = [r for r in waiting if batch.can_admit(r.prompt_tokens)]
        waiting = [r for r in waiting if r not in new]
        got.update({r.key: r for r in advance(batch, new, packed)})
        step += 1
    assert {i: got[i].hypotheses for i in want} == want
    for i, width in enumerate(widths):
        assert len(got[i].hypotheses) <= width and got[i].new == got[i].hypotheses[0]
        if width == 1:
            assert decoded(tokenizer, 0, got[i].new).text == greedy(model, tokenizer, [PROMPTS[i]], [PAIR_IDS[i]],
                                                                    MAX_NEW)[0].text


def test_beam_search_ranks_by_length_normalised_log_probability():
    stop = 3
    search = BeamSearch(2, {stop}, max_new_tokens=5)
    log = torch.log
    # step 1: stopping at once (p 0.5) is the best candidate; tokens 1 (0.3) and 2 (0.2) go on
    assert search.step(log(torch.tensor([[1e-9, 0.3, 0.2, 0.5]]))) == ([0, 0], [1, 2])
    assert [h.ids for h in search.finished] == [(3,)]
    # step 2: hypothesis (1,) continues almost surely and stops next; (2,) stops at once
    search.step(log(torch.tensor([[1e-9, 0.98, 1e-9, 0.02], [1e-9, 0.1, 1e-9, 0.9]])))
    assert search.step(log(torch.tensor([[1e-9, 1e-9, 1e-9, 1.0]]))) == ([], [])
    assert search.done
    # per token, (1, 1, 3): log(0.3 · 0.98) / 3 = -0.41 beats (3,): log 0.5 = -0.69 and (2, 3): log(0.18) / 2 = -0.86
    assert search.best() == [(1, 1, 3), (3,)]


def test_beam_search_stops_at_the_budget_with_what_is_live():
    search = BeamSearch(2, {0}, max_new_tokens=2)
    uniform = torch.full((1, 5), -1.0)
    search.step(uniform)
    search.step(torch.full((2, 5), -1.0))
    assert search.done and len(search.best()) == 2 and all(len(ids) == 2 for ids in search.best())


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_rows_reusing_their_pairs_prompt_prefix_match_each_row_alone(family, packed, tokenizer):
    """Prefix reuse: later rows of a pair prefill only what follows the KV kept from its first prompt, in a
    batch with rows that reuse nothing (other pairs), greedy and beam, and in a new batch sharing the cache.
    (Gemma 3's window is wider than the batch here: a window the prompts cross is test_sliding_window_...)"""
    model = routed(tiny_model(family, len(tokenizer), sliding_window=128))
    texts = [english for english, _ in PARALLEL["de"][:6]]
    rows = [(render_prompt(DEFAULT_TEMPLATE, "en", "de" if i % 2 else "fr", text), 1 + i % 2) for i, text in
            enumerate(texts)]
    alone = [greedy(model, tokenizer, [p], [pair], MAX_NEW)[0].text for p, pair in rows]
    beam = beam_alone(model, tokenizer(rows[4][0]).input_ids, rows[4][1], 2, MAX_NEW, stop_token_ids(tokenizer))
    prefixes = PrefixCache()
    got, batch = {}, RunningBatch(model, tokenizer.pad_token_id, stop_token_ids(tokenizer), True, prefixes)
    arrivals = {0: [0, 1], 2: [2, 3], 3: [4]}
    for step in range(40):
        new = [Request(i, tokenizer(rows[i][0]).input_ids, rows[i][1], MAX_NEW, beams=2 if i == 4 else 1)
               for i in arrivals.get(step, [])]
        got.update({r.key: r for r in advance(batch, new, packed)})
    template = len(tokenizer(render_prompt(DEFAULT_TEMPLATE, "en", "de", "")).input_ids) - 2
    assert prefixes.reused_tokens >= 3 * template  # rows 2, 3 and 4 each reused at least the template
    fresh = RunningBatch(model, tokenizer.pad_token_id, stop_token_ids(tokenizer), True, prefixes)
    done = fresh.admit([Request(5, tokenizer(rows[5][0]).input_ids, rows[5][1], MAX_NEW)])
    while len(fresh):
        done += fresh.decode()
    got[5] = done[0]
    assert {i: decoded(tokenizer, 0, r.new).text for i, r in got.items() if i != 4} == {
        i: text for i, text in enumerate(alone) if i != 4}
    assert got[4].hypotheses == beam


def test_evaluation_with_beams_gives_each_sentence_its_solo_beam_search(tokenizer):
    """translate_all(beams=2): each sentence's best hypothesis of the search run alone; a sentence takes two of
    the batch's five rows, so at most two are in flight."""
    from training.evaluate import Sentence, translate_all

    model = routed(tiny_model("qwen2", len(tokenizer)))
    sentences = [Sentence("en", "de", en, 1) for en, _ in PARALLEL["de"][:3]]
    sentences += [Sentence("fr", "en", fr, 2) for _, fr in PARALLEL["fr"][:3]]
    got = translate_all(model, tokenizer, DEFAULT_TEMPLATE, sentences, batch_size=5, max_new_tokens=MAX_NEW, beams=2)
    stops = stop_token_ids(tokenizer)
    prompts = [tokenizer(render_prompt(DEFAULT_TEMPLATE, s.source_lang, s.target_lang, s.text)).input_ids
               for s in sentences]
    want = [decoded(tokenizer, 0, beam_alone(model, ids, s.pair_id, 2, MAX_NEW, stops)[0]).text
            for ids, s in zip(prompts, sentences, strict=True)]
    assert got == want
