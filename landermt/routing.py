"""The routed CAR FFN (paper §3.3, eqs. 6–9) and its injection into a model.

In every selected layer the FFN is replaced by `RoutedFFN`. Each batch row (or token) carries a
pair id; row r of the layer's scale table holds, per neuron,

    c      for language-general neurons           (FFN_G(c·x), eq. 8)
    1 − c  for the pair's language-specific ones  (FFN_S((1−c)·x), eq. 8)
    0      for neurons specific to other languages (they take no part)

and row 0 is all ones: the unpatched base FFN. Since W(s·x) = s·(Wx) per output unit, the scale
is applied to the outputs of the up (and gate) projection, so the whole batch still shares one
up/gate matmul whatever its mix of pairs. For biased projections the scale must hit Wx before the
bias: s·Wx + b = pre + (s − 1)·(pre − b) with pre = Wx + b as the base layer computed it (exact
for s = 1), and excluded neurons are forced to exactly zero after the activation, because
act(b) is in general not zero.

Pair ids reach the modules through a `ContextVar` set by `route(...)`: each thread and each
asyncio task sees its own value, so two concurrent batches cannot race on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from landermt.families import Family

_PAIR_IDS: ContextVar[torch.Tensor | None] = ContextVar("landermt_pair_ids", default=None)


@contextmanager
def route(pair_ids: torch.Tensor | None) -> Iterator[None]:
    """Run the model's routed FFNs with these pair ids: shape [batch] or [batch, tokens].

    Id 0 is the unpatched base model; outside any `route` block every row uses id 0.
    """
    token = _PAIR_IDS.set(pair_ids)
    try:
        yield
    finally:
        _PAIR_IDS.reset(token)


def _scale_before_bias(pre: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return pre * scale
    return pre + (scale - 1) * (pre - bias)


class RoutedFFN(nn.Module):
    """One layer's FFN with per-row neuron routing. Parameters stay those of the wrapped FFN,
    registered under the same names, so the model's state-dict keys do not change."""

    def __init__(self, ffn: nn.Module, family: Family, scales: torch.Tensor):
        super().__init__()
        for name, child in ffn.named_children():
            self.add_module(name, child)
        for name in family.copied_attributes:
            setattr(self, name, getattr(ffn, name))
        self.__dict__["base"] = ffn  # kept out of the module tree: only for `unpatch`
        self.family = family
        if scales.dim() != 2 or not torch.all(scales[0] == 1):
            raise ValueError("scale table must be [pairs + 1, intermediate] with row 0 all ones")
        self.register_buffer("scales", scales, persistent=False)
        self.biased = any(getattr(self, n).bias is not None for n in (family.up, family.gate) if n)

    def set_scales(self, scales: torch.Tensor) -> None:
        self.scales = scales.to(device=self.scales.device, dtype=self.scales.dtype)

    def _row_scales(self, pair_ids: torch.Tensor) -> torch.Tensor:
        scales = self.scales[pair_ids]
        return scales.unsqueeze(-2) if pair_ids.dim() == 1 else scales  # [B, 1, p] or [B, T, p]

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        f = self.family
        up_proj = getattr(self, f.up)
        gate_proj = getattr(self, f.gate) if f.gate else None
        up = up_proj(x)
        gate = gate_proj(x) if gate_proj is not None else None
        pair_ids = _PAIR_IDS.get()
        scale = None if pair_ids is None else self._row_scales(pair_ids.to(x.device))
        if scale is not None:
            up = _scale_before_bias(up, scale, up_proj.bias)
            if gate is not None:
                gate = _scale_before_bias(gate, scale, gate_proj.bias)
        act = getattr(self, f.act)
        h = act(gate) * up if gate is not None else act(up)
        if scale is not None and self.biased:
            h = h * (scale != 0)
        return f.finish(self, getattr(self, f.down)(h), *extra)


def patch(model: nn.Module, family: Family, tables: dict[int, torch.Tensor]) -> list[RoutedFFN]:
    """Replace the FFN of each layer in `tables` (layer index -> [pairs + 1, p] scale table)."""
    layers = family.decoder_layers(model)
    dtype = next(model.parameters()).dtype
    routed = []
    for index, table in sorted(tables.items()):
        ffn = layers[index].mlp
        if isinstance(ffn, RoutedFFN):
            raise ValueError(f"layer {index} is already patched")
        device = getattr(ffn, family.up).weight.device
        layers[index].mlp = RoutedFFN(ffn, family, table.to(device=device, dtype=dtype))
        routed.append(layers[index].mlp)
    return routed


def unpatch(model: nn.Module, family: Family) -> None:
    """Put the original FFN modules back (their parameters are the same objects)."""
    for layer in family.decoder_layers(model):
        if isinstance(layer.mlp, RoutedFFN):
            layer.mlp = layer.mlp.base
