"""API keys: 401 without a key, 403 with a wrong one, 429 over a key's rate, the key as a Bearer header, body
field or query parameter, open endpoints, the keys CLI, malformed keys files."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.auth import ApiKey, ApiKeys, KeysFileError, TokenBucket, hash_key, write_keys
from server.engine import Engine
from server.jobs import JobStore
from server.metrics import Metrics
from server.settings import Settings
from tests.conftest import free_port, serving
from tests.test_server import TEXTS, metric

ROOT = Path(__file__).resolve().parent.parent
MAIN, LIMITED = "main-key-for-tests-0123456789", "limited-key-for-tests-0123456789"
BODY = {"q": TEXTS["en"], "source": "en", "target": "de"}
MISSING = {"error": "missing API key: send Authorization: Bearer <key>, or an api_key field"}


class Clock:
    """A monotonic clock that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "keys.json"
    write_keys(path, [ApiKey("main", hash_key(MAIN), 1000), ApiKey("limited", hash_key(LIMITED), 3)])
    return path


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def server(smoke_run, keys_file, clock, tmp_path_factory):
    settings = Settings(artifact=str(smoke_run / "artifact"), model=str(smoke_run / "base_model"),
                        api_keys=str(keys_file), max_new_tokens=12)
    app = create_app(Engine.load(settings, Metrics()), JobStore(tmp_path_factory.mktemp("jobs") / "jobs.sqlite3"))
    app.state.api_keys.clock = clock
    with serving(app, free_port()) as base:
        yield base


