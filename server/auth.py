"""Optional API keys, checked against stored SHA-256 hashes, rate-limited per key.

A request names its key as `Authorization: Bearer <key>`, or as LibreTranslate's clients do: an `api_key` field
in the body (JSON or form) or the query string. No key is 401, an unknown key 403 (LibreTranslate's "Invalid
API key"), a key over its rate 429.

The keys file (`--api-keys`, LANDERMT_API_KEYS; unset = no auth) is JSON written by `python -m server.keys`:

    {"keys": [{"name": "alice", "sha256": "<hex SHA-256 of the key>", "rate_per_minute": 60}]}

Only hashes are stored, so a leaked file grants no access. Each key has a token bucket holding up to
`rate_per_minute` requests, refilled at rate_per_minute / 60 per second: bursts up to the rate, then the rate.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends
from fastapi.security import APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer

FIELDS = {"name", "sha256", "rate_per_minute"}


class KeysFileError(ValueError):
    """The keys file is missing or malformed; the message names the file and the problem."""


class AuthError(Exception):
    """A request refused because of its key: `status` 401, 403 or 429, `headers` what the client needs to retry."""

    def __init__(self, message: str, status: int, headers: dict[str, str]):
        super().__init__(message)
        self.status, self.headers = status, headers


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str  # hex SHA-256 of the key; the key itself is never stored
    rate_per_minute: int


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(path: str | Path) -> list[ApiKey]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeysFileError(f"keys file {path} does not exist "
                            f"(create it with: python -m server.keys add NAME --file {path})") from None
    except json.JSONDecodeError as error:
        raise KeysFileError(f"keys file {path} is not valid JSON: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise KeysFileError(f"keys file {path} cannot be read: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeysFileError(f'keys file {path}: expected an object {{"keys": [...]}} at the top level')
    keys: list[ApiKey] = []
    for i, entry in enumerate(data["keys"]):
        problem = _entry_problem(entry, {key.name for key in keys})
        if problem:
            raise KeysFileError(f"keys file {path}: entry {i}: {problem}")
        keys.append(ApiKey(**entry))
    return keys


def _entry_problem(entry: Any, taken: set[str]) -> str | None:
    if not isinstance(entry, dict):
        return f"expected an object with {sorted(FIELDS)}, got {type(entry).__name__}"
    if missing := FIELDS - entry.keys():
        return f"missing {sorted(missing)}"
    if unknown := entry.keys() - FIELDS:  # strict, so a misspelt field is not silently ignored
        return f"unknown field(s) {sorted(unknown)}"
    name, digest, rate = entry["name"], entry["sha256"], entry["rate_per_minute"]
    if not isinstance(name, str) or not name.strip():
        return "name must be a non-empty string"
    if name in taken:
        return f"duplicate name {name!r}"
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        return f"{name!r}: sha256 must be 64 lowercase hex digits (the key's hash, never the key)"
    if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
        return f"{name!r}: rate_per_minute must be a positive integer, got {rate!r}"
    return None


def write_keys(path: str | Path, keys: list[ApiKey]) -> None:
    """Atomically, mode 0600: a temp file in the same directory, then os.replace, so no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"keys": [asdict(key) for key in keys]}, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@dataclass
class TokenBucket:
    """Holds up to `capacity` tokens, refilled continuously at `per_second`; one request takes one token."""

    capacity: float
    per_second: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take a token at time `now`: returns 0 if there was one, else the seconds until there will be."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.per_second)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.per_second


class ApiKeys:
    """The loaded keys file: admits a request by its bearer key, within that key's rate."""

    def __init__(self, keys: list[ApiKey], clock: Callable[[], float] = time.monotonic):
        self.keys = keys
        self.clock = clock  # monotonic seconds; tests put a settable clock here
        self.buckets: dict[str, TokenBucket] = {}

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        return cls(read_keys(path))

    def admit(self, key: str | None) -> str:
        """The name of `key`, taking one request from its bucket; AuthError 401 (missing), 403 (unknown), 429 (rate)."""
        if not key:
            raise AuthError(MISSING_KEY, 401, {"WWW-Authenticate": "Bearer"})
        digest = hash_key(key)
        # constant-time comparisons against every stored hash, with no early exit
        matches = [entry for entry in self.keys if hmac.compare_digest(entry.sha256, digest)]
        if not matches:
            raise AuthError("invalid API key", 403, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        entry, now = matches[0], self.clock()
        if entry.name not in self.buckets:  # created full on first use, on the clock in use by then
            self.buckets[entry.name] = TokenBucket(entry.rate_per_minute, entry.rate_per_minute / 60,
                                                   entry.rate_per_minute, now)
        wait = self.buckets[entry.name].take(now)
        if wait:
            seconds = math.ceil(wait)
            raise AuthError(f"rate limit exceeded: key {entry.name!r} allows {entry.rate_per_minute} requests per "
                            f"minute; retry in {seconds} s", 429, {"Retry-After": str(seconds)})
        return entry.name


MISSING_KEY = "missing API key: send Authorization: Bearer <key>, or an api_key field"
BEARER = HTTPBearer(auto_error=False, description="an API key from `python -m server.keys add NAME`")
QUERY_KEY = APIKeyQuery(name="api_key", auto_error=False, description="the API key as LibreTranslate's clients send it")


def route_dependencies(keys: ApiKeys | None, body_fields: Callable | None = None) -> list:
    """FastAPI route dependencies that require a valid key within its rate; none when auth is off. With
    `body_fields` (a dependency giving the parsed body) the body's `api_key` field counts too."""
    if keys is None:
        return []

    async def no_body() -> dict:
        return {}

    # async on purpose: it runs on the event loop, one request at a time, so the buckets need no lock. Depends()
    # as defaults: a local name inside Annotated[...] would not resolve under postponed annotations
    async def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(BEARER),  # noqa: B008
                          query_key: str | None = Depends(QUERY_KEY),  # noqa: B008
                          fields: dict = Depends(body_fields or no_body)) -> str:  # noqa: B008
        body_key = fields.get("api_key")
        return keys.admit(credentials.credentials if credentials else
                          body_key if isinstance(body_key, str) and body_key else query_key)

    return [Depends(require_key)]
