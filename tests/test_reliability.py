"""Concurrency and failure isolation on a real server: base-model mode (few-shot prompts, so long prompts),
many concurrent requests of mixed pairs, a fast tokenizer; and a forward that fails for one row only."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from server.engine import Engine
from tests.conftest import serving, tiny_model

LONG = ("The committee met on Tuesday to discuss the new railway line between the two cities, which would cut the "
        "journey from three hours to under ninety minutes, and agreed to publish its report next spring.")
PAIRS = [("en", "de"), ("en", "fr"), ("en", "it"), ("en", "zh"), ("de", "en"), ("fr", "ar"), ("zh", "es")]


def requests_for(count: int) -> list[dict]:
    """Long, distinct texts over mixed pairs (the race needs tokenisation on the request path to overlap a
    batch being padded on the worker)."""
    return [{"q": f"{LONG} ({i})", "source": PAIRS[i % len(PAIRS)][0], "target": PAIRS[i % len(PAIRS)][1]}
            for i in range(count)]


async def post_all(base: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(body):
            async with limit:
                return await client.post(f"{base}/translate", json=body)
        return await asyncio.gather(*(one(body) for body in bodies))


@pytest.fixture(scope="module")
def base_engine(tmp_path_factory) -> Engine:
    """A tiny random Gemma 3 with the default model's real fast tokenizer (262,144 entries: slow enough to
    encode that the race showed), served with no artifact: few-shot prompting."""
    from landermt.models import resolve_model_path
    from server.metrics import Metrics
    from server.settings import Settings
    from tests.conftest import free_port

    folder = tmp_path_factory.mktemp("tiny-gemma-real-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(None), local_files_only=True)
    tokenizer.save_pretrained(folder)
    tiny_model("gemma", len(tokenizer), sliding_window=512).save_pretrained(folder)
    settings = Settings(model=str(folder), port=free_port(), max_batch_size=8, max_wait_ms=2, max_texts=4,
                        max_chars=400, max_new_tokens=10)
    return Engine.load(settings, Metrics())


@pytest.fixture(scope="module")
def base_server(base_engine, tmp_path_factory):
    from server.app import create_app
    from server.jobs import JobStore

    store = JobStore(tmp_path_factory.mktemp("jobs") / "jobs.sqlite3")
    with serving(create_app(base_engine, store), base_engine.settings.port) as base:
        yield base


def test_concurrent_long_prompts_in_base_model_mode_all_answer_their_solo_output(base_server):
    bodies = requests_for(56)
    alone = [httpx.post(f"{base_server}/translate", json=body, timeout=60) for body in bodies[:len(PAIRS) * 2]]
    assert all(r.status_code == 200 for r in alone)
    solo = {i: r.json()["translatedText"] for i, r in enumerate(alone)}
    for _ in range(3):
        responses = asyncio.run(post_all(base_server, bodies, concurrency=28))
        assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses
                                                                            if r.status_code != 200][:3]
        assert {i: responses[i].json()["translatedText"] for i in solo} == solo


POISON = "☃"  # one token of its own wherever it stands


@pytest.fixture
def poisoned(base_engine):
    """Fault injection on the real model: any forward whose input holds the poison text's first token fails,
    as an out-of-memory or a bad kernel would for one row's prompt."""
    poison_id = base_engine.tokenizer(POISON, add_special_tokens=False).input_ids[0]

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and bool((ids == poison_id).any()):
            raise RuntimeError("injected fault")

    handle = base_engine.backend.model.register_forward_pre_hook(hook, with_kwargs=True)
    yield poison_id
    handle.remove()


