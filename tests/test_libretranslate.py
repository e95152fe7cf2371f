"""LibreTranslate's API on a real server: its own Python client unchanged, form and multipart bodies, auto
detection, /detect, html, alternatives, files through the job queue, settings, CORS and the OpenAPI document."""

from __future__ import annotations

import json
import urllib.error

import httpx
import pytest
from libretranslatepy import LibreTranslateAPI

from server.app import create_app
from server.auth import ApiKey, hash_key, write_keys
from server.engine import Engine
from server.jobs import JobStore
from server.metrics import Metrics
from server.settings import Settings
from tests.conftest import free_port, serving
from tests.test_server import TEXTS

KEY = "libretranslate-client-key-0123456789"
LANGUAGES = {"en", "ar", "de", "fr", "it", "zh"}


@pytest.fixture(scope="module")
def keyed_server(smoke_run, tmp_path_factory):
    """The smoke artifact behind API keys, CORS for one origin, a small file limit."""
    folder = tmp_path_factory.mktemp("lt")
    write_keys(folder / "keys.json", [ApiKey("client", hash_key(KEY), 1000)])
    settings = Settings(artifact=str(smoke_run / "artifact"), model=str(smoke_run / "base_model"), max_new_tokens=8,
                        max_texts=4, max_chars=200, api_keys=str(folder / "keys.json"), max_file_bytes=4000,
                        cors_origins="https://pages.example")
    app = create_app(Engine.load(settings, Metrics()), JobStore(folder / "jobs.sqlite3"))
    with serving(app, free_port()) as base:
        yield base


def test_libretranslate_python_client_unchanged(server, keyed_server):
    """libretranslatepy posts form-urlencoded bodies with an api_key field; nothing of ours in between."""
    for base, key in ((server, None), (keyed_server, KEY)):
        client = LibreTranslateAPI(base, api_key=key)
        assert {entry["code"] for entry in client.languages()} == LANGUAGES
        text = client.translate(TEXTS["en"], "en", "de")
        assert isinstance(text, str) and text == httpx.post(f"{base}/translate", json={
            "q": TEXTS["en"], "source": "en", "target": "de", "api_key": key}, timeout=60).json()["translatedText"]
        assert client.translate(TEXTS["de"], "auto", "en") == client.translate(TEXTS["de"], "de", "en")
        detected = client.detect(TEXTS["fr"])
        assert detected[0]["language"] == "fr" and 50 < detected[0]["confidence"] <= 100
    with pytest.raises(urllib.error.HTTPError) as refused:
        LibreTranslateAPI(keyed_server, api_key="wrong").translate("Hello", "en", "de")
    assert refused.value.code == 403 and json.loads(refused.value.read()) == {"error": "invalid API key"}


@pytest.mark.parametrize("send", ["json", "form", "multipart"])
def test_translate_takes_every_body_type(server, send):
    fields = {"q": TEXTS["it"], "source": "it", "target": "en"}
    expected = httpx.post(f"{server}/translate", json=fields, timeout=60).json()
    if send == "json":
        response = httpx.post(f"{server}/translate", json=fields, timeout=60)
    elif send == "form":
        response = httpx.post(f"{server}/translate", data=fields, timeout=60)
    else:
        response = httpx.post(f"{server}/translate", data=fields, files={"unused": ("x.txt", b"x")}, timeout=60)
    assert response.status_code == 200 and response.json() == expected


def test_auto_source_reports_the_detected_language(server):
    one = httpx.post(f"{server}/translate", json={"q": TEXTS["de"], "source": "auto", "target": "en"}, timeout=60)
    assert one.status_code == 200
    assert one.json()["detectedLanguage"]["language"] == "de" and one.json()["detectedLanguage"]["confidence"] > 50
    many = httpx.post(f"{server}/translate", json={"q": [TEXTS["zh"], TEXTS["ar"]], "source": "auto", "target": "fr"},
                      timeout=60).json()
    assert [d["language"] for d in many["detectedLanguage"]] == ["zh", "ar"]
    alone = [httpx.post(f"{server}/translate", json={"q": TEXTS[s], "source": s, "target": "fr"}, timeout=60)
             for s in ("zh", "ar")]
    assert many["translatedText"] == [r.json()["translatedText"] for r in alone]
    unplaceable = httpx.post(f"{server}/translate", json={"q": "12345 !!!", "source": "auto", "target": "en"})
    assert unplaceable.status_code == 400 and "cannot detect" in unplaceable.json()["error"]
    assert set(unplaceable.json()["supported"]) == LANGUAGES


def test_detect(server):
    for code, text in TEXTS.items():
        found = httpx.post(f"{server}/detect", data={"q": text}).json()
        assert found[0]["language"] == code and len(found) <= 3
        assert all(a["confidence"] >= b["confidence"] for a, b in zip(found, found[1:], strict=False))
    assert httpx.post(f"{server}/detect", json={"q": "1234"}).json() == [{"language": "en", "confidence": 0.0}]
    missing = httpx.post(f"{server}/detect", json={})
    assert missing.status_code == 400 and "q: Field required" in missing.json()["error"]
    assert httpx.post(f"{server}/detect", json={"q": "x" * 201}).status_code == 413
    assert httpx.post(f"{server}/detect", json={"q": " "}).status_code == 400


