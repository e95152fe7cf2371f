"""Batch translation jobs persisted in SQLite: no line lost or duplicated across crashes.

A job is a list of lines {"id", "text", "source", "target"}. Each line's result is written in the
same transaction that marks it done, and only while it is still pending, so after a restart (even
kill -9) the runner picks up exactly the lines that have no result yet.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, error TEXT
);
CREATE TABLE IF NOT EXISTS lines (
    job TEXT NOT NULL REFERENCES jobs(id), idx INTEGER NOT NULL, line_id TEXT NOT NULL, text TEXT NOT NULL,
    source TEXT NOT NULL, target TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'pending', result TEXT, error TEXT,
    PRIMARY KEY (job, idx)
);
CREATE INDEX IF NOT EXISTS pending ON lines (job, status, idx);
CREATE TABLE IF NOT EXISTS files (
    job TEXT PRIMARY KEY REFERENCES jobs(id), name TEXT NOT NULL, document TEXT NOT NULL
);
"""
JOB_STATUSES = ("queued", "running", "completed", "failed", "cancelled")


class JobInputError(ValueError):
    """A job file with bad lines; the message lists them by line number."""


@dataclass(frozen=True)
class Line:
    idx: int
    line_id: str
    text: str
    source: str
    target: str


def parse_lines(body: bytes, check: Callable[[str, str, str], str | None], max_lines: int) -> list[dict]:
    """JSONL → line dicts. `check(text, source, target)` returns a problem or None. All problems are
    reported together, each with its line number; nothing is accepted if any line is bad."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise JobInputError("the job file is not UTF-8") from None
    lines, problems = [], []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as e:
            problems.append(f"line {number}: not JSON ({e.msg})")
            continue
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("text", "source", "target")):
            problems.append(f"line {number}: needs string fields text, source, target")
            continue
        problem = check(item["text"], item["source"], item["target"])
        if problem:
            problems.append(f"line {number}: {problem}")
            continue
        lines.append({"id": str(item.get("id", number)), "text": item["text"], "source": item["source"],
                      "target": item["target"]})
    if not lines and not problems:
        problems.append("the job file has no lines")
    if len(lines) > max_lines:
        problems.append(f"{len(lines)} lines; the limit is {max_lines}")
    if problems:
        raise JobInputError("; ".join(problems[:50]) + (f"; … {len(problems) - 50} more" if len(problems) > 50 else ""))
    return lines


class JobStore:
    """All SQL in one place. Thread-safe (one connection, one lock); WAL for crash safety."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    def create(self, lines: list[dict], file: tuple[str, str] | None = None) -> str:
        """A job of `lines`; `file` (name, document) is the uploaded file its lines came from (/translate_file),
        stored in the same transaction so that a killed server still has it."""
        job = uuid.uuid4().hex
        now = time.time()
        with self.lock:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO jobs VALUES (?, 'queued', ?, ?, NULL)", (job, now, now))
            self.db.executemany(
                "INSERT INTO lines (job, idx, line_id, text, source, target) VALUES (?, ?, ?, ?, ?, ?)",
                [(job, i, line["id"], line["text"], line["source"], line["target"]) for i, line in enumerate(lines)])
            if file is not None:
                self.db.execute("INSERT INTO files VALUES (?, ?, ?)", (job, *file))
            self.db.execute("COMMIT")
        return job

    def file(self, job: str) -> tuple[str, str] | None:
        """(name, document) of a file job, or None."""
        with self.lock:
            return self.db.execute("SELECT name, document FROM files WHERE job = ?", (job,)).fetchone()

    def status(self, job: str) -> dict | None:
        with self.lock:
            row = self.db.execute("SELECT status, created, updated, error FROM jobs WHERE id = ?", (job,)).fetchone()
            if row is None:
                return None
            counts = dict(self.db.execute("SELECT status, COUNT(*) FROM lines WHERE job = ? GROUP BY status",
                                          (job,)).fetchall())
        total = sum(counts.values())
        return {"id": job, "status": row[0], "created": row[1], "updated": row[2], "error": row[3],
                "counts": {"total": total, "completed": counts.get("done", 0), "failed": counts.get("failed", 0)}}

    def results(self, job: str) -> list[dict]:
        with self.lock:
            rows = self.db.execute("SELECT line_id, status, result, error FROM lines WHERE job = ? ORDER BY idx",
                                   (job,)).fetchall()
        out = []
        for line_id, status, result, error in rows:
            entry = {"id": line_id}
            if status == "done":
                entry["translation"] = result
            elif status == "failed":
                entry["error"] = error
            else:
                entry["status"] = "pending"
            out.append(entry)
        return out

    def next_pending(self, limit: int) -> tuple[str, list[Line]] | None:
        """The oldest active job's next pending lines (marking it running); finishes jobs with none left."""
        with self.lock:
            while True:
                row = self.db.execute("SELECT id FROM jobs WHERE status IN ('queued', 'running') ORDER BY created "
                                      "LIMIT 1").fetchone()
                if row is None:
                    return None
                job = row[0]
                lines = self.db.execute("SELECT idx, line_id, text, source, target FROM lines WHERE job = ? AND "
                                        "status = 'pending' ORDER BY idx LIMIT ?", (job, limit)).fetchall()
                if lines:
                    self.db.execute("UPDATE jobs SET status = 'running', updated = ? WHERE id = ? AND "
                                    "status = 'queued'", (time.time(), job))
                    return job, [Line(*line) for line in lines]
                self._finish(job)

    def record(self, job: str, done: list[tuple[int, str]], failed: list[tuple[int, str]]) -> None:
        """Write results; a line already done (a rerun after a crash) is never written twice."""
        with self.lock:
            self.db.execute("BEGIN")
            self.db.executemany("UPDATE lines SET status = 'done', result = ? WHERE job = ? AND idx = ? AND "
                                "status = 'pending'", [(text, job, idx) for idx, text in done])
            self.db.executemany("UPDATE lines SET status = 'failed', error = ? WHERE job = ? AND idx = ? AND "
                                "status = 'pending'", [(error, job, idx) for idx, error in failed])
            self.db.execute("UPDATE jobs SET updated = ? WHERE id = ?", (time.time(), job))
            pending = self.db.execute("SELECT COUNT(*) FROM lines WHERE job = ? AND status = 'pending'",
                                      (job,)).fetchone()[0]
            if pending == 0:
                self._finish(job)
            self.db.execute("COMMIT")

    def _finish(self, job: str) -> None:
        failed = self.db.execute("SELECT COUNT(*) FROM lines WHERE job = ? AND status = 'failed'", (job,)).fetchone()[0]
        total = self.db.execute("SELECT COUNT(*) FROM lines WHERE job = ?", (job,)).fetchone()[0]
        status = "failed" if total and failed == total else "completed"
        self.db.execute("UPDATE jobs SET status = ?, updated = ? WHERE id = ? AND status IN ('queued', 'running')",
                        (status, time.time(), job))

    def cancel(self, job: str) -> bool:
        with self.lock:
            cursor = self.db.execute("UPDATE jobs SET status = 'cancelled', updated = ? WHERE id = ? AND status IN "
                                     "('queued', 'running')", (time.time(), job))
        return cursor.rowcount > 0

    def counts_by_status(self) -> dict[str, int]:
        with self.lock:
            return dict(self.db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())

    def close(self) -> None:
        with self.lock:
            self.db.close()
