"""python -m server --artifact DIR [--model DIR] [--host H] [--port P] ... (or LANDERMT_* variables)."""

from __future__ import annotations

import logging

import uvicorn

from server.app import create_app
from server.auth import ApiKeys, KeysFileError
from server.engine import Engine
from server.jobs import JobStore
from server.metrics import Metrics
from server.settings import Settings


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_args(argv)
    # the engine's and the API's own lines (failed rows and requests, with their request ids)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.api_keys:  # fail fast, before the model loads
        try:
            ApiKeys.load(settings.api_keys)
        except KeysFileError as error:
            raise SystemExit(f"error: {error}") from None
    engine = Engine.load(settings, Metrics())
    app = create_app(engine, JobStore(settings.jobs_db))
    uvicorn.run(app, host=settings.host, port=settings.port, timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
