"""Batch jobs: HTTP API, SQLite persistence across kill -9, priority, the offline CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.test_server import TEXTS

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [("en", "de"), ("de", "fr"), ("zh", "en"), ("ar", "it"), ("fr", "zh")]


def job_lines(n: int) -> list[dict]:
    return [{"id": f"l{i}", "text": TEXTS[PAIRS[i % 5][0]] + f" {i}", "source": PAIRS[i % 5][0],
             "target": PAIRS[i % 5][1]} for i in range(n)]


def ndjson(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()


def wait_for(base: str, job: str, status: str = "completed", timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = httpx.get(f"{base}/jobs/{job}").json()
        if body["status"] == status:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.1)


def test_job_round_trip_in_input_order(server):
    lines = job_lines(7)
    created = httpx.post(f"{server}/jobs", content=ndjson(lines), headers={"content-type": "application/x-ndjson"})
    assert created.status_code == 201 and created.json()["counts"]["total"] == 7
    status = wait_for(server, created.json()["id"])
    assert status["counts"] == {"total": 7, "completed": 7, "failed": 0}
    results = [json.loads(x) for x in httpx.get(f"{server}/jobs/{status['id']}/results").text.splitlines()]
    assert [r["id"] for r in results] == [line["id"] for line in lines]
    direct = httpx.post(f"{server}/translate", json={"q": lines[2]["text"], "source": "zh", "target": "en"}).json()
    assert results[2]["translation"] == direct["translatedText"]


def test_multipart_upload(server):
    response = httpx.post(f"{server}/jobs", files={"file": ("job.jsonl", ndjson(job_lines(3)), "application/jsonl")})
    assert response.status_code == 201
    assert wait_for(server, response.json()["id"])["counts"]["completed"] == 3


def test_bad_job_files_are_rejected_with_line_numbers(server):
    body = (json.dumps(job_lines(1)[0]) + "\n{broken\n" + json.dumps({"text": "Hi", "source": "en", "target": "xx"})
            + "\n" + json.dumps({"text": "", "source": "en", "target": "de"}) + "\n" + json.dumps({"text": 3}) + "\n")
    response = httpx.post(f"{server}/jobs", content=body.encode(), headers={"content-type": "application/x-ndjson"})
    assert response.status_code == 400
    error = response.json()["error"]
    for expected in ("line 2: not JSON", "line 3: unsupported language 'xx'", "line 4: text is empty",
                     "line 5: needs string fields"):
        assert expected in error
    assert httpx.post(f"{server}/jobs", content=b"", headers={"content-type": "application/x-ndjson"}
                      ).json()["error"].endswith("the job file has no lines")


def test_cancel_and_unknown_job(server):
    created = httpx.post(f"{server}/jobs", content=ndjson(job_lines(200)),
                         headers={"content-type": "application/x-ndjson"}).json()
    cancelled = httpx.post(f"{server}/jobs/{created['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    time.sleep(1.0)
    settled = httpx.get(f"{server}/jobs/{created['id']}").json()["counts"]["completed"]
    time.sleep(1.0)
    assert httpx.get(f"{server}/jobs/{created['id']}").json()["counts"]["completed"] == settled < 200
    assert httpx.get(f"{server}/jobs/nope").status_code == 404


def test_job_metrics(server):
    text = httpx.get(f"{server}/metrics").text
    assert 'landermt_jobs{status="completed"}' in text and 'landermt_job_lines_total{outcome="completed"}' in text


def start_server(run: Path, port: int, db: Path) -> subprocess.Popen:
    env = os.environ | {"LANDERMT_ARTIFACT": str(run / "artifact"), "LANDERMT_MODEL": str(run / "base_model"),
                        "LANDERMT_PORT": str(port), "LANDERMT_JOBS_DB": str(db), "LANDERMT_MAX_BATCH_SIZE": "2",
                        "LANDERMT_MAX_NEW_TOKENS": "12"}
    proc = subprocess.Popen([sys.executable, "-m", "server"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)


def test_job_survives_kill_9_with_every_line_exactly_once(smoke_run, tmp_path):
    port, db = free_port(), tmp_path / "jobs.sqlite3"
    proc = start_server(smoke_run, port, db)
    base = f"http://127.0.0.1:{port}"
    lines = job_lines(120)
    job = httpx.post(f"{base}/jobs", content=ndjson(lines), headers={"content-type": "application/x-ndjson"}
                     ).json()["id"]
    deadline = time.monotonic() + 120
    while httpx.get(f"{base}/jobs/{job}").json()["counts"]["completed"] < 10:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc = start_server(smoke_run, port, db)
    try:
        status = wait_for(base, job)
        results = [json.loads(x) for x in httpx.get(f"{base}/jobs/{job}/results").text.splitlines()]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    assert status["counts"] == {"total": 120, "completed": 120, "failed": 0}
    assert [r["id"] for r in results] == [line["id"] for line in lines]
    assert all("translation" in r for r in results)


def test_offline_batch_cli_resumes_after_kill(smoke_run, tmp_path):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(ndjson(job_lines(150)))
    cmd = [sys.executable, "-m", "server.batch", str(source), str(target), "--artifact", str(smoke_run / "artifact"),
           "--model", str(smoke_run / "base_model"), "--max-batch-size", "2", "--max-new-tokens", "12"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    db = Path(str(target) + ".jobs.sqlite3")
    deadline = time.monotonic() + 120
    import sqlite3

    while True:
        if db.exists():
            try:
                done = sqlite3.connect(db).execute("SELECT COUNT(*) FROM lines WHERE status='done'").fetchone()[0]
                if done >= 10:
                    break
            except sqlite3.OperationalError:
                pass
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    finished = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    results = [json.loads(x) for x in target.read_text().splitlines()]
    assert [r["id"] for r in results] == [f"l{i}" for i in range(150)] and all("translation" in r for r in results)


def test_offline_batch_cli_rejects_a_malformed_file(smoke_run, tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "Hi", "source": "en", "target": "de"}\nnot json\n')
    result = subprocess.run([sys.executable, "-m", "server.batch", str(source), str(tmp_path / "out.jsonl"),
                             "--artifact", str(smoke_run / "artifact"), "--model", str(smoke_run / "base_model")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "line 2: not JSON" in result.stderr


def test_store_records_each_line_once_and_tracks_status(tmp_path):
    from server.jobs import JobStore

    store = JobStore(tmp_path / "jobs.sqlite3")
    job = store.create([{"id": "a", "text": "x", "source": "en", "target": "de"},
                        {"id": "b", "text": "y", "source": "en", "target": "de"}])
    assert store.status(job)["status"] == "queued"
    got, lines = store.next_pending(10)
    assert got == job and [line.line_id for line in lines] == ["a", "b"] and store.status(job)["status"] == "running"
    store.record(job, [(0, "X")], [(1, "boom")])
    store.record(job, [(0, "again"), (1, "late")], [])  # a rerun after a crash writes nothing twice
    assert store.results(job) == [{"id": "a", "translation": "X"}, {"id": "b", "error": "boom"}]
    assert store.status(job)["status"] == "completed" and store.next_pending(10) is None
    other = store.create([{"id": "c", "text": "z", "source": "en", "target": "de"}])
    assert store.cancel(other) and store.next_pending(10) is None and not store.cancel(other)
    reopened = JobStore(tmp_path / "jobs.sqlite3")
    assert reopened.status(job)["counts"] == {"total": 2, "completed": 1, "failed": 1}


def test_file_in_flight_survives_kill_9(smoke_run, tmp_path):
    """/translate_file with wait=false: the file and its segments are in SQLite before the answer, so a server
    killed mid-file finishes it after a restart and the download has every line translated once."""
    port, db = free_port(), tmp_path / "jobs.sqlite3"
    proc = start_server(smoke_run, port, db)
    base = f"http://127.0.0.1:{port}"
    lines = [f"{TEXTS['en']} {i}" for i in range(80)]
    document = "\n".join(lines) + "\n"
    url = httpx.post(f"{base}/translate_file", data={"source": "en", "target": "de", "wait": "false"},
                     files={"file": ("big.txt", document.encode())}, timeout=60).json()["translatedFileUrl"]
    job = url.split("/")[-2]
    deadline = time.monotonic() + 120
    while httpx.get(f"{base}/jobs/{job}").json()["counts"]["completed"] < 5:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    early = httpx.get(url)
    assert early.status_code == 409 and "not ready" in early.json()["error"]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc = start_server(smoke_run, port, db)
    try:
        status = wait_for(base, job)
        translated = httpx.get(url)
        results = [json.loads(x) for x in httpx.get(f"{base}/jobs/{job}/results").text.splitlines()]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    assert status["counts"] == {"total": 80, "completed": 80, "failed": 0}
    assert translated.status_code == 200 and translated.text == "".join(r["translation"] + "\n" for r in results)
