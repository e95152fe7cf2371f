"""AdamW over FFN neurons in which a neuron that got no gradient in a step does not move.

Plain AdamW keeps moving a parameter whose gradient is zero (momentum, and decoupled weight decay
shrinks it every step). Selective finetuning promises that neurons outside a pair's set stay bit
for bit unchanged, so this optimizer updates, per neuron slice, only where the step's gradient is
nonzero somewhere in the slice: weights, first and second moments and the per-neuron step count
(used for bias correction) of every other neuron are left exactly as they were.

Updates are computed on a float32 master copy of each parameter, so bf16 models still learn at small
learning rates (an lr·update far below bf16 resolution would otherwise round away).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _neuron_view(t: torch.Tensor, axis: int) -> torch.Tensor:
    """[neurons, rest...] view with the neuron axis first."""
    return t.movedim(axis, 0)


class NeuronAdamW(torch.optim.Optimizer):
    """`params`: (parameter, neuron axis) pairs; decoupled weight decay as in AdamW."""

    def __init__(self, params: Iterable[tuple[torch.nn.Parameter, int]], lr: float = 5e-5,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        groups = [{"params": [p], "axis": axis} for p, axis in params]
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (p,) = group["params"]
            if p.grad is None:
                continue
            axis, (beta1, beta2) = group["axis"], group["betas"]
            grad = _neuron_view(p.grad, axis).float()
            moved = grad.reshape(grad.shape[0], -1).ne(0).any(dim=1)  # [neurons]
            if not moved.any():
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros(grad.shape[0])
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
                state["master"] = _neuron_view(p.detach(), axis).float().clone()
            index = moved.nonzero().squeeze(1)
            g = grad[index]
            step = state["step"][index] + 1
            m = state["exp_avg"][index].mul_(beta1).add_(g, alpha=1 - beta1)
            v = state["exp_avg_sq"][index].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            shape = (-1,) + (1,) * (g.dim() - 1)
            bc1 = (1 - beta1**step).view(shape)
            bc2 = (1 - beta2**step).view(shape)
            lr, eps = group["lr"], group["eps"]
            w = state["master"][index] * (1 - lr * group["weight_decay"]) - lr * (m / bc1) / ((v / bc2).sqrt() + eps)
            state["master"][index] = w
            _neuron_view(p, axis)[index] = w.to(p.dtype)
            state["step"][index] = step
            state["exp_avg"][index] = m
            state["exp_avg_sq"][index] = v
        return None
