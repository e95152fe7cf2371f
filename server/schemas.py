"""HTTP request and response schemas: LibreTranslate's fields and answers (/translate, /detect, files, settings).

Field names are LibreTranslate's (camelCase in answers). Bodies arrive as JSON or form data (server/bodies.py);
form values are strings, so numbers are parsed leniently ("3" is 3).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

API_KEY = Field(None, description="an API key (also accepted as the `api_key` query parameter or "
                                  "`Authorization: Bearer <key>`); needed only when the server has keys")


class Body(BaseModel):
    """Unknown fields are ignored, as LibreTranslate does (its web page sends `secret`, clients other extras)."""

    model_config = ConfigDict(extra="ignore")
    api_key: str | None = API_KEY


class TranslateRequest(Body):
    q: str | list[str] = Field(description="text, or a list of texts")
    source: str = Field(description="source language tag (en, de-DE, zh-Hans, ...) or `auto` to detect it")
    target: str = Field(description="target language tag")
    format: Literal["text", "html"] = Field("text", description="`html`: translate the text nodes, keep the markup")
    alternatives: int = Field(0, ge=0, le=7, description="how many other translations to return besides the best "
                                                         "(beam search of width at least alternatives + 1)")
    num_beams: int | None = Field(None, ge=1, le=8, description="1: greedy decoding; n > 1: beam search of width n "
                                                              "(default: the server's --beams)")

    @field_validator("format", mode="before")
    @classmethod
    def _empty_format_is_text(cls, value: object) -> object:
        return value or "text"  # LibreTranslate's web page and some clients send format=""


class DetectedLanguage(BaseModel):
    language: str
    confidence: float = Field(description="0-100")


class TranslateResponse(BaseModel):
    translatedText: str | list[str]  # noqa: N815  (LibreTranslate's field names)
    detectedLanguage: DetectedLanguage | list[DetectedLanguage] | None = Field(  # noqa: N815
        None, description="with source `auto`: the detected language (a list for a list `q`)")
    alternatives: list[str] | list[list[str]] | None = Field(
        None, description="with alternatives > 0: other translations, best first (a list per text for a list `q`)")


class DetectRequest(Body):
    q: str = Field(description="the text whose language to detect")


class TranslateFileRequest(Body):
    source: str = Field(description="source language tag or `auto`")
    target: str = Field(description="target language tag")
    wait: bool = Field(True, description="false: answer at once (not LibreTranslate's); follow GET /jobs/{job} "
                                         "(the job id is the URL's path segment after /download_file/)")


class TranslateFileResponse(BaseModel):
    translatedFileUrl: str  # noqa: N815


class LanguageChoice(BaseModel):
    code: str
    name: str


class FrontendLanguages(BaseModel):
    source: LanguageChoice
    target: LanguageChoice


class FrontendSettings(BaseModel):
    """LibreTranslate's /frontend/settings: what a web page needs to know about this server."""

    charLimit: int  # noqa: N815
    frontendTimeout: int  # noqa: N815
    apiKeys: bool  # noqa: N815
    keyRequired: bool  # noqa: N815
    suggestions: bool
    filesTranslation: bool  # noqa: N815
    supportedFilesFormat: list[str]  # noqa: N815
    language: FrontendLanguages


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
