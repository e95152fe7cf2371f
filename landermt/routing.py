"""Routing one base model per batch row: two rules, `mask` (the paper's, `RoutedFFN`) and `delta` (`DeltaFFN`).

Rule `mask`: the routed CAR FFN (paper §3.3, eqs. 6–9).

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

Rule `delta` (`DeltaFFN`): nothing is switched off. Every neuron computes with its base weights, and a
row of pair (a, b) adds the trained *update* (trained − base) of G ∪ S_a ∪ S_b; other languages'
specific neurons keep their base output. Row 0 is the base model. Masking zeroes, for every pair,
the neurons other languages score highest (eq. 5 gives each specific neuron to its highest-Φ
language), which cost more dev loss before training than training won back (docs/RESULTS.md);
routing updates instead is what sparse finetuning does (Ansell et al. 2022, 2024).

Under the delta rule attention can be given an update too (`AttentionUpdate`): attention has no neurons to
assign to a language, so its update is language-general, added to every row with a pair id and to no other.

Pair ids reach the modules through a `ContextVar` set by `route(...)`: each thread and each
asyncio task sees its own value, so two concurrent batches cannot race on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import reduce
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from landermt.families import Family

ROUTING_RULES: tuple[str, ...] = ("mask", "delta")

T = TypeVar("T")
_PAIR_IDS: ContextVar[torch.Tensor | None] = ContextVar("landermt_pair_ids", default=None)


@contextmanager
def route(pair_ids: torch.Tensor | None) -> Iterator[None]:
    """Run the model's routed FFNs with these pair ids: shape [batch] or [batch, tokens].

    Id 0 is the unpatched base model; outside any `route` block every row uses id 0. What the modules read is
    settled here, once per block rather than in every routed module of every forward: None when no row has a pair
    id, else the ids as [batch, 1] or [batch, tokens].
    """
    routed = None if pair_ids is None or not bool((pair_ids != 0).any()) else (
        pair_ids[:, None] if pair_ids.dim() == 1 else pair_ids)
    token = _PAIR_IDS.set(routed)
    try:
        yield
    finally:
        _PAIR_IDS.reset(token)


def _routed_ids(device: torch.device) -> torch.Tensor | None:
    """The current `route` block's ids, [B, 1] or [B, T] on `device`; None when every row is the base model."""
    ids = _PAIR_IDS.get()
    return None if ids is None else ids.to(device)


