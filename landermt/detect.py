"""Layer detection by representation analysis (paper §3.1, eqs. 1–2).

A_{i,n} (eq. 1) is the mean FFN activation of layer i in forward pass n: the mean of |h| over
the pass's non-padding tokens and the layer's p intermediate units, h being the tensor fed to the
down projection (act(gate(x))·up(x) for gated MLPs). The absolute value keeps positive and
negative activations from cancelling. One pass is one translation example (prompt + reference),
so a padded batch of B rows is B passes.

D_i = |mean_n A_{i,n} − mean_n A_{i+1,n}| (eq. 2), for i = 0 … L−2: the change from layer i to
layer i + 1, credited to layer i. The top-k layers by D are the pair's relevant layers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from landermt.families import Family
from landermt.loss import causal_lm


@torch.no_grad()
def layer_activations(
    model: nn.Module, family: Family, batches: Iterable[dict[str, torch.Tensor]], total: int | None = None,
    desc: str = "detect",
) -> torch.Tensor:
    """Eq. 1: A as a [passes, layers] float32 tensor."""
    ffns = family.ffns(model)
    current: dict[int, torch.Tensor] = {}
    mask_holder: list[torch.Tensor] = []

    def hook_for(index: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            h = args[0].float().abs().mean(dim=-1)  # [B, T]
            mask = mask_holder[0]
            current[index] = (h * mask).sum(dim=1) / mask.sum(dim=1)

        return hook

    handles = [getattr(f, family.down).register_forward_pre_hook(hook_for(i)) for i, f in enumerate(ffns)]
    rows = []
    try:
        for batch in tqdm(batches, total=total, desc=desc, unit="batch"):
            mask_holder[:] = [batch["attention_mask"].float()]
            # the backbone only: activations are all it needs, and the LM head costs more than every layer
            causal_lm(model).base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        use_cache=False)
            rows.append(torch.stack([current[i] for i in range(len(ffns))], dim=1))
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(rows)


def layer_differences(activations: torch.Tensor) -> torch.Tensor:
    """Eq. 2: D_i = |mean_n A_{i,n} − mean_n A_{i+1,n}|, shape [layers − 1]."""
    mean = activations.mean(dim=0)
    return (mean[:-1] - mean[1:]).abs()


def top_layers(differences: torch.Tensor, k: int) -> list[int]:
    """The k layers with the largest D, in depth order."""
    if not 1 <= k <= differences.numel():
        raise ValueError(f"k must be between 1 and {differences.numel()}, got {k}")
    return sorted(torch.topk(differences, k).indices.tolist())


def shared_layers(differences: dict[str, torch.Tensor], k: int) -> list[int]:
    """The default layer set shared by all pairs: top-k of D averaged over pairs."""
    return top_layers(torch.stack(list(differences.values())).mean(dim=0), k)


SHARED_LAYER_RULE = "top-k of D (eq. 2) averaged over all directions"
