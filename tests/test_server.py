"""The HTTP server for real: uvicorn on a loopback port, httpx clients, the smoke-preset artifact."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from server.languages import normalise

ROOT = Path(__file__).resolve().parent.parent
TEXTS = {"en": "The weather is nice today.", "de": "Das Wetter ist heute schön.", "fr": "Il fait beau aujourd'hui.",
         "zh": "今天天气很好。", "ar": "الطقس جميل اليوم.", "it": "Oggi il tempo è bello."}


def translate(base: str, q, source: str, target: str) -> httpx.Response:
    return httpx.post(f"{base}/translate", json={"q": q, "source": source, "target": target}, timeout=60)


def test_translate_text_and_list(server):
    one = translate(server, TEXTS["en"], "en", "de")
    assert one.status_code == 200 and isinstance(one.json()["translatedText"], str)
    many = translate(server, [TEXTS["en"], "Where is the station?"], "en", "fr")
    assert many.status_code == 200 and len(many.json()["translatedText"]) == 2


def test_mixed_pairs_concurrently_equal_each_pair_alone(server):
    pairs = [("en", "de"), ("de", "en"), ("fr", "zh"), ("zh", "ar"), ("it", "en"), ("en", "ar")]
    alone = {pair: translate(server, TEXTS[pair[0]], *pair).json()["translatedText"] for pair in pairs}

    async def together():
        async with httpx.AsyncClient(timeout=60) as client:
            responses = await asyncio.gather(*(client.post(f"{server}/translate", json={
                "q": TEXTS[s], "source": s, "target": t}) for s, t in pairs))
        return {pair: r.json()["translatedText"] for pair, r in zip(pairs, responses, strict=True)}

    before = httpx.get(f"{server}/metrics").text
    assert asyncio.run(together()) == alone
    after = httpx.get(f"{server}/metrics").text
    steps = metric(after, "landermt_batch_size_count") - metric(before, "landermt_batch_size_count")
    one_row = 'landermt_batch_size_bucket{le="1.0"}'
    single = metric(after, one_row) - metric(before, one_row)
    assert steps > single  # some decode steps ran rows of different pairs together


def test_languages_health_ready(server):
    languages = httpx.get(f"{server}/languages").json()
    assert {entry["code"] for entry in languages} == {"en", "ar", "de", "fr", "it", "zh"}
    assert all(entry["code"] not in entry["targets"] and len(entry["targets"]) == 5 for entry in languages)
    health = httpx.get(f"{server}/health").json()
    assert health["routing"] is True and len(health["layers"]) == 2
    assert httpx.get(f"{server}/ready").json() == {"ready": True}
    assert "/translate" in httpx.get(f"{server}/openapi.json").json()["paths"]


@pytest.mark.parametrize("body,status,message", [
    ({"q": "Hallo", "source": "xx", "target": "en"}, 400, "unsupported language 'xx'"),
    ({"q": "Hello", "source": "en", "target": "ja"}, 400, "unsupported language 'ja'"),
    ({"q": "   ", "source": "en", "target": "de"}, 400, "text 0 is empty"),
    ({"q": [], "source": "en", "target": "de"}, 400, "no text"),
    ({"q": "x" * 201, "source": "en", "target": "de"}, 413, "201 characters; the limit is 200"),
    ({"q": ["a b"] * 5, "source": "en", "target": "de"}, 413, "5 texts in one request; the limit is 4"),
    ({"q": "Hello", "source": "en"}, 400, "target: Field required"),
    ({"q": 5, "source": "en", "target": "de"}, 400, "invalid request"),
    ({"q": "Hello", "source": "en", "target": "de", "format": "pdf"}, 400, "format: Input should be 'text' or 'html'"),
    ({"q": "Hello", "source": "en", "target": "de", "alternatives": -1}, 400, "alternatives: Input should be greater"),
])
def test_bad_input_gets_a_clear_error(server, body, status, message):
    response = httpx.post(f"{server}/translate", json=body)
    assert response.status_code == status
    assert message in response.json()["error"]
    if "unsupported" in message:
        assert response.json()["supported"] == ["en", "ar", "de", "fr", "it", "zh"]


def test_malformed_bodies_are_400(server):
    response = httpx.post(f"{server}/translate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "malformed JSON body" in response.json()["error"]
    listed = httpx.post(f"{server}/translate", json=["q"])
    assert listed.status_code == 400 and "must be an object" in listed.json()["error"]
    other = httpx.post(f"{server}/translate", content=b"q=x", headers={"content-type": "text/csv"})
    assert other.status_code == 415 and "unsupported content type 'text/csv'" in other.json()["error"]


def test_same_source_and_target_returns_the_text(server):
    """As LibreTranslate does: the text back unchanged, no model call."""
    response = translate(server, [TEXTS["en"], "Hi"], "en", "en-GB")
    assert response.status_code == 200 and response.json() == {"translatedText": [TEXTS["en"], "Hi"]}


def test_bcp47_tags_are_normalised(server):
    assert [normalise(t) for t in ("de-DE", "zh-Hans", "zh_CN", "EN", "pt-BR", "ara")] == ["de", "zh", "zh", "en",
                                                                                           "pt", "ar"]
    assert translate(server, TEXTS["de"], "de-DE", "zh-Hans").json()["translatedText"] == translate(
        server, TEXTS["de"], "de", "zh").json()["translatedText"]


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_metrics_count_traffic(server):
    before = httpx.get(f"{server}/metrics").text
    for _ in range(3):
        translate(server, TEXTS["fr"], "fr", "it")
    translate(server, TEXTS["fr"], "fr", "xx")
    after = httpx.get(f"{server}/metrics").text
    ok = 'landermt_http_requests_total{endpoint="/translate",status="200"}'
    bad = 'landermt_http_requests_total{endpoint="/translate",status="400"}'
    assert metric(after, ok) - metric(before, ok) == 3
    assert metric(after, bad) - metric(before, bad) == 1
    pair = 'landermt_translations_total{pair="fr-it"}'
    assert metric(after, pair) - metric(before, pair) == 3
    assert metric(after, "landermt_batch_size_count") > metric(before, "landermt_batch_size_count")
    assert metric(after, "landermt_generated_tokens_total") > 0

    def delta(name: str) -> float:
        return metric(after, name) - metric(before, name)

    assert delta("landermt_time_to_first_token_seconds_count") == 3  # one observation per translated text
    # the first token of a text comes after it arrived and before its response
    assert 0 < delta("landermt_time_to_first_token_seconds_sum") <= delta("landermt_request_seconds_sum")
    assert TEXTS["fr"] not in after  # no request text in metrics


def test_torch_backend_runs_torch_on_its_worker_thread_only(smoke_run, monkeypatch):
    """The model is loaded (and patched) on the worker thread that runs every step: a second thread running torch
    gets an OpenMP team of its own, and with more OpenMP threads than cores libgomp stops spin-waiting
    (server/torch_backend.py)."""
    import threading

    import server.torch_backend as torch_backend
    from landermt.artifact import load_artifact
    from server.metrics import Metrics
    from server.settings import Settings

    loaded_on, load_model = [], torch_backend.load_model

    def recording_load_model(*args, **kwargs):
        loaded_on.append(threading.current_thread().name)
        return load_model(*args, **kwargs)

    monkeypatch.setattr(torch_backend, "load_model", recording_load_model)
    settings = Settings(artifact=str(smoke_run / "artifact"), model=str(smoke_run / "base_model"))
    backend, _ = torch_backend.TorchBackend.load(settings, load_artifact(smoke_run / "artifact"), Metrics())
    try:
        worker = backend.worker.submit(lambda: threading.current_thread().name).result()
        assert loaded_on == [worker] and worker != threading.current_thread().name
    finally:
        backend.worker.shutdown()
