"""The serving front end: one place for what every request goes through, whichever backend generates.

`Engine` checks requests (languages, texts, limits), normalises language tags, builds and tokenises
prompts (each text once, landermt.prompts.PromptEncoder), queues rows by priority (interactive
before job lines), keeps the metrics and resolves each row's future. Generation is a `Backend`'s:
the torch engine (server/torch_backend.py: continuous batching of routed rows) or vLLM
(server/vllm_backend.py). A backend takes rows through `submit` and reports each finished row through
the `done` callback it was started with; the front end submits a row only when the backend has a free
slot, so the priority queue here decides which row runs next. This is the shape of vLLM's serving
layer over its engine client: neither backend knows about HTTP, prompts or other backends.

A request is split into rows (one per text); it returns when all of its rows are done. A row that fails
in the backend fails its request (a 500 naming the request id, one log line); other rows go on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

from landermt.artifact import Artifact, load_artifact
from landermt.generate import decoded
from landermt.partition import UnsupportedLanguage, check_pair
from landermt.prompts import DEFAULT_TEMPLATE, LANGUAGE_NAMES, PromptEncoder, new_token_budget
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


def few_shot_examples(source: str, target: str) -> list[tuple[str, str]]:
    return list(zip(FEW_SHOT[source], FEW_SHOT[target], strict=True))


class RequestError(ValueError):
    """A request the engine cannot serve; `status` is the HTTP code, `supported` the known languages."""

    def __init__(self, message: str, status: int = 400, supported: list[str] | None = None):
        super().__init__(message)
        self.status, self.supported = status, supported


class EngineError(RuntimeError):
    """A row that failed inside the backend (logged with its request id); the HTTP answer is a JSON 500."""

    def __init__(self, request_id: str):
        super().__init__(f"internal error: the translation failed (request id {request_id})")
        self.request_id = request_id


# The id of the HTTP request (or job line) being served: set by the app's middleware and the job runner,
# carried by every row into the log lines.
REQUEST_ID: ContextVar[str] = ContextVar("landermt_request_id", default="-")
log = logging.getLogger("landermt.engine")

INTERACTIVE, BACKGROUND = 0, 1  # queue priorities: interactive requests go before job lines


@dataclass(order=True)
class Row:
    """One text to translate, as a backend sees it: token ids, the pair id that routes it (None: no
    routing) and its new-token budget. `first_token_at` is set by the backend (time-to-first-token)."""

    priority: int
    sequence: int
    prompt_ids: list[int] = field(compare=False)
    pair_id: int | None = field(compare=False)
    pair: str = field(compare=False)
    max_new_tokens: int = field(compare=False)
    future: asyncio.Future = field(compare=False)
    beams: int = field(default=1, compare=False)  # 1: greedy; n: beam search of width n, n-best returned
    request_id: str = field(default_factory=REQUEST_ID.get, compare=False)
    queued_at: float = field(default_factory=time.monotonic, compare=False)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def abandoned(self) -> bool:
        """The client went away: a backend may skip the row."""
        return self.future.done()


Done = Callable[[Row, "list[list[int]] | Exception"], None]


class Backend(Protocol):
    """What generates: rows in (`submit`), out through `done` on the event loop's thread: a row's hypotheses
    (generated ids up to and including the token that stopped each; one for greedy, the n best for a beam
    of width n, best first) or its error."""

    slots: int  # rows it runs at once; the front end never submits more

    def start(self, done: Done) -> None: ...

    def submit(self, row: Row) -> None: ...

    def __len__(self) -> int: ...  # rows submitted and not yet done

    async def stop(self) -> None: ...  # after the front end has drained: release threads, processes

    @property
    def ready(self) -> bool: ...


class Engine:
    def __init__(self, backend: Backend, tokenizer, artifact: Artifact | None, settings: Settings,
                 metrics: Metrics, model_name: str = ""):
        self.backend, self.tokenizer, self.artifact = backend, tokenizer, artifact
        self.settings, self.metrics, self.model_name = settings, metrics, model_name
        self.languages = list(artifact.manifest.languages) if artifact else sorted(FEW_SHOT)
        template = artifact.manifest.prompt_template if artifact else DEFAULT_TEMPLATE
        self.prompts = PromptEncoder(tokenizer, template, (lambda s, t: []) if artifact else few_shot_examples)
        self.queue: asyncio.PriorityQueue[Row] = asyncio.PriorityQueue()
        self.sequence = itertools.count()
        self.free: asyncio.Semaphore | None = None  # the backend's free slots (made on the running loop)
        self.dispatcher: asyncio.Task | None = None

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics, **backend_options) -> Engine:
        """The model, artifact and backend `settings` name; `backend_options` go to the backend's loader
        (vLLM: further engine arguments)."""
        artifact = load_artifact(settings.artifact) if settings.artifact else None
        if settings.backend == "vllm":
            from server.vllm_backend import VllmBackend  # imports vLLM: only when asked for

            backend, tokenizer = VllmBackend.load(settings, artifact, metrics, **backend_options)
        else:
            from server.torch_backend import TorchBackend

            backend, tokenizer = TorchBackend.load(settings, artifact, metrics)
        return cls(backend, tokenizer, artifact, settings, metrics, settings.model or "gemma-3-270m (default)")

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self.free = asyncio.Semaphore(self.backend.slots)
        self.backend.start(self._done)
        self.dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    async def stop(self) -> None:
        """Finish every queued and running row, then stop."""
        while not self.queue.empty() or len(self.backend):
            await asyncio.sleep(0.01)
        if self.dispatcher:
            self.dispatcher.cancel()
        await self.backend.stop()

    @property
    def ready(self) -> bool:
        return self.dispatcher is not None and not self.dispatcher.done() and self.backend.ready

    # --- requests ------------------------------------------------------------------------------
    def check_pair(self, source: str, target: str) -> None:
        """Both languages served (source = target is allowed: the text comes back unchanged, as LibreTranslate
        does)."""
        try:
            check_pair(self.languages, source, target)
        except UnsupportedLanguage as error:
            raise RequestError(f"unsupported language {error.code!r}", 400, self.languages) from None

    def check_texts(self, texts: list[str]) -> None:
        """Raises RequestError for no texts, too many, an empty or a too long one (characters; tokens are
        counted when the prompt is built, `encode`)."""
        s = self.settings
        if not texts:
            raise RequestError("no text to translate", 400)
        if len(texts) > s.max_texts:
            raise RequestError(f"{len(texts)} texts in one request; the limit is {s.max_texts}", 413)
        for index, text in enumerate(texts):
            if not text.strip():
                raise RequestError(f"text {index} is empty", 400)
            if len(text) > s.max_chars:
                raise RequestError(f"text {index} has {len(text)} characters; the limit is {s.max_chars}", 413)

    def encode(self, texts: list[str], source: str, target: str) -> list[tuple[list[int], int]]:
        """Per text: its prompt's token ids and its new-token budget; each text is tokenised once, here.
        Raises RequestError for a text over the token limit."""
        encoded = []
        for index, text in enumerate(texts):
            prompt = self.prompts.encode(source, target, text)
            if prompt.source_tokens > self.settings.max_tokens:
                raise RequestError(f"text {index} has {prompt.source_tokens} tokens; the limit is "
                                   f"{self.settings.max_tokens}", 413)
            encoded.append((prompt.ids, new_token_budget(prompt.source_tokens, self.settings.max_new_tokens)))
        return encoded

    def line_problem(self, text: str, source: str, target: str) -> str | None:
        """Why a job line cannot be translated, or None (tags are normalised first)."""
        try:
            source, target = normalise(source), normalise(target)
            self.check_pair(source, target)
            self.check_texts([text])
            self.encode([text], source, target)
        except RequestError as error:
            return str(error).replace("text 0 ", "text ")
        return None

    def beams_for(self, num_beams: int | None, alternatives: int) -> int:
        """The beam width a request runs with: its own or the server's default, wide enough for `alternatives`."""
        beams = max(num_beams or self.settings.beams, alternatives + 1)
        if beams > self.settings.max_beams:
            raise RequestError(f"a beam of width {beams} was asked for; the limit is {self.settings.max_beams}", 400)
        return beams

    async def translate(self, texts: list[str], source: str, target: str, priority: int = INTERACTIVE) -> list[str]:
        """Each text's translation, with the server's default decoding."""
        return [best[0] for best in await self.translate_n(texts, source, target, priority)]

    async def translate_n(self, texts: list[str], source: str, target: str, priority: int = INTERACTIVE,
                          beams: int | None = None) -> list[list[str]]:
        """Each text's distinct translations, best first (one with greedy decoding, up to `beams` with beam
        search; default: the server's --beams)."""
        self.check_pair(source, target)
        self.check_texts(texts)
        if source == target:
            return [[text] for text in texts]
        encoded = self.encode(texts, source, target)
        pair_id = self.artifact.partition.pair_id(source, target) if self.artifact else None
        loop = asyncio.get_running_loop()
        rows = [Row(priority, next(self.sequence), ids, pair_id, f"{source}-{target}", budget, loop.create_future(),
                    beams or self.settings.beams) for ids, budget in encoded]
        for row in rows:
            self.queue.put_nowait(row)
        self.metrics.queued.set(self.queue.qsize())
        return list(await asyncio.gather(*(row.future for row in rows)))

    # --- dispatch ------------------------------------------------------------------------------
    async def _dispatch(self) -> None:
        """Hand the best queued row to the backend whenever it has a free slot."""
        while True:
            await self.free.acquire()
            row = await self.queue.get()
            self.metrics.queued.set(self.queue.qsize())
            self.metrics.queue_seconds.observe(time.monotonic() - row.queued_at)
            self.backend.submit(row)

    def _done(self, row: Row, outcome: list[list[int]] | Exception) -> None:
        self.free.release()
        if isinstance(outcome, Exception):
            self._fail(row, outcome)
            return
        generations = [decoded(self.tokenizer, row.prompt_tokens, ids) for ids in outcome]
        best = generations[0]
        self.metrics.translations.labels(row.pair).inc()
        self.metrics.input_tokens.labels(row.pair).inc(best.prompt_tokens)
        self.metrics.generated_tokens.labels(row.pair).inc(best.new_tokens)
        if not row.future.done():  # the client may have gone away
            row.future.set_result(list(dict.fromkeys(g.text for g in generations)))  # distinct texts, best first

    def _fail(self, row: Row, error: Exception) -> None:
        """One log line with the request id; the request gets a 500 naming that id."""
        log.error("request %s: translation (%s) failed: %s: %s", row.request_id, row.pair, type(error).__name__,
                  error)
        if not row.future.done():
            row.future.set_exception(EngineError(row.request_id))

    def language_list(self) -> list[dict]:
        return [{"code": code, "name": LANGUAGE_NAMES.get(code, code),
                 "targets": [t for t in self.languages if t != code]} for code in self.languages]