def test_html_keeps_markup_and_translates_text_nodes(server):
    def plain(text: str) -> str:
        return httpx.post(f"{server}/translate", json={"q": text, "source": "en", "target": "de"},
                          timeout=60).json()["translatedText"]

    document = '<p class="x">The weather is nice today.<b>Where is it?</b> <code>a &lt; b</code></p>'
    response = httpx.post(f"{server}/translate", json={"q": document, "source": "en", "target": "de",
                                                       "format": "html"}, timeout=60)
    assert response.status_code == 200
    got = response.json()["translatedText"]
    assert got.startswith('<p class="x">') and got.endswith("</b> <code>a &lt; b</code></p>")
    import html
    first, second = plain("The weather is nice today."), plain("Where is it?")
    assert got == f'<p class="x">{html.escape(first, quote=False)}<b>{html.escape(second, quote=False)}</b> ' \
                  "<code>a &lt; b</code></p>"


def test_alternatives_come_from_the_beam_n_best(server):
    def post(**fields):
        response = httpx.post(f"{server}/translate", json={"q": TEXTS["en"], "source": "en", "target": "it"} | fields,
                              timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    one = post(alternatives=3)
    others = one["alternatives"]
    assert 1 <= len(others) <= 3 and all(isinstance(text, str) and text for text in others)
    assert len(set(others)) == len(others) and one["translatedText"] not in others
    assert post(num_beams=4)["translatedText"] == one["translatedText"]  # the same search: a beam of width 4
    assert "alternatives" not in post(num_beams=4) and post()["translatedText"] == post(num_beams=1)["translatedText"]
    many = httpx.post(f"{server}/translate", data={"q": [TEXTS["en"], TEXTS["fr"]], "source": "en", "target": "it",
                                                   "alternatives": "2"}, timeout=60).json()
    assert len(many["alternatives"]) == 2 and all(len(texts) <= 2 for texts in many["alternatives"])
    assert len(many["translatedText"]) == 2
    wide = httpx.post(f"{server}/translate", json={"q": "Hi", "source": "en", "target": "it", "num_beams": 9})
    assert wide.status_code == 400 and "num_beams" in wide.json()["error"]


@pytest.mark.parametrize("name,content", [
    ("notes.txt", "The weather is nice today.\n\n  Where is the station?  \r\nThanks\n"),
    ("page.html", "<html><body><h1>Hello</h1><p title='t'>The weather is nice today.</p></body></html>"),
])
def test_translate_file_and_download(keyed_server, name, content):
    response = httpx.post(f"{keyed_server}/translate_file", data={"source": "en", "target": "de", "api_key": KEY},
                          files={"file": (name, content.encode())}, timeout=120)
    assert response.status_code == 200, response.text
    url = response.json()["translatedFileUrl"]
    assert url.startswith(f"{keyed_server}/download_file/") and url.endswith(name.replace(".", "_de."))
    downloaded = httpx.get(url, params={"api_key": KEY})
    assert downloaded.status_code == 200
    assert f'filename="{name.replace(".", "_de.")}"' in downloaded.headers["content-disposition"]
    text = downloaded.text
    if name.endswith(".txt"):
        lines = text.split("\n")
        assert len(lines) == len(content.split("\n")) and lines[1] == "" and lines[2].startswith("  ")
        assert lines[2].endswith("  \r")
    else:
        assert text.startswith("<html><body><h1>") and "<p title='t'>" in text and text.endswith("</p></body></html>")


@pytest.mark.parametrize("files,status,message", [
    ({"file": ("a.pdf", b"%PDF")}, 400, "file format '.pdf' is not supported"),
    ({"file": ("a.txt", b"")}, 400, "a.txt is empty"),
    ({"file": ("a.txt", b"\xff\xfe\x00bad")}, 400, "is not UTF-8 text"),
    ({"file": ("a.txt", b"word " * 1000)}, 413, "the limit is 4000"),
    ({}, 400, "multipart field named 'file'"),
])
def test_bad_files_get_clear_errors(keyed_server, files, status, message):
    response = httpx.post(f"{keyed_server}/translate_file", data={"source": "en", "target": "de", "api_key": KEY},
                          files=files or None, timeout=60)
    assert response.status_code == status and message in response.json()["error"]


def test_frontend_settings_and_cors(keyed_server, server):
    settings = httpx.get(f"{keyed_server}/frontend/settings").json()
    assert settings["charLimit"] == 200 and settings["keyRequired"] is True and settings["filesTranslation"] is True
    assert ".txt" in settings["supportedFilesFormat"] and settings["language"]["source"]["code"] == "auto"
    preflight = httpx.options(f"{keyed_server}/translate", headers={
        "Origin": "https://pages.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://pages.example"
    other = httpx.get(f"{keyed_server}/languages", headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in httpx.get(f"{server}/languages",
                                                          headers={"Origin": "https://pages.example"}).headers


def test_openapi_describes_bodies_languages_and_limits(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    body = spec["paths"]["/translate"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/x-www-form-urlencoded", "multipart/form-data"}
    request = spec["components"]["schemas"]["TranslateRequest"]["properties"]
    assert set(request["target"]["enum"]) == LANGUAGES and set(request["source"]["enum"]) == LANGUAGES | {"auto"}
    assert request["q"]["anyOf"][0]["maxLength"] == 200 and request["q"]["anyOf"][1]["maxItems"] == 4
    assert "multipart/form-data" in spec["paths"]["/translate_file"]["post"]["requestBody"]["content"]
    assert "/detect" in spec["paths"] and "/frontend/settings" in spec["paths"]
    assert set(spec["paths"]["/jobs"]["post"]["requestBody"]["content"]) == {"application/x-ndjson",
                                                                             "multipart/form-data"}
    assert "application/x-ndjson" in spec["paths"]["/jobs/{job}/results"]["get"]["responses"]["200"]["content"]
