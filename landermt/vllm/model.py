"""vLLM models routed by an artifact in its selected layers, under either rule of landermt.routing.

Rule `mask` (the paper's routed CAR FFN, §3.3, eqs. 8–9): `RoutedMLP` replaces a selected layer's MLP.
Its scale table has one row per pair plus row 0 (all ones: the base model); row r holds, per neuron, c for
language-general neurons, 1 − c for the pair's language-specific ones and 0 for every other neuron
(landermt.partition.pair_scales). Since W(s·x) = s·(Wx) per output unit, eqs. 8–9,
H = FFN_G(c·x) + FFN_S((1−c)·x), become one shared gate/up matmul followed by a per-token scale of its
outputs, gathered by pair id:

    gate_up = gate_up * table.index_select(0, pair_ids)      # before the activation

exactly as landermt.routing.RoutedFFN does for Hugging Face models (the vLLM MLPs are bias-free).
With tensor parallelism each rank's merged gate_up output is [gate shard | up shard], so each rank
keeps its shard's columns of the table, once for the gate half and once for the up half.

Rule `delta` (route the update): `DeltaMLP`, the computation of landermt.routing.DeltaFFN. The general
neurons' update is merged into the loaded base weights once (W + Δ·[G], shared by every pair); per token the
specific neurons' update is added, weighted by the pair's row of `uses` (1: its own languages' neurons):

    gate_up = (W + Δ·[G]) x;  gate_up[S] += uses[pair] ⊙ (Δ_S x)
    y       = (W_d + Δ_d·[G]) h + Δ_d,S (uses[pair] ⊙ h_S)

Each tensor-parallel rank keeps the specific neurons of its shard; the down correction is summed across
ranks like the down projection. Pair id 0 (the unpatched base) would need the unmerged weights, a second full
pass: a delta artifact's vLLM model serves its pairs only (ids 1 … pairs), and refuses 0. For the same reason an
attention update (landermt.routing.AttentionUpdate: every pair's, language-general) is simply added to the
checkpoint's attention weights as they stream into vLLM's own loaders (`_with_attention_update`).

The routed classes subclass vLLM's Gemma 3 and Llama models. Their inner model is re-decorated
with `support_torch_compile` declaring `pair_ids` dynamic, and its forward hands `pair_ids` (one
per token, from runner.py) to every decoder layer; the selected layers' trained FFN weights from
the artifact are loaded after the base checkpoint's, through vLLM's own (sharding) weight loaders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM, Gemma3Model
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from landermt.artifact import Artifact, ArtifactError, attention_keys, load_artifact
from landermt.families import family_named
from landermt.partition import delta_tables
from landermt.vllm import ARTIFACT_KEY
from landermt.vllm.runner import model_state_cls

DYNAMIC_ARG_DIMS = {"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0, "pair_ids": 0}


def _take_over(routed: nn.Module, mlp: nn.Module) -> tuple[int, int]:
    """`routed` holds `mlp`'s submodules under their names (weight names unchanged); returns this
    tensor-parallel rank's neuron range [start, end)."""
    if mlp.gate_up_proj.bias is not None:
        raise ValueError("the vLLM routed MLP supports bias-free gate/up projections only")
    for name, child in mlp.named_children():
        routed.add_module(name, child)
    local = mlp.down_proj.weight.shape[1]  # this rank's neurons
    rank = get_tensor_model_parallel_rank()
    return rank * local, (rank + 1) * local


