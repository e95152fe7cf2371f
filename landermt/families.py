"""Model families: where each decoder layer keeps its FFN, and what one FFN neuron is.

A *neuron* is one FFN intermediate unit j: row j of the up (and gate) projection, column j of
the down projection (transposed for GPT-2's Conv1D, whose weights are stored [in, out]). Its
output h_j is the j-th entry of the tensor that feeds the down projection:
act(gate(x)) * up(x) for gated MLPs, act(up(x)) otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def _plain(ffn: nn.Module, out: torch.Tensor) -> torch.Tensor:
    return out


def _gpt2_finish(ffn: nn.Module, out: torch.Tensor) -> torch.Tensor:
    return ffn.dropout(out)


def _bloom_finish(ffn: nn.Module, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    # BloomMLP adds the residual itself (dropout_add); keep that contract.
    dropped = nn.functional.dropout(out, p=ffn.hidden_dropout, training=ffn.training)
    return residual + dropped


@dataclass(frozen=True)
class Family:
    """Names of one family's FFN parts. `finish` is what the family's MLP does after `down`."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str
    up: str
    gate: str | None
    down: str
    act: str
    conv1d: bool = False  # GPT-2 Conv1D stores weights [in, out]: neurons are columns of up
    finish: Callable[..., torch.Tensor] = _plain
    copied_attributes: tuple[str, ...] = ()  # plain attributes `finish` reads from the MLP
    attention: tuple[str, ...] = ()  # paths of the attention projections inside a decoder layer

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        module = model
        for attr in self.layers_path.split("."):
            module = getattr(module, attr)
        return module

    def ffns(self, model: nn.Module) -> list[nn.Module]:
        """The FFN module of every decoder layer, in depth order."""
        return [layer.mlp for layer in self.decoder_layers(model)]

    def intermediate_size(self, model: nn.Module) -> int:
        up = getattr(self.ffns(model)[0], self.up)
        return up.weight.shape[1] if self.conv1d else up.weight.shape[0]

    def neuron_axis(self, part: str) -> int:
        """The axis of `part`'s weight ("up", "gate" or "down") that indexes FFN neurons."""
        if part == "down":
            return 0 if self.conv1d else 1
        return 1 if self.conv1d else 0


_QKVO = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
FAMILIES: tuple[Family, ...] = (
    Family("gemma", ("gemma3_text", "gemma2", "gemma"), "model.layers",
           up="up_proj", gate="gate_proj", down="down_proj", act="act_fn", attention=_QKVO),
    Family("llama", ("llama", "qwen2", "qwen3", "mistral"), "model.layers",
           up="up_proj", gate="gate_proj", down="down_proj", act="act_fn", attention=_QKVO),
    Family("bloom", ("bloom",), "transformer.h",
           up="dense_h_to_4h", gate=None, down="dense_4h_to_h", act="gelu_impl",
           finish=_bloom_finish, copied_attributes=("hidden_dropout",),
           attention=("self_attention.query_key_value", "self_attention.dense")),
    Family("gpt2", ("gpt2",), "transformer.h",
           up="c_fc", gate=None, down="c_proj", act="act", conv1d=True, finish=_gpt2_finish,
           attention=("attn.c_attn", "attn.c_proj")),
)


class UnsupportedModelError(ValueError):
    pass


def family_of(model: nn.Module) -> Family:
    """The family of a Hugging Face causal LM, from its `config.model_type`."""
    return family_named(getattr(getattr(model, "config", None), "model_type", None))


def family_named(model_type: str | None) -> Family:
    """The family of a `config.model_type`."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedModelError(
        f"unsupported model architecture {model_type!r}; supported model types: {supported}"
    )
