"""The vLLM backend: generation by vLLM's AsyncLLM behind the front end of server/engine.py.

The front end hands over a row as soon as one of `max_batch_size` slots is free (rows beyond that
wait in its priority queue, so interactive texts still go before job lines), and vLLM batches the
running rows step by step itself.

Each row becomes one vLLM request with the routed model of landermt.vllm: its pair id in
`SamplingParams.extra_args`, `cache_salt` set to its pair (prefix caching may share KV only within a
pair), greedy decoding, the stop set of landermt.generate (EOS or any token containing a newline)
and the row's own `max_new_tokens`. Beam search is the torch backend's own (landermt.beam), driven one
token at a time through single-token requests (`_beam`). vLLM gets the prompt's token ids as the front
end tokenised them, so both backends see the same ids and produce the same tokens.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time

import torch
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from landermt.artifact import Artifact
from landermt.beam import BeamSearch
from landermt.generate import stop_token_ids
from landermt.models import resolve_dtype, resolve_model_path
from landermt.vllm import PAIR_ID_KEY, cache_salt, routed_overrides
from server.engine import Done, Row
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


class VllmBackend:
    def __init__(self, llm: AsyncLLM, stop_ids: list[int], settings: Settings, metrics: Metrics):
        self.llm, self.stop_ids, self.metrics = llm, stop_ids, metrics
        self.slots = settings.max_batch_size
        self.request_ids = itertools.count()
        self.tasks: set[asyncio.Task] = set()
        self.done: Done | None = None

    @classmethod
    def load(cls, settings: Settings, artifact: Artifact | None, metrics: Metrics,
             **options) -> tuple[VllmBackend, object]:
        """The backend and the model's tokenizer; `options` are further AsyncEngineArgs fields."""
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(settings.model), local_files_only=True)
        llm = AsyncLLM.from_engine_args(engine_args(settings, artifact, **options))
        return cls(llm, stop_token_ids(tokenizer), settings, metrics), tokenizer

    # --- the Backend protocol ------------------------------------------------------------------
    def start(self, done: Done) -> None:
        self.done = done

    def submit(self, row: Row) -> None:
        task = asyncio.get_running_loop().create_task(self._run(row))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def __len__(self) -> int:
        return len(self.tasks)

    async def stop(self) -> None:
        self.llm.shutdown()

    @property
    def ready(self) -> bool:
        return not self.llm.errored

    # --- generation ----------------------------------------------------------------------------
    def request(self, prompt_ids: list[int], pair_id: int | None, max_new_tokens: int,
                logprobs: int | None = None) -> tuple[TokensPrompt, SamplingParams]:
        """vLLM's inputs for one row: the prompt's token ids salted by pair, greedy sampling params (with
        `logprobs`: the top `logprobs` next-token log-probabilities too, raw: log-softmax of the logits)."""
        tokens = TokensPrompt(prompt_token_ids=prompt_ids, cache_salt=cache_salt(pair_id))
        params = SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=self.stop_ids,
            ignore_eos=True,  # EOS is in the stop set; the model's extra EOS ids are not (as in greedy)
            detokenize=False, output_kind=RequestOutputKind.DELTA, logprobs=logprobs,
            extra_args={PAIR_ID_KEY: pair_id} if pair_id is not None else None)
        return tokens, params

    async def _run(self, row: Row) -> None:
        """One row; only this row fails if it does."""
        try:
            hypotheses = [await self._greedy(row)] if row.beams == 1 else await self._beam(row)
        except Exception as error:
            self.done(row, error)
            return
        self.done(row, hypotheses)

    async def _greedy(self, row: Row) -> list[int]:
        """One vLLM request: vLLM batches it with every other running row, step by step."""
        tokens, params = self.request(row.prompt_ids, row.pair_id, row.max_new_tokens)
        generated: list[int] = []
        async for output in self.llm.generate(tokens, params, request_id=f"landermt-{next(self.request_ids)}"):
            new_ids = output.outputs[0].token_ids
            if new_ids and not generated:  # an output may carry no token yet: time the first that does, once
                self.metrics.first_token_seconds.observe(time.monotonic() - row.queued_at)
            generated += new_ids
        return generated

    async def _beam(self, row: Row) -> list[list[int]]:
        """The torch backend's beam search (landermt.beam), each step one single-token request per live
        hypothesis (prefix caching keeps its prompt and earlier tokens), asking for the top 2n log-probabilities:
        the n best extensions of all hypotheses are always among them, so the search keeps what it keeps over
        the whole vocabulary."""
        search = BeamSearch(row.beams, set(self.stop_ids), row.max_new_tokens)
        while not search.done:
            tops = await asyncio.gather(*(self._top(row, list(h.ids), 2 * row.beams) for h in search.live))
            if search.live == [search.live[0]] and not search.live[0].ids:
                self.metrics.first_token_seconds.observe(time.monotonic() - row.queued_at)
            vocabulary = 1 + max(token for top in tops for token in top)
            logprobs = torch.full((len(tops), vocabulary), -math.inf)
            for index, top in enumerate(tops):
                logprobs[index, list(top)] = torch.tensor(list(top.values()))
            search.step(logprobs)
        return [list(ids) for ids in search.best()]

    async def _top(self, row: Row, generated: list[int], count: int) -> dict[int, float]:
        tokens, params = self.request(row.prompt_ids + generated, row.pair_id, 1, logprobs=count)
        top: dict[int, float] = {}
        async for output in self.llm.generate(tokens, params, request_id=f"landermt-{next(self.request_ids)}"):
            for step in output.outputs[0].logprobs or []:
                top.update({token: entry.logprob for token, entry in step.items()})
        return top