def test_a_failed_forward_fails_only_the_row_that_caused_it(base_server, base_engine, poisoned, caplog):
    bodies = requests_for(14)
    solo = [httpx.post(f"{base_server}/translate", json=body, timeout=60).json()["translatedText"]
            for body in bodies]
    bodies.insert(5, {"q": f"{POISON} {LONG}", "source": "en", "target": "de"})
    with caplog.at_level(logging.WARNING, logger="landermt"):
        responses = asyncio.run(post_all(base_server, bodies, concurrency=len(bodies)))
    bad = responses.pop(5)
    assert bad.status_code == 500 and bad.headers["content-type"] == "application/json"
    request_id = bad.json()["id"]
    assert request_id == bad.headers["x-request-id"] and "internal error" in bad.json()["error"]
    assert [r.status_code for r in responses] == [200] * len(responses)
    assert [r.json()["translatedText"] for r in responses] == solo  # the other rows were retried or went on
    failed = [record for record in caplog.records if request_id in record.getMessage()]
    assert len(failed) == 1 and "injected fault" in failed[0].getMessage()


def test_a_transient_decode_failure_retries_every_row(base_server, base_engine):
    """A decode step that fails once (nothing to do with any row) costs no request."""
    bodies = requests_for(10)
    solo = [httpx.post(f"{base_server}/translate", json=body, timeout=60).json()["translatedText"]
            for body in bodies]
    calls = {"decode": 0}

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1 and ids.shape[0] > 1:  # a decode step of a shared batch
            calls["decode"] += 1
            if calls["decode"] == 3:
                raise RuntimeError("transient fault")

    handle = base_engine.backend.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        responses = asyncio.run(post_all(base_server, bodies, concurrency=len(bodies)))
    finally:
        handle.remove()
    assert calls["decode"] >= 3
    assert [r.status_code for r in responses] == [200] * len(bodies)
    assert [r.json()["translatedText"] for r in responses] == solo


def test_an_unhandled_error_is_json_with_an_id_in_the_log(base_server, base_engine, caplog, monkeypatch):
    def broken() -> list[dict]:
        raise RuntimeError("languages table broke")

    monkeypatch.setattr(base_engine, "language_list", broken)
    with caplog.at_level(logging.ERROR, logger="landermt"):
        response = httpx.get(f"{base_server}/languages")
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    request_id = response.json()["id"]
    assert re.fullmatch(r"[0-9a-f]{12}", request_id)
    assert any(request_id in record.getMessage() and "languages table broke" in record.getMessage()
               for record in caplog.records)
    assert httpx.get(f"{base_server}/health").status_code == 200  # the server goes on


def test_every_response_carries_a_request_id(base_server):
    ok = httpx.post(f"{base_server}/translate", json={"q": "Hello", "source": "en", "target": "de"}, timeout=60)
    bad = httpx.post(f"{base_server}/translate", json={"q": "Hello", "source": "en", "target": "xx"})
    assert ok.status_code == 200 and bad.status_code == 400
    assert ok.headers["x-request-id"] != bad.headers["x-request-id"]


def test_the_worker_thread_never_sees_the_tokenizer(base_engine):
    """The race is gone by construction: the running batch (worker thread) holds token ids, not a tokenizer."""
    batch = base_engine.backend.running
    assert not any(isinstance(value, type(base_engine.tokenizer)) for value in vars(batch).values())
    assert all(isinstance(t, torch.Tensor) or t is None for t in (batch.ids, batch.mask))


def test_a_job_line_that_fails_in_the_engine_fails_alone_and_the_job_goes_on(base_server, poisoned):
    lines = [{"id": f"l{i}", **{k: v for k, v in body.items() if k != "q"}, "text": body["q"]}
             for i, body in enumerate(requests_for(5))]
    lines[2]["text"] = f"{POISON} {LONG}"
    body = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
    job = httpx.post(f"{base_server}/jobs", content=body, headers={"content-type": "application/x-ndjson"}).json()
    deadline = time.monotonic() + 120
    while (status := httpx.get(f"{base_server}/jobs/{job['id']}").json())["status"] != "completed":
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert status["counts"] == {"total": 5, "completed": 4, "failed": 1}
    results = [json.loads(x) for x in httpx.get(f"{base_server}/jobs/{job['id']}/results").text.splitlines()]
    assert "internal error" in results[2]["error"] and f"job-{job['id']}-2" in results[2]["error"]
    assert all("translation" in r for i, r in enumerate(results) if i != 2)
