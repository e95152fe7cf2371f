"""Language-general / language-specific neurons (paper eq. 5) and CAR mixing ratios (eqs. 6–9).

Per selected layer with p neurons and awareness scores Φ_ℓ(j) for every language ℓ (score.py):

* eq. 5: the ⌊ε·p⌋ neurons with the lowest variance of Φ across languages are language-general
  (G); every other neuron is language-specific to argmax_ℓ Φ_ℓ(j) (S_ℓ).
* A pair (a, b) uses G ∪ S_a ∪ S_b; direction does not change the set (the prompt carries it), so
  a → b and b → a share one routing row, and any two known languages form a pair.
* eqs. 6–7: c = ΣΦ(S) / (ΣΦ(S) + ΣΦ(G)), where a neuron's score within the pair is the sum of the
  two languages' scores, ΣΦ(S) = Σ_{j∈S_a} (Φ_a(j) + Φ_b(j)) + Σ_{j∈S_b} (Φ_a(j) + Φ_b(j)), and
  ΣΦ(G) = Σ_{j∈G} (Φ_a(j) + Φ_b(j)).
* eqs. 8–9: H = FFN_G(c·x) + FFN_S((1−c)·x). `car` picks the ablations: "paper" (as written),
  "swapped" (G gets 1−c, S gets c) and "off" (plain masking: both get 1).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch

CarMode = Literal["paper", "swapped", "off"]
CAR_MODES: tuple[str, ...] = ("paper", "swapped", "off")
GENERAL = -1  # `specific` value of a language-general neuron


class UnsupportedLanguage(KeyError):
    """A language code outside the ones served (an artifact's, or the base model's few-shot ones)."""

    def __init__(self, code: str, languages: list[str] | tuple[str, ...]):
        super().__init__(f"unsupported language {code!r}; supported: {', '.join(languages)}")
        self.code, self.languages = code, list(languages)

    def __str__(self) -> str:  # the message itself, not KeyError's quoted repr
        return self.args[0]


def check_pair(languages: list[str] | tuple[str, ...], source: str, target: str) -> None:
    """The one rule for a language pair: both codes among `languages` (callers decide what source = target means:
    the server returns the text, a partition has no such pair)."""
    for code in (source, target):
        if code not in languages:
            raise UnsupportedLanguage(code, languages)


@dataclass(frozen=True)
class LayerPartition:
    """One layer: `phi` [languages, p] float32; `specific` [p] int64, the language index of each
    specific neuron and GENERAL (-1) for general ones."""

    phi: torch.Tensor
    specific: torch.Tensor

    @property
    def general(self) -> torch.Tensor:
        return self.specific == GENERAL

    def pair_mask(self, a: int, b: int) -> torch.Tensor:
        """Neurons a pair may use: G ∪ S_a ∪ S_b."""
        return self.general | (self.specific == a) | (self.specific == b)


def partition_layer(phi: torch.Tensor, epsilon: float) -> LayerPartition:
    """Eq. 5. `phi`: [languages, p] awareness scores of one layer."""
    if phi.dim() != 2 or phi.shape[0] < 2:
        raise ValueError(f"need scores of at least two languages, got shape {tuple(phi.shape)}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    phi = phi.float()
    p = phi.shape[1]
    n_general = math.floor(epsilon * p)
    variance = phi.var(dim=0, unbiased=False)
    # stable sort: ties resolve by neuron index, so the split is deterministic
    order = torch.sort(variance, stable=True).indices
    specific = phi.argmax(dim=0)
    specific[order[:n_general]] = GENERAL
    return LayerPartition(phi=phi, specific=specific)


def car_ratio(part: LayerPartition, a: int, b: int) -> float:
    """Eqs. 6–7: the conditional awareness ratio c of pair (a, b) in one layer."""
    pair_phi = part.phi[a] + part.phi[b]
    specific = (part.specific == a) | (part.specific == b)
    s = pair_phi[specific].sum().item()
    g = pair_phi[part.general].sum().item()
    return s / (s + g) if s + g > 0 else 0.0


def pair_scales(part: LayerPartition, a: int, b: int, c: float, car: CarMode) -> torch.Tensor:
    """Eqs. 8–9 as per-neuron input scales [p]: general, pair-specific, 0 for other languages."""
    general_scale, specific_scale = {"paper": (c, 1 - c), "swapped": (1 - c, c), "off": (1.0, 1.0)}[car]
    scales = torch.zeros(part.specific.shape[0], dtype=torch.float32)
    scales[part.general] = general_scale
    scales[(part.specific == a) | (part.specific == b)] = specific_scale
    return scales


@dataclass(frozen=True)
class Partition:
    """Every selected layer's partition, and the routable pairs built from `languages`."""

    languages: tuple[str, ...]
    layers: dict[int, LayerPartition]
    epsilon: float
    car: CarMode

    def __post_init__(self) -> None:
        if self.car not in CAR_MODES:
            raise ValueError(f"car must be one of {', '.join(CAR_MODES)}, got {self.car!r}")

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Routable (unordered) pairs; pair id i + 1 is `pairs[i]`, id 0 is the base model."""
        return list(itertools.combinations(self.languages, 2))

    def pair_id(self, source: str, target: str) -> int:
        check_pair(self.languages, source, target)
        if source == target:
            raise ValueError(f"source and target are both {source!r}")
        a, b = sorted((self.languages.index(source), self.languages.index(target)))
        return 1 + self.pairs.index((self.languages[a], self.languages[b]))

    def car_ratios(self) -> dict[str, dict[int, float]]:
        """c per routable pair ("a-b") and layer."""
        out = {}
        for x, y in self.pairs:
            a, b = self.languages.index(x), self.languages.index(y)
            out[f"{x}-{y}"] = {i: car_ratio(part, a, b) for i, part in self.layers.items()}
        return out

    def scale_tables(self) -> dict[int, torch.Tensor]:
        """Per layer, the routed FFN's table [pairs + 1, p]; row 0 is all ones (base model)."""
        tables = {}
        for i, part in self.layers.items():
            rows = [torch.ones(part.specific.shape[0])]
            for x, y in self.pairs:
                a, b = self.languages.index(x), self.languages.index(y)
                rows.append(pair_scales(part, a, b, car_ratio(part, a, b), self.car))
            tables[i] = torch.stack(rows)
        return tables


def delta_tables(partition: Partition) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer, what the delta rule (landermt.routing.DeltaFFN) needs: the general mask [p], the indices of the
    specific neurons [s], and `uses` [pairs + 1, s]: 1 where pair r's rows add specific neuron k's update (its
    own languages' neurons), 0 where they keep its base output; row 0, the base model, adds none."""
    tables = {}
    for i, part in partition.layers.items():
        specific = torch.nonzero(~part.general).flatten()
        rows = [torch.zeros(len(specific))]
        for x, y in partition.pairs:
            a, b = partition.languages.index(x), partition.languages.index(y)
            rows.append(part.pair_mask(a, b)[specific].float())
        tables[i] = (part.general, specific, torch.stack(rows))
    return tables


def build_partition(
    phi: dict[int, torch.Tensor], languages: tuple[str, ...], epsilon: float, car: CarMode
) -> Partition:
    """Eq. 5 for every selected layer; `phi[layer]` is [languages, p]."""
    return Partition(
        languages=tuple(languages),
        layers={i: partition_layer(s, epsilon) for i, s in sorted(phi.items())},
        epsilon=epsilon,
        car=car,
    )
