"""The torch backend: one base model, rows of different language pairs batched into one forward.

Continuous batching (landermt.decode): between decode steps, submitted rows of *any* pair join the
running batch, each prefilling only what follows its pair's prompt prefix once that prefix's KV is known
(`--prefix-reuse`); when idle it waits for the first row and gathers more for up to `max_wait_ms`. Each
step is one forward (RunningBatch.step, landermt.packing): every running row's next token and up to
`--prefill-tokens` prompt tokens of joining rows, with per-token pair ids (BLOOM: the joining rows' prefill,
then the decode step). Steps run on a dedicated worker thread; a row is reported done as soon as its
translation ends.

Threads: the worker thread sees token ids and the model, nothing else (a fast tokenizer's padding
settings are state shared by its callers, see landermt.decode); rows are reported on the event loop.
`load` runs on the worker thread too, so that it is the only thread that ever runs torch: each thread that
runs an OpenMP region keeps its own team of OpenMP threads, and with two teams there are more OpenMP threads
than cores, so libgomp stops spin-waiting between regions and every op pays for waking its threads (a decode
step at batch 1 measured 59 ms with every torch op on one thread, 87-93 ms after the model was loaded on
another; docs/BENCHMARKS.md, "Serving: reading the numbers").

Failures: if a step fails, its rows are run again one at a time, each in a batch of its own; a row that
fails alone is reported with its error, every other row as if nothing had happened (greedy outputs do
not depend on the batch).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from landermt.artifact import Artifact
from landermt.decode import PrefixCache, Request, RunningBatch
from landermt.generate import stop_token_ids
from landermt.models import load_model, resolve_dtype
from server.engine import Done, Row
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("landermt.engine")


class TorchBackend:
    def __init__(self, model, pad_token_id: int, stop_ids: list[int], routed: bool, settings: Settings,
                 metrics: Metrics, worker: ThreadPoolExecutor | None = None):
        self.model, self.pad, self.stop_ids, self.routed = model, pad_token_id, stop_ids, routed
        self.slots, self.max_wait = settings.max_batch_size, settings.max_wait_ms / 1000
        self.metrics = metrics
        self.prefixes = PrefixCache() if settings.prefix_reuse else None  # outlives a batch replaced after a failure
        self.prefill_tokens = settings.prefill_tokens or None
        self.awaiting: list[Request] = []  # in the running batch, no first token yet (time-to-first-token)
        self.worker = worker or _worker()
        self.pending: list[Row] = []  # submitted, not yet in the running batch (in the order submitted)
        self.running = self._new_batch()
        self.done: Done | None = None
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task | None = None

    @classmethod
    def load(cls, settings: Settings, artifact: Artifact | None, metrics: Metrics) -> tuple[TorchBackend, object]:
        """The backend and the model's tokenizer; the model is loaded (and patched) on the worker thread."""

        def load() -> tuple[object, object]:
            model, tokenizer = load_model(settings.model, artifact.dtype if artifact else resolve_dtype(settings.dtype))
            if artifact is not None:
                artifact.apply(model)
            return model, tokenizer

        worker = _worker()
        try:
            model, tokenizer = worker.submit(load).result()
        except BaseException:  # e.g. an artifact for another base model: no thread left behind
            worker.shutdown()
            raise
        # stop_token_ids scans the vocabulary once, here rather than in a request
        backend = cls(model, tokenizer.pad_token_id, stop_token_ids(tokenizer), artifact is not None, settings,
                      metrics, worker)
        return backend, tokenizer

    def _new_batch(self) -> RunningBatch:
        return RunningBatch(self.model, self.pad, self.stop_ids, routed=self.routed, prefixes=self.prefixes,
                            prefill_tokens=self.prefill_tokens)

    # --- the Backend protocol ------------------------------------------------------------------
    def start(self, done: Done) -> None:
        self.done, self.wake = done, asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._schedule())

    def submit(self, row: Row) -> None:
        self.pending.append(row)
        self.wake.set()

    def __len__(self) -> int:
        return len(self.pending) + len(self.running)

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.worker.shutdown(wait=True)

    @property
    def ready(self) -> bool:
        return self.task is not None and not self.task.done()

    # --- scheduling ----------------------------------------------------------------------------
    async def _gather(self) -> None:
        """Idle: wait for a row, then for more for up to `max_wait_ms` (a fuller first step)."""
        while not self.pending:
            self.wake.clear()
            await self.wake.wait()
        deadline = time.monotonic() + self.max_wait
        while len(self.pending) < self.slots and (remaining := deadline - time.monotonic()) > 0:
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), remaining)
            except TimeoutError:
                break

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not len(self.running):
                await self._gather()
            # a row too long to join this batch (sliding window) waits until the batch drains
            admitted = [row for row in self.pending if self.running.can_admit(row.prompt_tokens)]
            self.pending = [row for row in self.pending if row not in admitted]
            started = time.monotonic()
            try:
                finished = await loop.run_in_executor(self.worker, self._step, admitted)
                self.metrics.batch_seconds.observe(time.monotonic() - started)
            except Exception as error:  # find the rows that caused it: run each alone
                suspects = list({id(row): row for row in [*admitted, *(r.key for r in self.running.requests)]}.values())
                self.running, self.awaiting = self._new_batch(), []
                log.warning("engine step failed (%s: %s); running its %d rows one at a time",
                            type(error).__name__, error, len(suspects))
                finished = await loop.run_in_executor(self.worker, self._each_alone, suspects)
            for row, outcome in finished:
                self.done(row, outcome)

    def _step(self, admitted: list[Row]) -> list[tuple[Row, list[list[int]]]]:
        """Worker thread: one step of the running batch, new rows admitted (prefilled, in the same forward where the
        model can pack: RunningBatch.step); returns the rows that finished with their hypotheses."""
        if len(self.running):
            self.metrics.batch_size.observe(len(self.running))
        requests = [Request(row, row.prompt_ids, row.pair_id, row.max_new_tokens, row.beams) for row in admitted]
        self.awaiting += requests
        finished = self.running.step(requests)
        now, prefilling = time.monotonic(), {id(prefill.request) for prefill in self.running.prefilling}
        for request in self.awaiting:
            if id(request) not in prefilling:
                self.metrics.first_token_seconds.observe(now - request.key.queued_at)
        self.awaiting = [request for request in self.awaiting if id(request) in prefilling]
        return [(request.key, request.hypotheses) for request in finished]

    def _each_alone(self, rows: list[Row]) -> list[tuple[Row, list[list[int]] | Exception]]:
        """Worker thread, after a failed step: every row from the start in a batch of its own; its hypotheses,
        or the error it fails with."""
        outcomes = []
        for row in rows:
            if row.abandoned:
                outcomes.append((row, [[]]))
                continue
            batch = self._new_batch()
            request = Request(row, row.prompt_ids, row.pair_id, row.max_new_tokens, row.beams)
            try:
                batch.admit([request])
                while len(batch):
                    batch.decode()
                outcomes.append((row, request.hypotheses))
            except Exception as error:
                outcomes.append((row, error))
        return outcomes


def _worker() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="landermt-generate")
