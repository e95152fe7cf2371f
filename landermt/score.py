"""Neuron awareness by first-order Taylor expansion (paper §3.2, eqs. 3–4).

Φ_ℓ(j) = mean over tokens t of |∂L/∂h_{t,j} · h_{t,j}| (eq. 4), the first-order estimate of
how much the loss L on text of language ℓ changes when neuron j's output h_j is removed (eq. 3).
h is the input of the down projection (see families.py).

L is the *sum* of the batch's token losses, so ∂L/∂h_t depends only on t's own sequence and Φ
does not depend on batch size or composition; padding positions are excluded from the mean.

Cost: gradients flow to activations only. Every parameter is frozen during scoring; the
embedding output is the one leaf that requires grad, so no weight gradient is ever allocated.
Per layer the running sum ∑|g·h| [p] is all that is kept between batches.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from landermt.families import Family
from landermt.loss import target_loss


def neuron_awareness(
    model: nn.Module,
    family: Family,
    batches: Iterable[dict[str, torch.Tensor]],
    layers: list[int] | None = None,
    total: int | None = None,
    desc: str = "score",
) -> dict[int, torch.Tensor]:
    """Eq. 4 for one language: {layer: Φ [p] float32} for `layers` (default: all)."""
    ffns = family.ffns(model)
    layers = list(range(len(ffns))) if layers is None else layers
    sums = {i: torch.zeros(family.intermediate_size(model)) for i in layers}
    mask_holder: list[torch.Tensor] = []
    tokens = 0

    def hook_for(index: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            h = args[0]
            mask = mask_holder[0]

            def accumulate(grad: torch.Tensor) -> None:
                taylor = (grad.float() * h.float()).abs() * mask.unsqueeze(-1)
                sums[index].add_(taylor.sum(dim=(0, 1)))

            h.register_hook(accumulate)

        return hook

    def embeddings_as_leaf(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)

    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    handles = [getattr(ffns[i], family.down).register_forward_pre_hook(hook_for(i)) for i in layers]
    handles.append(model.get_input_embeddings().register_forward_hook(embeddings_as_leaf))
    try:
        with torch.enable_grad():
            for batch in tqdm(batches, total=total, desc=desc, unit="batch"):
                mask_holder[:] = [batch["attention_mask"].float()]
                target_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], "sum").backward()
                tokens += int(batch["attention_mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(True)
    if tokens == 0:
        raise ValueError("no tokens to score")
    return {i: s / tokens for i, s in sums.items()}
