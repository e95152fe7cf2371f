"""HTTP request and response schemas (LibreTranslate-compatible /translate)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class TranslateRequest(BaseModel):
    q: str | list[str] = Field(description="text, or a list of texts")
    source: str = Field(description="source language tag, e.g. en, de-DE, zh-Hans")
    target: str = Field(description="target language tag")
    format: Literal["text"] = "text"


class TranslateResponse(BaseModel):
    translatedText: str | list[str]  # noqa: N815  (LibreTranslate's field name)


class Language(BaseModel):
    code: str
    name: str
    targets: list[str]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    artifact: str | None
    routing: bool
    mode: str
    layers: list[int]
    languages: list[str]


class Ready(BaseModel):
    ready: bool


class ErrorBody(BaseModel):
    error: str
    supported: list[str] | None = None


class InternalError(BaseModel):
    """A 500: `id` is the request id, also in the X-Request-ID header and in the server's log line."""

    error: str
    id: str


class JobCounts(BaseModel):
    total: int
    completed: int
    failed: int


class JobStatus(BaseModel):
    id: str
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    counts: JobCounts
    created: float
    updated: float
    error: str | None = None
