"""The HTTP API (FastAPI): /translate (LibreTranslate-compatible), /languages, /health, /ready, /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import schemas
from server.auth import ApiKeys, AuthError, route_dependencies
from server.engine import REQUEST_ID, Engine, EngineError, RequestError
from server.jobs import JOB_STATUSES, JobInputError, JobStore, parse_lines
from server.languages import normalise
from server.runner import JobRunner

log = logging.getLogger("landermt.http")


def create_app(engine: Engine, store: JobStore) -> FastAPI:
    metrics = engine.metrics
    runner = JobRunner(store, engine)
    keys = ApiKeys.load(engine.settings.api_keys) if engine.settings.api_keys else None  # None: no auth
    keyed = route_dependencies(keys)  # on /translate and /jobs*; health, metrics, languages and docs stay open

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
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        body = schemas.ErrorBody(error=str(error), supported=error.supported)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=error.status)

    @app.exception_handler(AuthError)
    async def auth_error(request: Request, error: AuthError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=error.status, headers=error.headers)

    @app.post("/translate", response_model=schemas.TranslateResponse,
              responses={400: {"model": schemas.ErrorBody}, 413: {"model": schemas.ErrorBody},
                         500: {"model": schemas.InternalError}}, dependencies=keyed)
    async def translate(body: schemas.TranslateRequest) -> schemas.TranslateResponse:
        started = time.monotonic()
        texts = [body.q] if isinstance(body.q, str) else body.q
        outputs = await engine.translate(texts, normalise(body.source), normalise(body.target))
        metrics.request_seconds.observe(time.monotonic() - started)
        return schemas.TranslateResponse(translatedText=outputs[0] if isinstance(body.q, str) else outputs)

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

    @app.get("/metrics")
    async def prometheus() -> Response:
        counts = store.counts_by_status()
        for status in JOB_STATUSES:
            metrics.jobs.labels(status).set(counts.get(status, 0))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/jobs", status_code=201, response_model=schemas.JobStatus,
              responses={400: {"model": schemas.ErrorBody}}, dependencies=keyed)
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

    @app.get("/jobs/{job}/results", responses={404: {"model": schemas.ErrorBody}}, dependencies=keyed)
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

    return app