class RoutedMLP(nn.Module):
    """Rule mask: a gated MLP whose neurons are scaled per token by its pair's row of the scale table (eqs. 8–9)."""

    def __init__(self, mlp: nn.Module, table: torch.Tensor):
        super().__init__()
        start, end = _take_over(self, mlp)
        local = table[:, start:end]
        weight = self.gate_up_proj.weight
        self.register_buffer("scales", torch.cat([local, local], dim=1).to(weight.device, weight.dtype),
                             persistent=False)

    def forward(self, x: torch.Tensor, pair_ids: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        gate_up = gate_up * self.scales.index_select(0, pair_ids)
        x = self.act_fn(gate_up)
        x, _ = self.down_proj(x)
        return x


class DeltaMLP(nn.Module):
    """Rule delta: the base MLP with the general update merged into its weights (`load_update`) and the
    specific neurons' update added per token by its pair's row of `uses` (landermt.routing.DeltaFFN)."""

    def __init__(self, mlp: nn.Module, general: torch.Tensor, specific: torch.Tensor, uses: torch.Tensor):
        super().__init__()
        self.start, self.end = _take_over(self, mlp)
        weight = self.gate_up_proj.weight
        mine = (specific >= self.start) & (specific < self.end)
        local = specific[mine] - self.start
        p, d, s = self.end - self.start, weight.shape[1], len(local)
        self.register_buffer("general", general[self.start : self.end].to(weight.device, weight.dtype),
                             persistent=False)
        self.register_buffer("specific", local.to(weight.device), persistent=False)
        self.register_buffer("gate_up_specific", torch.cat([local, local + p]).to(weight.device), persistent=False)
        self.register_buffer("uses", uses[:, mine].to(weight.device, weight.dtype), persistent=False)
        # the specific neurons' update, zero until load_update: [gate rows; up rows] and the down columns
        self.register_buffer("delta_gate_up", weight.new_zeros(2 * s, d), persistent=False)
        self.register_buffer("delta_down", weight.new_zeros(d, s), persistent=False)

    @torch.no_grad()
    def load_update(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Merge the general neurons' update (Hugging Face layout: gate, up [p, d], down [d, p]) into the loaded
        weights, W + Δ·[G] in the weights' dtype as DeltaFFN computes it, and keep the specific neurons' update."""
        dtype, rows = self.general.dtype, slice(self.start, self.end)
        gate, up, down = (t.to(self.general.device, dtype) for t in (gate[rows], up[rows], down[:, rows]))
        p = self.end - self.start
        g = self.general
        self.gate_up_proj.weight[:p] += gate * g[:, None]
        self.gate_up_proj.weight[p:] += up * g[:, None]
        self.down_proj.weight += down * g[None, :]
        self.delta_gate_up.copy_(torch.cat([gate[self.specific], up[self.specific]]))
        self.delta_down.copy_(down[:, self.specific])

    def forward(self, x: torch.Tensor, pair_ids: torch.Tensor) -> torch.Tensor:
        uses = self.uses.index_select(0, pair_ids)  # [tokens, specific]
        gate_up, _ = self.gate_up_proj(x)
        added = torch.cat([uses, uses], dim=-1) * F.linear(x, self.delta_gate_up)
        h = self.act_fn(gate_up.index_add(-1, self.gate_up_specific, added))
        y, _ = self.down_proj(h)
        correction = F.linear(uses * h.index_select(-1, self.specific), self.delta_down)
        if get_tensor_model_parallel_world_size() > 1:
            correction = tensor_model_parallel_all_reduce(correction)
        return y + correction


def _mlp(mlp: nn.Module, x: torch.Tensor, pair_ids: torch.Tensor) -> torch.Tensor:
    return mlp(x, pair_ids) if isinstance(mlp, (RoutedMLP, DeltaMLP)) else mlp(x)


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
        delta = artifact.manifest.routing == "delta"
        tables = delta_tables(artifact.partition) if delta else artifact.partition.scale_tables()
        for index, table in tables.items():
            if self.start_layer <= index < self.end_layer:  # this pipeline stage's layers only
                mlp = self.layers[index].mlp
                self.layers[index].mlp = DeltaMLP(mlp, *table) if delta else RoutedMLP(mlp, table)

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
    landermt_rows: int  # routing table rows (pairs + 1): runner.py routes only models that have it
    landermt_first_row: int  # the lowest pair id served: 0 (the base) under rule mask, 1 under delta

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None,
                *, pair_ids: torch.Tensor) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds, pair_ids)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The base checkpoint, then the artifact's weights: rule mask, its trained FFN weights over the selected
        layers; rule delta, its update merged into (and kept beside) the loaded weights."""
        loaded = super().load_weights(_with_attention_update(_with_artifact_ffn(weights, self.artifact),
                                                             self.artifact))
        update = self.artifact.update or {}
        for index, layer in enumerate(self.model.layers):
            if isinstance(layer.mlp, DeltaMLP) and update:
                layer.mlp.load_update(*(update[f"layers.{index}.{name}.weight"]
                                        for name in ("gate_proj", "up_proj", "down_proj")))
        return loaded

    def _set_artifact(self, vllm_config: VllmConfig) -> None:
        self.artifact = _load_artifact(vllm_config)
        self.landermt_rows = len(self.artifact.partition.pairs) + 1
        self.landermt_first_row = 1 if self.artifact.manifest.routing == "delta" else 0

    @staticmethod
    def get_model_state_cls() -> type:
        return model_state_cls()


def _with_artifact_ffn(weights: Iterable[tuple[str, torch.Tensor]],
                       artifact: Artifact) -> Iterator[tuple[str, torch.Tensor]]:
    yield from weights
    for key, tensor in (artifact.ffn or {}).items():  # "layers.i.gate_proj.weight", Hugging Face names
        _, index, name = key.split(".", 2)
        yield f"model.layers.{index}.mlp.{name}", tensor


def _with_attention_update(weights: Iterable[tuple[str, torch.Tensor]],
                           artifact: Artifact) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's weights with a delta artifact's attention update added (W + Δ, in Δ's dtype as
    AttentionUpdate merges it); refuses an update whose weight the checkpoint does not have."""
    update = artifact.update or {}
    family = family_named(artifact.manifest.base_model.model_type)
    pending = {f"model.{key}": update[key] for key in attention_keys(update, family)}
    for name, tensor in weights:
        delta = pending.pop(name, None)
        yield name, tensor if delta is None else tensor.to(delta.dtype) + delta.to(tensor.device)
    if pending:
        raise ArtifactError(f"the checkpoint has no weights {sorted(pending)[:3]} for the artifact's attention update")


class LanderMTGemma3ForCausalLM(_RoutedCausalLM, Gemma3ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        # Gemma3ForCausalLM.__init__ (vLLM 0.32) with the routed inner model
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.config, self.quant_config = config, vllm_config.quant_config
        self._set_artifact(vllm_config)
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
        self._set_artifact(vllm_config)
        return LanderMTLlamaModel(vllm_config=vllm_config, prefix=prefix, artifact=self.artifact)
