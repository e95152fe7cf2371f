"""The torch engine: one base model, rows of different language pairs batched into one forward.

Requests are split into rows (one per text) and queued by priority (interactive before job lines).
A scheduler task runs continuous batching (landermt.decode): between decode steps it admits
waiting rows of *any* pair into the running batch, up to `max_batch_size` rows; when idle it waits
for the first row and gathers more for up to `max_wait_ms`. Each step (prefill of the admitted
rows, then one decode step for all rows with per-row pair ids) runs on a dedicated worker thread;
a row's future resolves as soon as its translation ends, and a request returns when all of its
rows are done. No request waits for another pair's batch or for longer translations to finish.

Threads: the tokenizer is used on the event-loop thread only (prompts are tokenised on arrival,
finished rows decoded there); the worker thread sees token ids and the model, nothing else (a fast
tokenizer's padding settings are state shared by its callers, see landermt.decode).

Failures: if a step fails, its rows are run again one at a time on the worker, each in a batch of
its own; a row that fails alone fails its request (a 500 with the request id, one log line), every
other row is answered as if nothing had happened (greedy outputs do not depend on the batch).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field

from landermt.artifact import Artifact, load_artifact
from landermt.decode import Request, RunningBatch
from landermt.generate import Generation, decoded, stop_token_ids
from landermt.models import load_model, resolve_dtype
from landermt.prompts import DEFAULT_TEMPLATE, LANGUAGE_NAMES, few_shot_prefix, render_prompt
from server.languages import normalise
from server.metrics import Metrics
from server.settings import Settings

# Worked examples for serving the base model without an artifact (few-shot prompting).
FEW_SHOT = {
    "en": ("The weather is nice today.", "Where is the train station?"),
    "de": ("Das Wetter ist heute schön.", "Wo ist der Bahnhof?"),
    "fr": ("Il fait beau aujourd'hui.", "Où est la gare ?"),
    "it": ("Oggi il tempo è bello.", "Dov'è la stazione ferroviaria?"),
    "ar": ("الطقس جميل اليوم.", "أين محطة القطار؟"),
    "zh": ("今天天气很好。", "火车站在哪里？"),
    "es": ("Hoy hace buen tiempo.", "¿Dónde está la estación de tren?"),
}


class RequestError(ValueError):
    """A request the engine cannot serve; `status` is the HTTP code, `supported` the known languages."""

    def __init__(self, message: str, status: int = 400, supported: list[str] | None = None):
        super().__init__(message)
        self.status, self.supported = status, supported


class EngineError(RuntimeError):
    """A row that failed inside the engine (logged with its request id); the HTTP answer is a JSON 500."""

    def __init__(self, request_id: str):
        super().__init__(f"internal error: the translation failed (request id {request_id})")
        self.request_id = request_id


# The id of the HTTP request (or job line) being served: set by the app's middleware and the job runner,
# carried by every row into the engine's log lines.
REQUEST_ID: ContextVar[str] = ContextVar("landermt_request_id", default="-")
log = logging.getLogger("landermt.engine")

INTERACTIVE, BACKGROUND = 0, 1  # queue priorities: interactive requests go before job lines


@dataclass(order=True)
class Row:
    priority: int
    sequence: int
    prompt_ids: list[int] = field(compare=False)
    pair_id: int | None = field(compare=False)
    pair: str = field(compare=False)
    max_new_tokens: int = field(compare=False)
    future: asyncio.Future = field(compare=False)
    request_id: str = field(default_factory=REQUEST_ID.get, compare=False)
    queued_at: float = field(default_factory=time.monotonic, compare=False)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


class Engine:
    def __init__(self, model, tokenizer, artifact: Artifact | None, settings: Settings, metrics: Metrics,
                 model_name: str = ""):
        self.model, self.tokenizer, self.artifact = model, tokenizer, artifact
        self.settings, self.metrics, self.model_name = settings, metrics, model_name
        self.languages = list(artifact.manifest.languages) if artifact else sorted(FEW_SHOT)
        self.template = artifact.manifest.prompt_template if artifact else DEFAULT_TEMPLATE
        self.queue: asyncio.PriorityQueue[Row] = asyncio.PriorityQueue()
        self.sequence = itertools.count()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="landermt-generate")
        self.scheduler: asyncio.Task | None = None
        self.stop_ids = stop_token_ids(tokenizer)  # scans the vocabulary once, here rather than in a request
        self.running = self._new_batch()

    def _new_batch(self) -> RunningBatch:
        """The running batch of continuous batching (another backend supplies its own)."""
        return RunningBatch(self.model, self.tokenizer.pad_token_id, self.stop_ids, routed=self.artifact is not None)

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics) -> Engine:
        artifact = load_artifact(settings.artifact) if settings.artifact else None
        model, tokenizer = load_model(settings.model, artifact.dtype if artifact else resolve_dtype(settings.dtype))
        if artifact is not None:
            artifact.apply(model)
        return cls(model, tokenizer, artifact, settings, metrics, settings.model or "gemma-3-270m (default)")

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self.scheduler = asyncio.get_running_loop().create_task(self._schedule())

    async def stop(self) -> None:
        """Finish every queued and running row, then stop."""
        while not self.queue.empty() or len(self.running):
            await asyncio.sleep(0.01)
        if self.scheduler:
            self.scheduler.cancel()
        self.worker.shutdown(wait=True)

    @property
    def ready(self) -> bool:
        return self.scheduler is not None and not self.scheduler.done()

    # --- requests ------------------------------------------------------------------------------
    def check_pair(self, source: str, target: str) -> None:
        """Both languages served (source = target is allowed: the text comes back unchanged, as LibreTranslate
        does)."""
        for code in (source, target):
            if code not in self.languages:
                raise RequestError(f"unsupported language {code!r}", 400, self.languages)

    def prompt(self, source: str, target: str, text: str) -> str:
        shots = [] if self.artifact else list(zip(FEW_SHOT[source], FEW_SHOT[target], strict=True))
        prefix = few_shot_prefix(self.template, source, target, shots)
        return prefix + render_prompt(self.template, source, target, text)

    def check_texts(self, texts: list[str]) -> list[int]:
        """Token counts of `texts`; raises RequestError for empty, too many or too long texts."""
        s = self.settings
        if not texts:
            raise RequestError("no text to translate", 400)
        if len(texts) > s.max_texts:
            raise RequestError(f"{len(texts)} texts in one request; the limit is {s.max_texts}", 413)
        lengths = []
        for index, text in enumerate(texts):
            if not text.strip():
                raise RequestError(f"text {index} is empty", 400)
            if len(text) > s.max_chars:
                raise RequestError(f"text {index} has {len(text)} characters; the limit is {s.max_chars}", 413)
            lengths.append(len(self.tokenizer(text, add_special_tokens=False).input_ids))
            if lengths[-1] > s.max_tokens:
                raise RequestError(f"text {index} has {lengths[-1]} tokens; the limit is {s.max_tokens}", 413)
        return lengths

    def line_problem(self, text: str, source: str, target: str) -> str | None:
        """Why a job line cannot be translated, or None (tags are normalised first)."""
        try:
            self.check_pair(normalise(source), normalise(target))
            self.check_texts([text])
        except RequestError as error:
            return str(error).replace("text 0 ", "text ")
        return None

    async def translate(self, texts: list[str], source: str, target: str, priority: int = INTERACTIVE) -> list[str]:
        self.check_pair(source, target)
        lengths = self.check_texts(texts)
        if source == target:
            return list(texts)
        s = self.settings
        pair_id = self.artifact.partition.pair_id(source, target) if self.artifact else None
        loop = asyncio.get_running_loop()
        prompt_ids = [self.tokenizer(self.prompt(source, target, text)).input_ids for text in texts]
        rows = [Row(priority, next(self.sequence), ids, pair_id, f"{source}-{target}",
                    min(s.max_new_tokens, 2 * n + 16), loop.create_future())
                for ids, n in zip(prompt_ids, lengths, strict=True)]
        for row in rows:
            self.queue.put_nowait(row)
        self.metrics.queued.set(self.queue.qsize())
        return list(await asyncio.gather(*(row.future for row in rows)))

    # --- scheduling ----------------------------------------------------------------------------
    async def _first_rows(self) -> list[Row]:
        """Idle: wait for a row, then gather more for up to `max_wait_ms` (a fuller first step)."""
        rows = [await self.queue.get()]
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000
        while len(rows) < self.settings.max_batch_size and (remaining := deadline - time.monotonic()) > 0:
            try:
                rows.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return rows

    def _waiting_rows(self, room: int) -> list[Row]:
        """Running: whatever is queued now, up to `room` rows, without waiting."""
        rows = []
        while len(rows) < room and not self.queue.empty():
            rows.append(self.queue.get_nowait())
        return rows

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if len(self.running):
                candidates = self._waiting_rows(self.settings.max_batch_size - len(self.running))
            else:
                candidates = await self._first_rows()
            admitted = [row for row in candidates if self.running.can_admit(row.prompt_tokens)]
            for row in candidates:
                if row not in admitted:  # too long to join this batch: it goes first once the batch drains
                    self.queue.put_nowait(row)
            self.metrics.queued.set(self.queue.qsize())
            started = time.monotonic()
            for row in admitted:
                self.metrics.queue_seconds.observe(started - row.queued_at)
            try:
                finished = await loop.run_in_executor(self.worker, self._step, admitted)
                self.metrics.batch_seconds.observe(time.monotonic() - started)
            except Exception as error:  # find the rows that caused it: run each alone
                suspects = list({id(row): row for row in [*admitted, *(r.key for r in self.running.rows)]}.values())
                self.running = self._new_batch()
                log.warning("engine step failed (%s: %s); running its %d rows one at a time",
                            type(error).__name__, error, len(suspects))
                finished = await loop.run_in_executor(self.worker, self._each_alone, suspects)
            for row, outcome in finished:
                if isinstance(outcome, Exception):
                    self._fail(row, outcome)
                else:
                    self._finish(row, decoded(self.tokenizer, row.prompt_tokens, outcome))

    def _step(self, admitted: list[Row]) -> list[tuple[Row, list[int]]]:
        """Worker thread: admit (prefill) new rows, then one decode step for the whole running batch;
        returns the rows that finished with their generated ids."""
        finished = self.running.admit([Request(row, row.prompt_ids, row.pair_id, row.max_new_tokens)
                                       for row in admitted]) if admitted else []
        now = time.monotonic()
        for row in admitted:
            self.metrics.first_token_seconds.observe(now - row.queued_at)
        if len(self.running):
            self.metrics.batch_size.observe(len(self.running))
            finished += self.running.decode()
        return [(request.key, request.new) for request in finished]

    def _each_alone(self, rows: list[Row]) -> list[tuple[Row, list[int] | Exception]]:
        """Worker thread, after a failed step: every row from the start in a batch of its own; the ids it
        generates, or the error it fails with."""
        outcomes = []
        for row in rows:
            if row.future.done():  # the client went away
                continue
            batch, request = self._new_batch(), Request(row, row.prompt_ids, row.pair_id, row.max_new_tokens)
            try:
                batch.admit([request])
                while len(batch):
                    batch.decode()
                outcomes.append((row, request.new))
            except Exception as error:
                outcomes.append((row, error))
        return outcomes

    def _finish(self, row: Row, generation: Generation) -> None:
        self.metrics.translations.labels(row.pair).inc()
        self.metrics.input_tokens.labels(row.pair).inc(generation.prompt_tokens)
        self.metrics.generated_tokens.labels(row.pair).inc(generation.new_tokens)
        if not row.future.done():  # the client may have gone away
            row.future.set_result(generation.text)

    def _fail(self, row: Row, error: Exception) -> None:
        """One log line with the request id; the request gets a 500 naming that id."""
        log.error("request %s: translation (%s) failed: %s: %s", row.request_id, row.pair, type(error).__name__,
                  error)
        if not row.future.done():
            row.future.set_exception(EngineError(row.request_id))

    def language_list(self) -> list[dict]:
        return [{"code": code, "name": LANGUAGE_NAMES.get(code, code),
                 "targets": [t for t in self.languages if t != code]} for code in self.languages]
