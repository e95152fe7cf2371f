"""vLLM models with the routed CAR FFN (paper §3.3, eqs. 8–9) in the artifact's selected layers.

`RoutedMLP` replaces a selected layer's MLP. Its scale table has one row per pair plus row 0 (all
ones: the base model); row r holds, per neuron, c for language-general neurons, 1 − c for the
pair's language-specific ones and 0 for every other neuron (landermt.partition.pair_scales). Since
W(s·x) = s·(Wx) per output unit, eqs. 8–9, H = FFN_G(c·x) + FFN_S((1−c)·x), become one shared
gate/up matmul followed by a per-token scale of its outputs, gathered by pair id:

    gate_up = gate_up * table.index_select(0, pair_ids)      # before the activation

exactly as landermt.routing.RoutedFFN does for Hugging Face models (the vLLM MLPs are bias-free).
With tensor parallelism each rank's merged gate_up output is [gate shard | up shard], so each rank
keeps its shard's columns of the table, once for the gate half and once for the up half.

The routed classes subclass vLLM's Gemma 3 and Llama models. Their inner model is re-decorated
with `support_torch_compile` declaring `pair_ids` dynamic, and its forward hands `pair_ids` (one
per token, from runner.py) to every decoder layer; the selected layers' trained FFN weights from
the artifact are loaded after the base checkpoint's, through vLLM's own (sharding) weight loaders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM, Gemma3Model
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from landermt.artifact import Artifact, ArtifactError, load_artifact
from landermt.vllm import ARTIFACT_KEY, check_rule
from landermt.vllm.runner import model_state_cls

DYNAMIC_ARG_DIMS = {"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0, "pair_ids": 0}


class RoutedMLP(nn.Module):
    """A gated MLP whose neurons are scaled per token by its pair's row of the scale table (eqs. 8–9).

    Takes over the wrapped MLP's submodules under the same names, so weight names do not change.
    """

    def __init__(self, mlp: nn.Module, table: torch.Tensor):
        super().__init__()
        if mlp.gate_up_proj.bias is not None:
            raise ValueError("the vLLM routed MLP supports bias-free gate/up projections only")
        for name, child in mlp.named_children():
            self.add_module(name, child)
        size, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        shard = table.shape[1] // size
        local = table[:, rank * shard : (rank + 1) * shard]
        weight = self.gate_up_proj.weight
        self.register_buffer("scales", torch.cat([local, local], dim=1).to(weight.device, weight.dtype),
                             persistent=False)

    def forward(self, x: torch.Tensor, pair_ids: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        gate_up = gate_up * self.scales.index_select(0, pair_ids)
        x = self.act_fn(gate_up)
        x, _ = self.down_proj(x)
        return x


def _mlp(mlp: nn.Module, x: torch.Tensor, pair_ids: torch.Tensor) -> torch.Tensor:
    return mlp(x, pair_ids) if isinstance(mlp, RoutedMLP) else mlp(x)


def _attention(layer: nn.Module, positions: torch.Tensor, hidden_states: torch.Tensor,
               residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The start both families' decoder layers share: fused input norm + residual, then self-attention."""
    if residual is None:
        residual = hidden_states
        hidden_states = layer.input_layernorm(hidden_states)
    else:
        hidden_states, residual = layer.input_layernorm(hidden_states, residual)
    return layer.self_attn(positions=positions, hidden_states=hidden_states), residual


