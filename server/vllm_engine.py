"""The vLLM engine: the torch engine's interface and request rules, generation by vLLM's AsyncLLM.

`VllmEngine` subclasses server.engine.Engine, so request checks, prompts, the per-row token cap,
the priority queue and the job interface are the torch engine's own. Only generation differs:
instead of the torch running batch, the scheduler hands each queued row to vLLM as soon as one of
`max_batch_size` slots is free, and vLLM batches the running rows step by step itself; rows beyond
that wait in the priority queue, so interactive texts still go before job lines.

Each row becomes one vLLM request with the routed model of landermt.vllm: its pair id in
`SamplingParams.extra_args`, `cache_salt` set to its pair (prefix caching may share KV only within a
pair), greedy decoding, the stop set of landermt.generate (EOS or any token containing a newline)
and the row's own `max_new_tokens`. vLLM gets the prompt's token ids, tokenized on arrival on the
event loop exactly as landermt.generate.greedy does, so both backends see the same ids and produce
the same tokens; the tokenizer is used on the event loop only (as in the torch engine).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from landermt.artifact import Artifact, load_artifact
from landermt.generate import Generation, decoded, stop_token_ids
from landermt.models import resolve_dtype, resolve_model_path
from landermt.vllm import PAIR_ID_KEY, cache_salt, routed_overrides
from server.engine import Engine, Row
from server.metrics import Metrics
from server.settings import Settings


def engine_args(settings: Settings, artifact: Artifact | None, **options) -> AsyncEngineArgs:
    """vLLM's arguments for serving `settings.model` (routed by `artifact`, if given); `options`
    are further AsyncEngineArgs fields (tests: enforce_eager, max_num_batched_tokens, ...)."""
    path = resolve_model_path(settings.model)
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    dtype = artifact.dtype if artifact else resolve_dtype(settings.dtype)
    return AsyncEngineArgs(
        model=str(path), dtype=str(dtype).removeprefix("torch."), seed=0,
        hf_overrides=routed_overrides(architecture, settings.artifact) if artifact else None,
        generation_config="vllm",  # no sampling defaults from the model's generation_config
        tensor_parallel_size=settings.tensor_parallel_size, gpu_memory_utilization=settings.gpu_memory_utilization,
        max_num_seqs=settings.max_batch_size, enable_prefix_caching=True, **options)


class InFlight:
    """The rows vLLM is generating, standing in for the torch engine's running batch (what Engine's
    `stop` uses of it: its length)."""

    def __init__(self):
        self.tasks: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self.tasks)

    def add(self, task: asyncio.Task) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class VllmEngine(Engine):
    def __init__(self, llm: AsyncLLM, tokenizer, artifact: Artifact | None, settings: Settings, metrics: Metrics,
                 model_name: str = ""):
        super().__init__(None, tokenizer, artifact, settings, metrics, model_name)
        self.llm = llm
        self.slots = asyncio.Semaphore(settings.max_batch_size)
        self.request_ids = itertools.count()

    def _new_batch(self) -> InFlight:
        return InFlight()

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics, **options) -> VllmEngine:
        artifact = load_artifact(settings.artifact) if settings.artifact else None
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(settings.model), local_files_only=True)
        llm = AsyncLLM.from_engine_args(engine_args(settings, artifact, **options))
        return cls(llm, tokenizer, artifact, settings, metrics, settings.model or "gemma-3-270m (default)")

    # --- lifecycle -----------------------------------------------------------------------------
    async def stop(self) -> None:
        """Finish every queued and running row, then stop vLLM."""
        while not self.queue.empty() or len(self.running):
            await asyncio.sleep(0.01)
        if self.scheduler:
            self.scheduler.cancel()
        self.llm.shutdown()

    @property
    def ready(self) -> bool:
        return super().ready and not self.llm.errored

    # --- generation ----------------------------------------------------------------------------
    def request(self, prompt_ids: list[int], pair_id: int | None,
                max_new_tokens: int) -> tuple[TokensPrompt, SamplingParams]:
        """vLLM's inputs for one row: the prompt's token ids salted by pair, greedy sampling params."""
        tokens = TokensPrompt(prompt_token_ids=prompt_ids, cache_salt=cache_salt(pair_id))
        params = SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=stop_token_ids(self.tokenizer),
            ignore_eos=True,  # EOS is in the stop set; the model's extra EOS ids are not (as in greedy)
            detokenize=False, output_kind=RequestOutputKind.DELTA,
            extra_args={PAIR_ID_KEY: pair_id} if pair_id is not None else None)
        return tokens, params

    async def generate(self, prompt_ids: list[int], pair_id: int | None, max_new_tokens: int,
                       arrived: float | None = None) -> Generation:
        """Translate one prompt; `arrived` (time.monotonic()) is when its text came in: the time to
        its first token is observed from then."""
        tokens, params = self.request(prompt_ids, pair_id, max_new_tokens)
        generated: list[int] = []
        first = True
        async for output in self.llm.generate(tokens, params, request_id=f"landermt-{next(self.request_ids)}"):
            if first and arrived is not None:
                self.metrics.first_token_seconds.observe(time.monotonic() - arrived)
            first = False
            generated += output.outputs[0].token_ids
        return decoded(self.tokenizer, len(prompt_ids), generated)

    # --- scheduling ----------------------------------------------------------------------------
    async def _schedule(self) -> None:
        while True:
            await self.slots.acquire()
            row = await self.queue.get()
            self.metrics.queued.set(self.queue.qsize())
            self.metrics.queue_seconds.observe(time.monotonic() - row.queued_at)
            self.running.add(asyncio.get_running_loop().create_task(self._run(row)))

    async def _run(self, row: Row) -> None:
        try:
            generation = await self.generate(row.prompt_ids, row.pair_id, row.max_new_tokens, row.queued_at)
        except Exception as error:  # vLLM runs each row as a request of its own: only this one fails
            self._fail(row, error)
            return
        finally:
            self.slots.release()
        self._finish(row, generation)
