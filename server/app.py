"""The HTTP API (FastAPI): LibreTranslate's API (/translate, /detect, /languages, /translate_file,
/download_file, /frontend/settings; JSON or form bodies), the web page at /, jobs, /health, /ready, /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from landermt.langid import LanguageIdentifier
from landermt.prompts import LANGUAGE_NAMES
from server import schemas
from server.auth import ApiKeys, AuthError, route_dependencies
from server.bodies import BodyFields, openapi_body, parse_fields, read_fields
from server.engine import REQUEST_ID, Engine, EngineError, RequestError
from server.files import FILE_FORMATS, MEDIA_TYPES, FileError, decode, extension, render, segments, translated_name
from server.html import split_html
from server.jobs import JOB_STATUSES, JobInputError, JobStore, parse_lines
from server.languages import normalise
from server.runner import JobRunner

log = logging.getLogger("landermt.http")
WEB_PAGE = Path(__file__).parent / "static" / "index.html"


def create_app(engine: Engine, store: JobStore) -> FastAPI:
    metrics = engine.metrics
    runner = JobRunner(store, engine)
    keys = ApiKeys.load(engine.settings.api_keys) if engine.settings.api_keys else None  # None: no auth
    keyed = route_dependencies(keys)  # on /translate and /jobs*; health, metrics, languages and docs stay open
    keyed_body = route_dependencies(keys, read_fields)  # the body's api_key field counts too
    identifier = LanguageIdentifier(engine.languages)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        runner.start()
        yield
        await runner.stop()  # unrecorded job lines stay pending in SQLite and resume on restart
        await engine.stop()  # graceful: queued rows finish before the process exits
        store.close()

    app = FastAPI(title="LANDeRMT", version="0.1.0", lifespan=lifespan,
                  description="Machine translation with language-aware routed neurons (one base model).")
    app.state.api_keys = keys  # tests set its clock
    if engine.settings.cors_origins:  # browser clients on other origins (extensions, other pages); off by default
        origins = [origin.strip() for origin in engine.settings.cors_origins.split(",") if origin.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["X-Request-ID"])

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        """Every request gets an id (X-Request-ID, and in every log line about it); an error nothing else
        handled is logged with it and answered as JSON, never as plain text."""
        request_id = uuid.uuid4().hex[:12]
        token = REQUEST_ID.set(request_id)
        metrics.inflight.inc()
        try:
            response = await call_next(request)
        except Exception as error:
            log.error("request %s: %s %s failed: %s: %s", request_id, request.method, request.url.path,
                      type(error).__name__, error, exc_info=error)
            response = internal_error(request_id)
        finally:
            metrics.inflight.dec()
            REQUEST_ID.reset(token)
        endpoint = request.scope.get("route").path if request.scope.get("route") else "unmatched"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        response.headers["X-Request-ID"] = request_id
        return response

    def internal_error(request_id: str) -> JSONResponse:
        body = schemas.InternalError(error=f"internal error (request id {request_id})", id=request_id)
        return JSONResponse(body.model_dump(), status_code=500)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, error: EngineError) -> JSONResponse:
        return internal_error(error.request_id)  # the engine has logged it

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=400)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        body = schemas.ErrorBody(error=str(error), supported=error.supported)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=error.status)

    @app.exception_handler(AuthError)
    async def auth_error(request: Request, error: AuthError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=error.status, headers=error.headers)

    def detect(text: str, index: int) -> tuple[str, float]:
        found = identifier.best(text)
        if found is None:
            raise RequestError(f"cannot detect the language of text {index}: give source as one of the supported "
                               "languages", 400, engine.languages)
        return found

    async def translate_texts(texts: list[str], sources: list[str], target: str,
                              beams: int | None = None) -> list[list[str]]:
        """Every text into `target` from its own source (one engine call per source language, all at once):
        each text's distinct translations, best first."""
        groups: dict[str, list[int]] = {}
        for index, source in enumerate(sources):
            groups.setdefault(source, []).append(index)
        results = await asyncio.gather(*(engine.translate_n([texts[i] for i in indices], source, target, beams=beams)
                                         for source, indices in groups.items()))
        outputs: list[list[str]] = [[] for _ in texts]
        for indices, translated in zip(groups.values(), results, strict=True):
            for i, best in zip(indices, translated, strict=True):
                outputs[i] = best
        return outputs

    async def translate_documents(documents: list[str], sources: list[str], target: str, format: str,
                                  beams: int) -> list[list[str]]:
        """Plain texts (their distinct translations, best first), or HTML documents whose text nodes are
        translated (all in one batch) and markup kept (one translation each: alternatives of a document whose
        pieces each have several would be a product of choices)."""
        if format == "text":
            return await translate_texts(documents, sources, target, beams)
        parsed = [split_html(document) for document in documents]
        pieces = [(i, text) for i, doc in enumerate(parsed) for text in doc.texts]
        limit = engine.settings.max_texts
        chunks = [pieces[start : start + limit] for start in range(0, len(pieces), limit)]
        translated = await asyncio.gather(*(translate_texts([t for _, t in chunk], [sources[i] for i, _ in chunk],
                                                            target, beams) for chunk in chunks))
        flat = iter([best[0] for chunk in translated for best in chunk])
        return [[doc.render([next(flat) for _ in doc.texts])] for doc in parsed]

    @app.post("/translate", response_model=schemas.TranslateResponse, response_model_exclude_none=True,
              responses={400: {"model": schemas.ErrorBody}, 401: {"model": schemas.ErrorBody},
                         403: {"model": schemas.ErrorBody}, 413: {"model": schemas.ErrorBody},
                         429: {"model": schemas.ErrorBody}, 500: {"model": schemas.InternalError}},
              dependencies=keyed_body, openapi_extra=openapi_body(schemas.TranslateRequest, "TranslateRequest"))
    async def translate(fields: BodyFields) -> schemas.TranslateResponse:
        """LibreTranslate's /translate: `q` a text or a list, `source` a tag or `auto`, `format` text or html,
        `alternatives` (other translations from the beam's n-best list), `num_beams` (1: greedy)."""
        started = time.monotonic()
        body = parse_fields(schemas.TranslateRequest, fields)
        texts = [body.q] if isinstance(body.q, str) else body.q
        engine.check_texts(texts)  # empty or too many texts: before detection
        detected = None
        if body.source == "auto":
            detected = [detect(text, i) for i, text in enumerate(texts)]
            sources = [language for language, _ in detected]
        else:
            sources = [normalise(body.source)] * len(texts)
        beams = engine.beams_for(body.num_beams, body.alternatives)
        outputs = await translate_documents(texts, sources, normalise(body.target), body.format, beams)
        metrics.request_seconds.observe(time.monotonic() - started)
        one = isinstance(body.q, str)
        best = [translations[0] for translations in outputs]
        answer = schemas.TranslateResponse(translatedText=best[0] if one else best)
        if detected is not None:
            found = [schemas.DetectedLanguage(language=code, confidence=round(c, 2)) for code, c in detected]
            answer.detectedLanguage = found[0] if one else found
        if body.alternatives:
            others = [translations[1 : 1 + body.alternatives] for translations in outputs]
            answer.alternatives = others[0] if one else others
        return answer

    @app.post("/detect", response_model=list[schemas.DetectedLanguage],
              responses={400: {"model": schemas.ErrorBody}, 403: {"model": schemas.ErrorBody}},
              dependencies=keyed_body, openapi_extra=openapi_body(schemas.DetectRequest, "DetectRequest"))
    async def detect_language(fields: BodyFields) -> list[schemas.DetectedLanguage]:
        """The served languages `q` may be in, best first (at most 3, confidence 0-100). Like LibreTranslate,
        a text that gives no evidence answers its first language with confidence 0."""
        body = parse_fields(schemas.DetectRequest, fields)
        engine.check_texts([body.q])  # the same limits as a text to translate
        found = identifier.detect(body.q)[:3] or [("en" if "en" in engine.languages else engine.languages[0], 0.0)]
        return [schemas.DetectedLanguage(language=code, confidence=round(c, 2)) for code, c in found]

    @app.get("/frontend/settings", response_model=schemas.FrontendSettings)
    async def frontend_settings() -> schemas.FrontendSettings:
        """LibreTranslate's settings for web pages."""
        target = next((code for code in engine.languages if code != "en"), engine.languages[0])
        return schemas.FrontendSettings(
            charLimit=engine.settings.max_chars, frontendTimeout=500, apiKeys=keys is not None,
            keyRequired=keys is not None, suggestions=False, filesTranslation=True,
            supportedFilesFormat=list(FILE_FORMATS),
            language=schemas.FrontendLanguages(source=schemas.LanguageChoice(code="auto", name="Auto Detect"),
                                               target=schemas.LanguageChoice(code=target,
                                                                             name=LANGUAGE_NAMES.get(target, target))))

    @app.post("/translate_file", response_model=schemas.TranslateFileResponse,
              responses={400: {"model": schemas.ErrorBody}, 403: {"model": schemas.ErrorBody},
                         413: {"model": schemas.ErrorBody}},
              dependencies=keyed_body, openapi_extra=openapi_body(
                  schemas.TranslateFileRequest, "TranslateFileRequest",
                  files={"file": f"UTF-8 text: {', '.join(FILE_FORMATS)}"}))
    async def translate_file(request: Request, fields: BodyFields) -> schemas.TranslateFileResponse:
        """A .txt or .html file (multipart field `file`), translated as a job in SQLite; answered with the URL of
        the translation once the job is done (or after --file-wait-seconds: the URL answers 409 until then)."""
        body = parse_fields(schemas.TranslateFileRequest, fields)
        upload = fields.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError("invalid request: send the file as a multipart field named 'file'", 400)
        name = upload.filename or ""
        try:
            extension(name)
            document = decode(name, await upload.read(engine.settings.max_file_bytes + 1),
                              engine.settings.max_file_bytes)
            texts = segments(name, document)
        except FileError as error:
            raise RequestError(f"invalid request: {error}", error.status) from None
        if not texts:
            raise RequestError(f"invalid request: {name} has no text to translate", 400)
        source = detect(" ".join(texts)[:2000], 0)[0] if body.source == "auto" else body.source
        lines = "\n".join(json.dumps({"id": str(i), "text": text, "source": source, "target": body.target})
                          for i, text in enumerate(texts)).encode()
        try:
            parsed = parse_lines(lines, engine.line_problem, engine.settings.max_job_lines)
        except JobInputError as error:
            raise RequestError(f"file rejected: {error}", 400) from None
        job = await asyncio.to_thread(store.create, parsed, (name, document))
        runner.notify()
        deadline = time.monotonic() + (engine.settings.file_wait_seconds if body.wait else 0)
        while store.status(job)["status"] in ("queued", "running") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        url = request.url_for("download_file", job=job, filename=translated_name(name, normalise(body.target)))
        return schemas.TranslateFileResponse(translatedFileUrl=str(url))

    @app.get("/download_file/{job}/{filename}", dependencies=keyed,
             responses={200: {"content": {kind: {} for kind in sorted(set(MEDIA_TYPES.values()))}},
                        404: {"model": schemas.ErrorBody}, 409: {"model": schemas.ErrorBody}})
    async def download_file(job: str, filename: str) -> Response:
        """A translated file (attachment); 409 while its job still runs (GET /jobs/{job} shows progress)."""
        stored, status = store.file(job), store.status(job)
        if stored is None or status is None:
            raise RequestError(f"no translated file {job}/{filename}", 404)
        if status["status"] in ("queued", "running"):
            counts = status["counts"]
            raise RequestError(f"not ready: {counts['completed']} of {counts['total']} segments translated "
                               f"(GET /jobs/{job})", 409)
        name, document = stored
        results = await asyncio.to_thread(store.results, job)
        translated = render(name, document, [line.get("translation") for line in results])
        return Response(translated, media_type=MEDIA_TYPES[extension(name)],
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def web_page() -> HTMLResponse:
        """The web page: one static file, no build step (server/static/index.html)."""
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))

    @app.get("/languages", response_model=list[schemas.Language])
    async def languages() -> list[schemas.Language]:
        return [schemas.Language(**entry) for entry in engine.language_list()]

    @app.get("/health", response_model=schemas.Health)
    async def health() -> schemas.Health:
        artifact = engine.artifact
        return schemas.Health(
            status="ok", model=engine.model_name, artifact=engine.settings.artifact, routing=artifact is not None,
            mode="routed LANDeRMT pairs" if artifact else "base model, few-shot prompting (no artifact)",
            layers=artifact.manifest.layers if artifact else [], languages=engine.languages)

    @app.get("/ready", response_model=schemas.Ready)
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": engine.ready}, status_code=200 if engine.ready else 503)

    @app.get("/metrics", responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus() -> Response:
        counts = store.counts_by_status()
        for status in JOB_STATUSES:
            metrics.jobs.labels(status).set(counts.get(status, 0))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/jobs", status_code=201, response_model=schemas.JobStatus,
              responses={400: {"model": schemas.ErrorBody}}, dependencies=keyed, openapi_extra={"requestBody": {
                  "required": True, "content": {
                      "application/x-ndjson": {"schema": {"type": "string", "description": "JSON lines "
                                                          '{"id", "text", "source", "target"}'}},
                      "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                          "file": {"type": "string", "format": "binary"}}}}}}})
    async def create_job(request: Request) -> schemas.JobStatus:
        """Body: JSONL as application/x-ndjson, or a multipart upload with field `file`.
        Each line: {"id", "text", "source", "target"}."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise RequestError("multipart upload needs a file field named 'file'", 400)
            body = await upload.read()
        else:
            body = await request.body()
        try:
            lines = parse_lines(body, engine.line_problem, engine.settings.max_job_lines)
        except JobInputError as error:
            raise RequestError(f"job rejected: {error}", 400) from None
        job = await asyncio.to_thread(store.create, lines)
        runner.notify()
        return schemas.JobStatus(**store.status(job))

    def job_status(job: str) -> dict:
        status = store.status(job)
        if status is None:
            raise RequestError(f"no job {job!r}", 404)
        return status

    @app.get("/jobs/{job}", response_model=schemas.JobStatus, responses={404: {"model": schemas.ErrorBody}},
             dependencies=keyed)
    async def get_job(job: str) -> schemas.JobStatus:
        return schemas.JobStatus(**job_status(job))

    @app.get("/jobs/{job}/results", dependencies=keyed, responses={
        200: {"content": {"application/x-ndjson": {}}}, 404: {"model": schemas.ErrorBody}})
    async def job_results(job: str) -> Response:
        """JSONL in input order: {"id", "translation"}, {"id", "error"}, or {"id", "status": "pending"}."""
        job_status(job)
        lines = await asyncio.to_thread(store.results, job)
        body = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        return Response(body, media_type="application/x-ndjson")

    @app.post("/jobs/{job}/cancel", response_model=schemas.JobStatus, responses={404: {"model": schemas.ErrorBody}},
              dependencies=keyed)
    async def cancel_job(job: str) -> schemas.JobStatus:
        job_status(job)
        store.cancel(job)
        return schemas.JobStatus(**job_status(job))

    def openapi() -> dict:
        """FastAPI's document, plus the bodies read by server/bodies.py (JSON and form) with the served language
        codes as enums and the length limits, so that generated clients send what this server accepts."""
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = spec.setdefault("components", {}).setdefault("schemas", {})
        s, codes = engine.settings, list(engine.languages)
        text = {"type": "string", "minLength": 1, "maxLength": s.max_chars, "pattern": r"\S"}
        for model in (schemas.TranslateRequest, schemas.DetectRequest, schemas.TranslateFileRequest):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            properties = schema["properties"]
            if "source" in properties:
                properties["source"] = properties["source"] | {"enum": [*codes, "auto"]}
                properties["target"] = properties["target"] | {"enum": codes}
            if model is schemas.TranslateRequest:
                properties["q"] = {"description": properties["q"]["description"], "anyOf": [
                    text, {"type": "array", "items": text, "minItems": 1, "maxItems": s.max_texts}]}
            elif "q" in properties:
                properties["q"] = properties["q"] | text
            components[model.__name__] = schema
        app.openapi_schema = spec
        return spec

    app.openapi = openapi
    return app
