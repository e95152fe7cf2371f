"""Runs batch jobs through the engine at background priority, one chunk of lines at a time."""

from __future__ import annotations

import asyncio

from server.engine import BACKGROUND, REQUEST_ID, Engine, EngineError, RequestError
from server.jobs import JobStore, Line
from server.languages import normalise


class JobRunner:
    def __init__(self, store: JobStore, engine: Engine):
        self.store, self.engine = store, engine
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop taking new lines; lines not recorded yet stay pending in the database."""
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    def notify(self) -> None:
        self.wake.set()

    async def _run(self) -> None:
        while True:
            if not await self.step():
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=1.0)
                except TimeoutError:
                    pass

    async def step(self) -> bool:
        """Translate and record one chunk of pending lines; False when there are none."""
        work = await asyncio.to_thread(self.store.next_pending, self.engine.settings.max_batch_size)
        if work is None:
            return False
        job, lines = work
        outcomes = await asyncio.gather(*(self._translate(job, line) for line in lines))
        done = [(line.idx, text) for line, (text, _) in zip(lines, outcomes, strict=True) if text is not None]
        failed = [(line.idx, error) for line, (_, error) in zip(lines, outcomes, strict=True) if error is not None]
        await asyncio.to_thread(self.store.record, job, done, failed)
        self.engine.metrics.job_lines.labels("completed").inc(len(done))
        self.engine.metrics.job_lines.labels("failed").inc(len(failed))
        return True

    async def _translate(self, job: str, line: Line) -> tuple[str | None, str | None]:
        REQUEST_ID.set(f"job-{job}-{line.idx}")  # this task's own context: the engine logs failures with it
        try:
            [text] = await self.engine.translate([line.text], normalise(line.source), normalise(line.target),
                                                 BACKGROUND)
            return text, None
        except (RequestError, EngineError) as error:  # the line fails; the job goes on
            return None, str(error)