def _random_factor(shape: list[int], rank: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """The fixed factor P of a rank-r update, drawn from N(0, 1/r): a step of lr on the trained factor then moves
    each weight by about lr, as a dense update's step does."""
    return (torch.randn(shape, generator=generator) / rank**0.5).to(like)


def aligned_factor(gradient: torch.Tensor, rank: int, neuron_axis: int) -> torch.Tensor:
    """A fixed factor from the base weight's loss gradient instead of noise: the r directions of the weight's other
    side (input for up and gate, output for down) along which that gradient is largest, its top singular vectors
    (LoRA-GA's initialisation, Wang et al. 2024), scaled to _random_factor's norm. Shaped as DeltaFFN keeps a factor,
    one group: [1, r, d] (neuron axis 0) or [1, d, r] (neuron axis 1). Why: a neuron's trained numbers sit on its
    own side, so for down the fixed factor is the *output* side, which LoRA trains (Zhu et al. 2024: the output
    factor matters more; a random input factor does nearly as well as a trained one)."""
    u, _, vh = torch.linalg.svd(gradient.float(), full_matrices=False)
    other = gradient.shape[1 - neuron_axis]
    factor = vh[:rank] if neuron_axis == 0 else u[:, :rank]
    return (factor * (other / rank) ** 0.5)[None].to(gradient.dtype)


def _take_over(routed: nn.Module, ffn: nn.Module, family: Family) -> None:
    """`routed` holds `ffn`'s submodules under their names (state-dict keys unchanged) and the attributes its
    family's `finish` reads; `ffn` itself stays out of the module tree, as `base` (for `unpatch`)."""
    for name, child in ffn.named_children():
        routed.add_module(name, child)
    for name in family.copied_attributes:
        setattr(routed, name, getattr(ffn, name))
    routed.__dict__["base"] = ffn
    routed.family = family


def _replace_ffns(model: nn.Module, family: Family, tables: dict, build) -> list[nn.Module]:
    """Replace the FFN of each layer in `tables` by `build(ffn, table, index)`; a layer is patched once."""
    layers = family.decoder_layers(model)
    routed = []
    for index, table in sorted(tables.items()):
        ffn = layers[index].mlp
        if isinstance(ffn, (RoutedFFN, DeltaFFN)):
            raise ValueError(f"layer {index} is already patched")
        layers[index].mlp = build(ffn, table, index)
        routed.append(layers[index].mlp)
    return routed


def _matmul(x: torch.Tensor, weight: torch.Tensor, conv1d: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x through a projection's weight: [out, in] as nn.Linear stores it, or [in, out] for GPT-2's Conv1D."""
    if not conv1d:
        return F.linear(x, weight, bias)
    return x @ weight if bias is None else x @ weight + bias


def _cached(module: nn.Module, compute: Callable[[], T]) -> T:
    """compute(), kept in `module._cache` until one of the module's parameters changes (base weights or update:
    in-place updates, as an optimizer step makes, bump a tensor's version)."""
    version = tuple(p._version for p in module.parameters())
    if module._cache is None or module._cache[0] != version:
        module._cache = (version, compute())
    return module._cache[1]


def _scale_before_bias(pre: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return pre * scale
    return pre + (scale - 1) * (pre - bias)


class RoutedFFN(nn.Module):
    """One layer's FFN with per-row neuron routing. Parameters stay those of the wrapped FFN,
    registered under the same names, so the model's state-dict keys do not change."""

    def __init__(self, ffn: nn.Module, family: Family, scales: torch.Tensor):
        super().__init__()
        _take_over(self, ffn, family)
        if scales.dim() != 2 or not torch.all(scales[0] == 1):
            raise ValueError("scale table must be [pairs + 1, intermediate] with row 0 all ones")
        self.register_buffer("scales", scales, persistent=False)
        self.biased = any(getattr(self, n).bias is not None for n in (family.up, family.gate) if n)

    def set_scales(self, scales: torch.Tensor) -> None:
        self.scales = scales.to(device=self.scales.device, dtype=self.scales.dtype)

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        f = self.family
        up_proj = getattr(self, f.up)
        gate_proj = getattr(self, f.gate) if f.gate else None
        up = up_proj(x)
        gate = gate_proj(x) if gate_proj is not None else None
        ids = _routed_ids(x.device)
        scale = None if ids is None else self.scales[ids]  # [B, 1 | T, p]
        if scale is not None:
            up = _scale_before_bias(up, scale, up_proj.bias)
            if gate is not None:
                gate = _scale_before_bias(gate, scale, gate_proj.bias)
        act = getattr(self, f.act)
        h = act(gate) * up if gate is not None else act(up)
        if scale is not None and self.biased:
            h = h * (scale != 0)
        return f.finish(self, getattr(self, f.down)(h), *extra)


def _neuron_groups(specific: torch.Tensor, uses: torch.Tensor, neurons: int) -> torch.Tensor:
    """One-hot [neurons, groups]: group 0 the general neurons, then one group per distinct column of `uses`, i.e.
    the specific neurons used by exactly the same pairs (one language's neurons, given three languages or more)."""
    _, column_group = torch.unique(uses, dim=1, return_inverse=True)
    group = torch.zeros(neurons, dtype=torch.long)
    group[specific.cpu()] = 1 + column_group.cpu()
    return F.one_hot(group, int(group.max()) + 1).float()


class DeltaFFN(nn.Module):
    """One layer's FFN under the delta rule: the base FFN's modules (frozen) and, kept apart, the update `update`
    (zero until trained: {"<module>.weight" | "<module>.bias": trained − base}, the down bias excluded, it is no
    neuron's). One pass serves any mix of pairs: the general neurons' update is merged into the base weights
    (shared by every pair) and only the specific neurons' update, a tenth of the neurons at ε = 0.9, is added
    per row, weighted by `uses[pair]` (1: the row's own languages, 0: keep the base):

        pre = (W + Δ·[G]) x,  then pre[S] += uses[r] ⊙ (Δ_S x)        up and gate
        y   = (W_d + Δ_d·[G]) h + Δ_d,S (uses[r] ⊙ h_S)                 down

    With Δ = 0 every added term is an exact zero, so each pair's rows equal the base model bit for bit; a
    specific neuron outside a row's pair enters it only multiplied by an exact 0, so its update gets exactly
    zero gradient from that row. Rows with id 0 (and a batch with no ids) run the base FFN itself.

    `rank` r (training only): each neuron's update of a weight is r trained numbers times a random factor,
    Δ = B·P (up, gate: B [p, r], P [r, d]) or P·B (down: P [d, r], B [r, p]), P drawn once from N(0, 1/r) with
    `seed` (so a step of lr on B moves each weight by about lr, as a dense update does). By default only B trains
    and P is fixed: a neuron's update is its own parameters alone, so routing and NeuronAdamW's guarantees hold
    unchanged. A low-rank update learns far faster than a dense one at the same budget (docs/RESULTS.md, "Dev
    sweep"), as LoRA does. With `train_factors` P trains too, as LoRA's second factor does, but one P per *neuron
    group*: the general neurons, and the specific neurons used by exactly the same pairs (one language's), so
    Δ_i = B_i·P_g(i). A group's P then gets gradient only from rows that use the group, and the guarantees still
    hold (the group is the unit NeuronAdamW moves). The artifact stores the dense Δ (`dense_update`), so serving
    needs neither rank nor factors. `rank` may differ per part ({"up": r, "gate": r, "down": r}): the down factor
    spans the residual directions *every* neuron's update writes to and saturates first (bench/factor_drift.py),
    though giving it 32 of 48 did worse on dev than 16 each (docs/RESULTS.md).

    `rounds` > 1 (fixed factors only): training re-aligns the factors `rounds` − 1 times, as GaLore (Zhao et al.
    2024) moves its subspace and ReLoRA (Lialin et al. 2023) restarts its adapters: a fixed factor spans the
    directions the loss wanted when it was set, and after 1,200 steps the down factor held 7 % of the loss
    gradient's energy, against 86 % at step 0 (bench/factor_drift.py). `retire(k)` moves the trained numbers and their
    factor into round k's frozen slot (`<module>_earlier`, `<module>_earlier_factor`) and zeroes the numbers, so
    Δ = Σ_rounds B_k·P_k is unchanged and the model with it; the caller then aligns a new P. Each round's B_k is
    still the neuron's own numbers, so routing and the guarantees above hold, and the trained count stays r per
    neuron.
    """

    def __init__(self, ffn: nn.Module, family: Family, general: torch.Tensor, specific: torch.Tensor,
                 uses: torch.Tensor, rank: int | dict[str, int] | None = None, seed: int = 0,
                 train_factors: bool = False, rounds: int = 1):
        super().__init__()
        _take_over(self, ffn, family)  # `base`, the unpatched MLP, also serves the rows with id 0
        if uses.dim() != 2 or uses.shape[1] != len(specific) or torch.any(uses[0] != 0):
            raise ValueError("uses must be [pairs + 1, specific neurons] with row 0 all zeros")
        if train_factors and rank is None:
            raise ValueError("train_factors needs a rank")
        if rounds > 1 and (rank is None or train_factors):
            raise ValueError("rounds > 1 needs a rank and fixed factors")
        weight = getattr(self, family.up).weight
        self.register_buffer("general", general.to(device=weight.device, dtype=weight.dtype), persistent=False)
        self.register_buffer("specific", specific.to(weight.device), persistent=False)
        self.register_buffer("uses", uses.to(device=weight.device, dtype=weight.dtype), persistent=False)
        groups = _neuron_groups(specific, uses, len(general)) if train_factors else torch.ones(len(general), 1)
        self.register_buffer("groups", groups.to(weight), persistent=False)  # [p, factor groups], one-hot
        self.update = nn.ParameterDict()
        # {module name: its part}: "up", "gate" or "down" (the family's names differ: GPT-2's c_fc, ...)
        self.parts = {getattr(family, part): part for part in ("up", "gate", "down") if getattr(family, part)}
        self.factored: list[str] = []  # rank r: the weights whose update is factored (P: "<name>_factor" or trained)
        ranks = rank if isinstance(rank, dict) else dict.fromkeys(self.parts.values(), rank)
        if missing := set(self.parts.values()) - ranks.keys():
            raise ValueError(f"rank names no rank for the {', '.join(sorted(missing))} projection: {rank}")
        generator = torch.Generator().manual_seed(seed)
        for part in ("up", "gate", "down"):
            name = getattr(family, part)
            if name is None:
                continue
            module = getattr(self, name)
            kinds = ("weight", "bias") if part != "down" and module.bias is not None else ("weight",)
            part_rank = ranks[part]
            for kind in kinds:
                value = getattr(module, kind)
                if part_rank is not None and kind == "weight":
                    axis, other = family.neuron_axis(part), value.shape[1 - family.neuron_axis(part)]
                    shape = [groups.shape[1], part_rank, other] if axis == 0 else [groups.shape[1], other, part_rank]
                    factor = _random_factor(shape, part_rank, generator, value)
                    if train_factors:
                        self.update[self.key(name, "factor")] = nn.Parameter(factor, requires_grad=False)
                    else:
                        self.register_buffer(f"{name}_factor", factor, persistent=False)
                    self.factored.append(name)
                    value = value.new_zeros([value.shape[0], part_rank] if axis == 0 else [part_rank, value.shape[1]])
                    if rounds > 1:  # the earlier rounds' numbers and factors, side by side along the rank
                        slots = (rounds - 1) * part_rank
                        self.register_buffer(f"{name}_earlier", value.new_zeros(
                            [value.shape[0], slots] if axis == 0 else [slots, value.shape[1]]), persistent=False)
                        self.register_buffer(f"{name}_earlier_factor", factor.new_zeros(
                            [1, slots, other] if axis == 0 else [1, other, slots]), persistent=False)
                self.update[self.key(name, kind)] = nn.Parameter(torch.zeros_like(value), requires_grad=False)
        self._cache: tuple[tuple[int, ...], dict[str, torch.Tensor]] | None = None  # _cached

    def fixed_factors(self, parts: tuple[str, ...] = ("up", "gate", "down")) -> dict[str, torch.Tensor]:
        """{module name: its fixed factor buffer} of `parts` (rank r without train_factors; empty otherwise)."""
        return {name: getattr(self, f"{name}_factor") for name in self.factored
                if hasattr(self, f"{name}_factor") and self.parts[name] in parts}

    def earlier_rounds(self) -> dict[str, torch.Tensor]:
        """{"<module>.earlier" | "<module>.earlier_factor": buffer}: the retired rounds (`rounds` > 1; else empty)."""
        return {f"{name}.{kind}": getattr(self, f"{name}_{kind}") for name in self.factored
                for kind in ("earlier", "earlier_factor") if hasattr(self, f"{name}_{kind}")}

    @torch.no_grad()
    def retire(self, round_index: int) -> list[nn.Parameter]:
        """Move each factored weight's trained numbers and fixed factor into slot `round_index` of the earlier
        rounds and zero the numbers: Δ, and so the model, stays as it was (up to the rounding of a longer sum).
        Returns the zeroed parameters (their optimizer state belongs to the retired round)."""
        zeroed = []
        for name in self.factored:
            trained, factor = self.update[self.key(name, "weight")], getattr(self, f"{name}_factor")
            axis = self.family.neuron_axis(self.parts[name])
            rank = factor.shape[1 + axis]
            columns = slice(round_index * rank, (round_index + 1) * rank)
            if axis == 0:
                getattr(self, f"{name}_earlier")[:, columns] = trained
                getattr(self, f"{name}_earlier_factor")[:, columns] = factor
            else:
                getattr(self, f"{name}_earlier")[columns] = trained
                getattr(self, f"{name}_earlier_factor")[..., columns] = factor
            zeroed.append(trained.zero_())
        self._cache = None
        return zeroed

    @torch.no_grad()
    def align_factors(self, gradients: dict[str, torch.Tensor]) -> None:
        """Replace the fixed factor of each module in `gradients` (module name -> its base weight's gradient) by
        aligned_factor of that gradient; the update is still zero, so the model stays the base model."""
        for name, gradient in gradients.items():
            axis, factor = self.family.neuron_axis(self.parts[name]), getattr(self, f"{name}_factor")
            factor.copy_(aligned_factor(gradient, factor.shape[1 + axis], axis))
        self._cache = None  # a factor is a buffer: _cached keys on parameters only

    @staticmethod
    def key(module: str, kind: str) -> str:
        """ParameterDict keys cannot hold dots: "up_proj.weight" is stored as "up_proj:weight"."""
        return f"{module}:{kind}"

    def _factors(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(first, second)] with `name`'s dense update Δ = Σ first·second: each neuron's trained numbers placed in
        its group's block of r columns (rows for down), the groups' factors stacked along the other side; then, with
        rounds of factors, the earlier rounds' frozen numbers and factors side by side (a term of their own, so
        training computes no gradient for them)."""
        trained = self.update[self.key(name, "weight")]
        factor = self.update[self.key(name, "factor")] if self.key(name, "factor") in self.update \
            else getattr(self, f"{name}_factor")
        columns = self.family.neuron_axis(self.parts[name]) == 1  # a neuron is a column (down; GPT-2's c_fc)
        if not columns:  # trained [p, r], factor [groups, r, d]
            terms = [((self.groups[:, :, None] * trained[:, None, :]).flatten(1), factor.flatten(0, 1))]
        else:  # factor [groups, d, r], trained [r, p]
            terms = [(factor.permute(1, 0, 2).flatten(1), (self.groups.T[:, None, :] * trained[None]).flatten(0, 1))]
        if hasattr(self, f"{name}_earlier"):
            earlier, earlier_factor = getattr(self, f"{name}_earlier"), getattr(self, f"{name}_earlier_factor")[0]
            terms.append((earlier_factor, earlier) if columns else (earlier, earlier_factor))
        return terms

    def _delta(self, name: str) -> torch.Tensor:
        """The dense update of `name`'s weight: the parameter itself, or the sum of its factors' products."""
        if name not in self.factored:
            return self.update[self.key(name, "weight")]
        return reduce(torch.add, (first @ second for first, second in self._factors(name)))

    def dense_update(self) -> dict[str, torch.Tensor]:
        """{key: dense Δ} of every updated parameter (what an artifact stores; keys as in `update`)."""
        return {key: self._delta(key.split(":")[0]) if key.endswith(":weight") else p
                for key, p in self.update.items() if not key.endswith(":factor")}

    def _weights(self) -> dict[str, torch.Tensor]:
        """Per part: the merged weight (and bias) and the specific neurons' update slice. Under no_grad (inference)
        they are computed once per change of any parameter (in-place updates bump a tensor's version)."""
        return self._compute_weights() if torch.is_grad_enabled() else _cached(self, self._compute_weights)

    def _compute_weights(self) -> dict[str, torch.Tensor]:
        """Per part the merged weight (and bias); the specific neurons' update slices of the input projections (up,
        and gate where there is one) side by side under "inputs.specific", so both take one thin matmul; the down
        projection's under "<down>.specific"."""
        f, out, inputs = self.family, {}, {"weight": [], "bias": []}
        for part in ("up", "gate", "down"):
            name = getattr(f, part)
            if name is None:
                continue
            module, axis = getattr(self, name), f.neuron_axis(part)
            shape = [1] * module.weight.dim()
            shape[axis] = -1
            delta = self._delta(name)
            out[f"{name}.weight"] = module.weight + delta * self.general.view(shape)
            specific = delta.index_select(axis, self.specific)
            if part == "down":
                out[f"{name}.specific"] = specific
                if module.bias is not None:
                    out[f"{name}.bias"] = module.bias
                continue
            inputs["weight"].append(specific)
            if module.bias is not None:
                bias = self.update[self.key(name, "bias")]
                out[f"{name}.bias"] = module.bias + bias * self.general
                inputs["bias"].append(bias[self.specific])
        out["inputs.specific"] = torch.cat(inputs["weight"], dim=f.neuron_axis("up"))
        if inputs["bias"]:
            out["inputs.specific_bias"] = torch.cat(inputs["bias"])
        return out

    def _project(self, name: str, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """The module's own forward with the merged weights (so Δ = 0 computes exactly what the base does);
        nn.Linear's forward is F.linear, called directly (functional_call costs ~50 µs a call)."""
        module = getattr(self, name)
        bias = weights.get(f"{name}.bias")
        if type(module) is nn.Linear:
            return F.linear(x, weights[f"{name}.weight"], bias)
        params = {"weight": weights[f"{name}.weight"]} | ({} if bias is None else {"bias": bias})
        return functional_call(module, params, (x,))

    def _specific(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _matmul(x, weight, self.family.conv1d)

    def _factored_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """What `name`'s update adds to its output, x·Δ without forming Δ: two thin matmuls a term, as LoRA
        computes."""
        terms = self._factors(name)
        if self.family.conv1d:  # weights [in, out]: x·Δ = (x·first)·second
            return reduce(torch.add, ((x @ first) @ second for first, second in terms))
        return reduce(torch.add, (F.linear(F.linear(x, second), first) for first, second in terms))

    def _routed_factored(self, x: torch.Tensor, uses: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        """Training with a factored update: the base projections plus each neuron's update times its weight for
        the row (1 for general neurons, uses[pair] for specific ones), the update applied to the activations, so
        no dense Δ or dense weight gradient is formed. Equals `_routed` (tests/test_delta.py)."""
        f = self.family
        weight = self.general.expand(*uses.shape[:-1], -1).index_add(-1, self.specific, uses)  # [B, 1 | T, p]

        def pre(name: str) -> torch.Tensor:
            added = self._factored_delta(name, x)
            if self.key(name, "bias") in self.update:
                added = added + self.update[self.key(name, "bias")]
            return getattr(self, name)(x) + weight * added

        up = pre(f.up)
        act = getattr(self, f.act)
        h = act(pre(f.gate)) * up if f.gate else act(up)
        y = getattr(self, f.down)(h) + self._factored_delta(f.down, weight * h)
        return f.finish(self, y, *extra)

    def _routed(self, x: torch.Tensor, uses: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        if self.factored and torch.is_grad_enabled():
            return self._routed_factored(x, uses, *extra)
        f, w = self.family, self._weights()
        inputs = [name for name in (f.up, f.gate) if name]
        added = self._specific(x, w["inputs.specific"])  # [B, T, len(inputs) · specific]
        if "inputs.specific_bias" in w:
            added = added + w["inputs.specific_bias"]
        added = (added.unflatten(-1, (len(inputs), -1)) * uses.unsqueeze(-2)).unbind(-2)
        # in place: a projection's output is not needed by its backward
        pre = {name: self._project(name, x, w).index_add_(-1, self.specific, part)
               for name, part in zip(inputs, added, strict=True)}
        act = getattr(self, f.act)
        h = act(pre[f.gate]) * pre[f.up] if f.gate else act(pre[f.up])
        y = self._project(f.down, h, w) + self._specific(uses * h.index_select(-1, self.specific),
                                                          w[f"{f.down}.specific"])
        return f.finish(self, y, *extra)

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        ids = _routed_ids(x.device)
        if ids is None:
            return self.base(x, *extra)
        out = self._routed(x, self.uses[ids], *extra)
        base_rows = ids == 0
        if bool(base_rows.any()):
            out = torch.where(base_rows[..., None], self.base(x, *extra), out)
        return out


class AttentionUpdate(nn.Module):
    """One attention projection under the delta rule: the base projection, frozen, plus an update Δ shared by every
    pair and added only to rows with a pair id, so rows with id 0 (and a batch with no ids) are the base model:

        y = W x + b + [id ≠ 0] · Δ x

    The base weight and bias stay registered under their own names (state-dict keys unchanged). `rank` r (training
    only): Δ = B·P with B [out, r] trained from zero and P [r, in] fixed, drawn from N(0, 1/r) with `seed`, the
    parametrisation of DeltaFFN's factored update, so one learning rate suits both (for Conv1D weights, stored
    [in, out]: Δ = P·B). The artifact stores the dense Δ; at inference a batch whose rows all carry ids runs one
    projection with the merged weight W + Δ, so the update costs nothing per token there.
    """

    def __init__(self, projection: nn.Module, conv1d: bool, rank: int | None = None, seed: int = 0):
        super().__init__()
        self.__dict__["base"] = projection
        self.weight = projection.weight
        self.bias = projection.bias
        self.conv1d = conv1d
        if rank is None:
            self.factor = None
            self.update = nn.Parameter(torch.zeros_like(self.weight), requires_grad=False)
        else:
            factor_shape = [self.weight.shape[0], rank] if conv1d else [rank, self.weight.shape[1]]
            generator = torch.Generator().manual_seed(seed)
            self.register_buffer("factor", _random_factor(factor_shape, rank, generator, self.weight),
                                 persistent=False)
            trained_shape = [rank, self.weight.shape[1]] if conv1d else [self.weight.shape[0], rank]
            self.update = nn.Parameter(self.weight.new_zeros(trained_shape), requires_grad=False)
        self._cache: tuple[tuple[int, ...], torch.Tensor] | None = None  # _cached: the merged weight W + Δ

    def dense_update(self) -> torch.Tensor:
        """Δ, the shape of the base weight (what an artifact stores)."""
        if self.factor is None:
            return self.update
        return self.factor @ self.update if self.conv1d else self.update @ self.factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = _routed_ids(x.device)
        if ids is None:
            return _matmul(x, self.weight, self.conv1d, self.bias)
        routed = ids[..., None] != 0  # [B, 1 | T, 1]
        if torch.is_grad_enabled():  # training: the update on the activations, no dense Δ or weight gradient
            inner = x if self.factor is None else _matmul(x, self.factor, self.conv1d)  # both layouts: P first
            added = _matmul(inner, self.update, self.conv1d)
            return _matmul(x, self.weight, self.conv1d, self.bias) + routed * added
        out = _matmul(x, _cached(self, lambda: self.weight + self.dense_update()), self.conv1d, self.bias)
        if bool(routed.all()):
            return out
        return torch.where(routed, out, _matmul(x, self.weight, self.conv1d, self.bias))


def _attention_slots(layer: nn.Module, family: Family) -> Iterator[tuple[str, nn.Module, str]]:
    """(path, owning module, attribute) of each attention projection of one decoder layer."""
    for path in family.attention:
        owner_path, _, attr = path.rpartition(".")
        yield path, layer.get_submodule(owner_path), attr


def patch_attention(model: nn.Module, family: Family, layers: list[int], rank: int | None = None
                    ) -> dict[str, AttentionUpdate]:
    """Give the attention projections of `layers` an AttentionUpdate (zero update; factored at `rank` for training,
    its fixed factors seeded by layer and projection). Returns {"layers.i.<projection path>": module}."""
    decoder_layers = family.decoder_layers(model)
    out = {}
    for i in layers:
        for j, (path, owner, attr) in enumerate(_attention_slots(decoder_layers[i], family)):
            projection = getattr(owner, attr)
            if isinstance(projection, AttentionUpdate):
                raise ValueError(f"layer {i} {path} is already patched")
            module = AttentionUpdate(projection, family.conv1d, rank, seed=1000 * (i + 1) + j)
            setattr(owner, attr, module)
            out[f"layers.{i}.{path}"] = module
    return out


def attention_updates(model: nn.Module, family: Family) -> dict[str, AttentionUpdate]:
    """The AttentionUpdate modules of a patched model, keyed as patch_attention returns them."""
    return {f"layers.{i}.{path}": layer.get_submodule(path) for i, layer in enumerate(family.decoder_layers(model))
            for path in family.attention if isinstance(layer.get_submodule(path), AttentionUpdate)}


def patch_delta(model: nn.Module, family: Family, tables: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                rank: int | dict[str, int] | None = None, train_factors: bool = False, rounds: int = 1
                ) -> list[DeltaFFN]:
    """Replace the FFN of each layer in `tables` (layer -> landermt.partition.delta_tables' entry) by a DeltaFFN
    with a zero update (of rank `rank` for training, its random factors seeded by the layer index, in `rounds`
    rounds of factors; DeltaFFN)."""
    return _replace_ffns(model, family, tables, lambda ffn, table, index: DeltaFFN(
        ffn, family, *table, rank=rank, seed=index, train_factors=train_factors, rounds=rounds))


def patch(model: nn.Module, family: Family, tables: dict[int, torch.Tensor]) -> list[RoutedFFN]:
    """Replace the FFN of each layer in `tables` (layer index -> [pairs + 1, p] scale table)."""
    dtype = next(model.parameters()).dtype

    def build(ffn: nn.Module, table: torch.Tensor, index: int) -> RoutedFFN:
        return RoutedFFN(ffn, family, table.to(device=getattr(ffn, family.up).weight.device, dtype=dtype))

    return _replace_ffns(model, family, tables, build)


def unpatch(model: nn.Module, family: Family) -> None:
    """Put the original FFN modules back (their parameters are the same objects)."""
    for layer in family.decoder_layers(model):
        if isinstance(layer.mlp, (RoutedFFN, DeltaFFN)):
            layer.mlp = layer.mlp.base
        for _, owner, attr in _attention_slots(layer, family):
            if isinstance(getattr(owner, attr), AttentionUpdate):
                setattr(owner, attr, getattr(owner, attr).base)