def test_token_bucket_bursts_to_capacity_then_refills_at_its_rate():
    bucket = TokenBucket(capacity=3, per_second=0.5, tokens=3, updated=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [0, 0, 0, 2.0]  # a burst of 3, then 2 s to the next token
    assert bucket.take(101.0) == 1.0  # half a token back
    assert bucket.take(102.0) == 0  # a whole one, taken
    assert [bucket.take(1000.0) for _ in range(4)] == [0, 0, 0, 2.0]  # a long idle refills to capacity, no more


@pytest.mark.parametrize("method,path", [("post", "/translate"), ("post", "/jobs"), ("get", "/jobs/x"),
                                         ("get", "/jobs/x/results"), ("post", "/jobs/x/cancel")])
@pytest.mark.parametrize("authorization", [None, "Basic dXNlcjpwYXNz", "Bearer"])
def test_no_key_is_401(server, method, path, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.request(method, f"{server}{path}", json=BODY, headers=headers)
    assert response.status_code == 401 and response.json() == MISSING
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("key", ["wrong", hash_key(MAIN), MAIN + "x"])  # the stored hash is not a key
def test_wrong_key_is_403(server, key):
    response = httpx.post(f"{server}/translate", json=BODY, headers=bearer(key))
    assert response.status_code == 403 and response.json() == {"error": "invalid API key"}
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_right_key_translates_and_runs_jobs(server):
    response = httpx.post(f"{server}/translate", json=BODY, headers=bearer(MAIN), timeout=60)
    assert response.status_code == 200 and isinstance(response.json()["translatedText"], str)
    line = json.dumps({"id": "a", "text": TEXTS["de"], "source": "de", "target": "en"})
    job = httpx.post(f"{server}/jobs", content=line, headers={"content-type": "application/x-ndjson", **bearer(MAIN)})
    assert job.status_code == 201
    assert httpx.get(f"{server}/jobs/{job.json()['id']}", headers=bearer(MAIN)).status_code == 200


def test_keys_file_holds_only_hashes(keys_file):
    text = keys_file.read_text()
    assert MAIN not in text and LIMITED not in text
    assert hash_key(MAIN) in text and hash_key(LIMITED) in text
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600


def test_rate_limit_is_429_with_retry_after_then_recovers(server, clock):
    url = f"{server}/jobs/none"  # an admitted request answers 404 at once: no translation needed
    before = httpx.get(f"{server}/metrics").text
    assert [httpx.get(url, headers=bearer(LIMITED)).status_code for _ in range(3)] == [404] * 3
    limited = httpx.get(url, headers=bearer(LIMITED))
    assert limited.status_code == 429 and limited.headers["retry-after"] == "20"  # 3 per minute: a token per 20 s
    assert limited.json() == {"error": "rate limit exceeded: key 'limited' allows 3 requests per minute; "
                                       "retry in 20 s"}
    assert httpx.get(url, headers=bearer(MAIN)).status_code == 404  # every key has its own bucket
    clock.now += 10
    assert httpx.get(url, headers=bearer(LIMITED)).headers["retry-after"] == "10"
    clock.now += 10
    assert [httpx.get(url, headers=bearer(LIMITED)).status_code for _ in range(2)] == [404, 429]
    clock.now += 3600  # refills to capacity, no more
    assert [httpx.get(url, headers=bearer(LIMITED)).status_code for _ in range(4)] == [404] * 3 + [429]
    after = httpx.get(f"{server}/metrics").text
    counted = 'landermt_http_requests_total{endpoint="/jobs/{job}",status="429"}'
    assert metric(after, counted) - metric(before, counted) == 4
    assert LIMITED not in after and hash_key(LIMITED) not in after  # no keys in metrics


def test_key_as_body_field_or_query_parameter(server):
    """LibreTranslate's clients send `api_key` in the body (JSON or form) or the query string."""
    for request in (dict(json=BODY | {"api_key": MAIN}), dict(data=BODY | {"api_key": MAIN}),
                    dict(json=BODY, params={"api_key": MAIN})):
        assert httpx.post(f"{server}/translate", timeout=60, **request).status_code == 200
    assert httpx.post(f"{server}/translate", json=BODY | {"api_key": "wrong"}).status_code == 403
    assert httpx.post(f"{server}/translate", json=BODY | {"api_key": ""}).status_code == 401  # empty: no key
    assert httpx.get(f"{server}/jobs/none", params={"api_key": MAIN}).status_code == 404


def test_refusals_are_counted_in_metrics(server):
    counted = {status: f'landermt_http_requests_total{{endpoint="/translate",status="{status}"}}'
               for status in ("401", "403")}
    before = {status: metric(httpx.get(f"{server}/metrics").text, name) for status, name in counted.items()}
    httpx.post(f"{server}/translate", json=BODY)
    httpx.post(f"{server}/translate", json=BODY, headers=bearer("wrong"))
    after = httpx.get(f"{server}/metrics").text
    assert {status: metric(after, name) - before[status] for status, name in counted.items()} == {"401": 1, "403": 1}


def test_open_endpoints_need_no_key(server):
    for path in ("/health", "/ready", "/languages", "/metrics", "/docs", "/openapi.json"):
        assert httpx.get(f"{server}{path}").status_code == 200, path
    spec = httpx.get(f"{server}/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["HTTPBearer"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    query = spec["components"]["securitySchemes"]["APIKeyQuery"]
    assert (query["type"], query["in"], query["name"]) == ("apiKey", "query", "api_key")
    either = [{"HTTPBearer": []}, {"APIKeyQuery": []}]  # either one is enough
    assert spec["paths"]["/translate"]["post"]["security"] == either
    assert spec["paths"]["/jobs/{job}/results"]["get"]["security"] == either
    assert "security" not in spec["paths"]["/health"]["get"]


def keys_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LANDERMT_API_KEYS"} | (env or {})
    return subprocess.run([sys.executable, "-m", "server.keys", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_keys_cli_add_list_remove(tmp_path):
    path = tmp_path / "new" / "keys.json"
    added = keys_cli("add", "alice", "--rate-per-minute", "5", "--file", str(path))
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert len(key) >= 40 and "shown only this once" in added.stderr
    assert key not in path.read_text() and hash_key(key) in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and list(path.parent.iterdir()) == [path]  # no temp files
    assert ApiKeys.load(path).admit(key) == "alice"  # the printed key is the one the server accepts
    assert keys_cli("add", "bob", env={"LANDERMT_API_KEYS": str(path)}).returncode == 0
    listed = keys_cli("list", "--file", str(path))
    assert listed.stdout.splitlines() == ["alice\t5 per minute", "bob\t60 per minute"]
    again = keys_cli("add", "alice", "--file", str(path))
    assert again.returncode == 1 and "key 'alice' is already in" in again.stderr
    assert keys_cli("remove", "alice", "--file", str(path)).returncode == 0
    assert keys_cli("list", "--file", str(path)).stdout.splitlines() == ["bob\t60 per minute"]
    gone = keys_cli("remove", "alice", "--file", str(path))
    assert gone.returncode == 1 and "no key 'alice'" in gone.stderr and "(keys: bob)" in gone.stderr
    nowhere = keys_cli("list")
    assert nowhere.returncode == 2 and "pass --file PATH or set LANDERMT_API_KEYS" in nowhere.stderr


ENTRY = {"name": "a", "sha256": "0" * 64, "rate_per_minute": 5}


@pytest.mark.parametrize("content,problem", [
    ("{not json", "is not valid JSON: Expecting property name"),
    ("[]", 'expected an object {"keys": [...]} at the top level'),
    (json.dumps({"keys": ["a"]}), "entry 0: expected an object"),
    (json.dumps({"keys": [{"sha256": "0" * 64, "rate_per_minute": 5}]}), "entry 0: missing ['name']"),
    (json.dumps({"keys": [ENTRY | {"key": "secret"}]}), "entry 0: unknown field(s) ['key']"),
    (json.dumps({"keys": [ENTRY | {"sha256": "secret"}]}), "entry 0: 'a': sha256 must be 64 lowercase hex digits"),
    (json.dumps({"keys": [ENTRY | {"rate_per_minute": 0}]}), "'a': rate_per_minute must be a positive integer, got 0"),
    (json.dumps({"keys": [ENTRY | {"rate_per_minute": "60"}]}), "a positive integer, got '60'"),
    (json.dumps({"keys": [ENTRY, ENTRY]}), "entry 1: duplicate name 'a'"),
    (None, "does not exist (create it with: python -m server.keys add NAME --file"),
])
def test_malformed_keys_file_is_a_clear_error(tmp_path, content, problem):
    path = tmp_path / "keys.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(KeysFileError) as error:
        ApiKeys.load(path)
    assert f"keys file {path}" in str(error.value) and problem in str(error.value)


def test_cli_and_server_refuse_a_malformed_keys_file(smoke_run, tmp_path):
    path = tmp_path / "keys.json"
    path.write_text('{"keys": {}}')
    listed = keys_cli("list", "--file", str(path))
    assert listed.returncode == 1 and "Traceback" not in listed.stderr
    assert listed.stderr.startswith(f"error: keys file {path}: expected an object")
    settings = Settings(artifact=str(smoke_run / "artifact"), model=str(smoke_run / "base_model"), api_keys=str(path))
    store = JobStore(tmp_path / "jobs.sqlite3")
    with pytest.raises(KeysFileError, match="expected an object"):
        create_app(Engine.load(settings, Metrics()), store)
    store.close()