def _gemma3_layer(layer: Gemma3DecoderLayer, positions: torch.Tensor, hidden_states: torch.Tensor,
                  residual: torch.Tensor | None, pair_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma3DecoderLayer.forward (vLLM 0.32) with the MLP called with the pair ids."""
    hidden_states, residual = _attention(layer, positions, hidden_states, residual)
    hidden_states = layer.post_attention_layernorm(hidden_states)
    hidden_states, residual = layer.pre_feedforward_layernorm(hidden_states, residual)
    hidden_states = _mlp(layer.mlp, hidden_states, pair_ids)
    hidden_states = layer.post_feedforward_layernorm(hidden_states)
    return hidden_states, residual


def _llama_layer(layer: LlamaDecoderLayer, positions: torch.Tensor, hidden_states: torch.Tensor,
                 residual: torch.Tensor | None, pair_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaDecoderLayer.forward (vLLM 0.32) with the MLP called with the pair ids."""
    hidden_states, residual = _attention(layer, positions, hidden_states, residual)
    hidden_states, residual = layer.post_attention_layernorm(hidden_states, residual)
    hidden_states = _mlp(layer.mlp, hidden_states, pair_ids)
    return hidden_states, residual


def _load_artifact(vllm_config: VllmConfig) -> Artifact:
    """The artifact named by the config, checked against the model's shape."""
    config = vllm_config.model_config.hf_config
    path = getattr(config, ARTIFACT_KEY, None)
    if not path:
        raise ArtifactError(f"a LANDeRMT routed model needs `{ARTIFACT_KEY}` in its config (see routed_overrides)")
    artifact = load_artifact(path)
    check_rule(artifact.manifest.routing, str(path))
    base = artifact.manifest.base_model
    got = (config.model_type, config.num_hidden_layers, config.intermediate_size)
    if got != (base.model_type, base.num_layers, base.intermediate_size):
        raise ArtifactError(f"{path} is for a {base.model_type} model with {base.num_layers} layers of "
                            f"{base.intermediate_size} FFN neurons, got {got[0]} with {got[1]} layers of {got[2]}")
    return artifact


class _RoutedModel:
    """The inner model's routing: built with the artifact, it patches the selected layers, and runs every
    layer with the pair ids. Subclasses name their family's decoder-layer function."""

    layer_forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", artifact: Artifact):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        for index, table in artifact.partition.scale_tables().items():
            if self.start_layer <= index < self.end_layer:  # this pipeline stage's layers only
                self.layers[index].mlp = RoutedMLP(self.layers[index].mlp, table)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None, inputs_embeds: torch.Tensor | None,
                pair_ids: torch.Tensor) -> torch.Tensor | IntermediateTensors:
        pair_ids = pair_ids[: positions.shape[-1]]  # the V1 runner passes its whole buffer
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden_states, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = self.layer_forward(layer, positions, hidden_states, residual, pair_ids)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


@support_torch_compile(dynamic_arg_dims=DYNAMIC_ARG_DIMS)
class LanderMTGemma3Model(_RoutedModel, Gemma3Model):
    layer_forward = staticmethod(_gemma3_layer)


@support_torch_compile(dynamic_arg_dims=DYNAMIC_ARG_DIMS)
class LanderMTLlamaModel(_RoutedModel, LlamaModel):
    layer_forward = staticmethod(_llama_layer)


class _RoutedCausalLM:
    """What both routed causal LMs add: the pair_ids argument, artifact FFN weights, the MRV2 state."""

    artifact: Artifact
    landermt_rows: int  # scale table rows (pairs + 1): runner.py routes only models that have it

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None,
                *, pair_ids: torch.Tensor) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds, pair_ids)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The base checkpoint, then the artifact's trained FFN weights over the selected layers."""
        return super().load_weights(_with_artifact_ffn(weights, self.artifact))

    @staticmethod
    def get_model_state_cls() -> type:
        return model_state_cls()


def _with_artifact_ffn(weights: Iterable[tuple[str, torch.Tensor]],
                       artifact: Artifact) -> Iterator[tuple[str, torch.Tensor]]:
    yield from weights
    for key, tensor in (artifact.ffn or {}).items():  # "layers.i.gate_proj.weight", Hugging Face names
        _, index, name = key.split(".", 2)
        yield f"model.layers.{index}.mlp.{name}", tensor


class LanderMTGemma3ForCausalLM(_RoutedCausalLM, Gemma3ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        # Gemma3ForCausalLM.__init__ (vLLM 0.32) with the routed inner model
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.config, self.quant_config = config, vllm_config.quant_config
        self.artifact = _load_artifact(vllm_config)
        self.landermt_rows = len(self.artifact.partition.pairs) + 1
        self.model = LanderMTGemma3Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                         artifact=self.artifact)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, soft_cap=config.final_logit_softcapping)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors


class LanderMTLlamaForCausalLM(_RoutedCausalLM, LlamaForCausalLM):
    def _init_model(self, vllm_config: VllmConfig, prefix: str = "", layer_type: type[nn.Module] = LlamaDecoderLayer):
        """Called by LlamaForCausalLM.__init__ to build the inner model: the routed one."""
        self.artifact = _load_artifact(vllm_config)
        self.landermt_rows = len(self.artifact.partition.pairs) + 1
        return LanderMTLlamaModel(vllm_config=vllm_config, prefix=prefix, artifact=self.artifact)
