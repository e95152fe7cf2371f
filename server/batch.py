"""Offline batch translation: python -m server.batch IN.jsonl OUT.jsonl [--artifact DIR] [--model DIR] ...

Each input line is {"id", "text", "source", "target"}; OUT.jsonl gets one line per input, in order,
{"id", "translation"} or {"id", "error"}. Progress is kept in OUT.jsonl.jobs.sqlite3 (the server's
job store), so an interrupted run continues where it stopped when started again with the same
arguments, with no line lost or repeated. Takes the server's flags and LANDERMT_* variables.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from pathlib import Path

from tqdm import tqdm

from server.engine import Engine
from server.jobs import JobInputError, JobStore, parse_lines
from server.metrics import Metrics
from server.runner import JobRunner
from server.settings import Settings


async def run(source: Path, target: Path, settings: Settings) -> int:
    body = source.read_bytes()
    digest = hashlib.sha256(body).hexdigest()
    store = JobStore(str(target) + ".jobs.sqlite3")
    state = Path(str(target) + ".job.json")
    engine = Engine.load(settings, Metrics())
    job = None
    if state.exists() and json.loads(state.read_text())["input_sha256"] == digest:
        job = json.loads(state.read_text())["job"]
    if job is None or store.status(job) is None:
        job = store.create(parse_lines(body, engine.line_problem, sys.maxsize))
        state.write_text(json.dumps({"job": job, "input_sha256": digest}))
    engine.start()
    runner = JobRunner(store, engine)
    status = store.status(job)
    bar = tqdm(total=status["counts"]["total"], initial=status["counts"]["completed"] + status["counts"]["failed"],
               desc="translate", unit="line")
    while status["status"] in ("queued", "running"):
        if not await runner.step():
            break
        status = store.status(job)
        bar.n = status["counts"]["completed"] + status["counts"]["failed"]
        bar.refresh()
    bar.close()
    await engine.stop()
    partial = target.with_name(target.name + ".partial")
    partial.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in store.results(job)))
    partial.rename(target)
    store.close()
    return status["counts"]["failed"]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m server.batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    args, rest = parser.parse_known_args(argv)
    settings = Settings.from_args(rest)
    if not args.input.is_file():
        parser.error(f"{args.input}: no such file")
    try:
        failed = asyncio.run(run(args.input, args.output, settings))
    except JobInputError as error:
        parser.exit(2, f"error: {args.input}: {error}\n")
    print(f"wrote {args.output}" + (f" ({failed} lines failed)" if failed else ""))


if __name__ == "__main__":
    main()
