"""What each method trains (the table of what each method needs is training.config.METHOD_SPECS).

Routed methods follow `method.routing`: `delta` (default) trains an update of the selected layers'
neurons beside the frozen base weights (routing.DeltaFFN: a row adds its pair's updates, nothing is
switched off); `mask` trains those neurons' weights in place under the paper's CAR mask
(routing.RoutedFFN). Either way neurons outside a row's pair get exactly zero gradient from that
row, so LANDeRMT's per-pair rule needs nothing more; `ls` and `lg` additionally zero the gradient
of the neurons they never train.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from landermt.families import family_of
from landermt.partition import Partition, delta_tables
from landermt.routing import patch, patch_attention, patch_delta
from training.config import METHOD_SPECS, MethodConfig

FFN_PARTS = ("up", "gate", "down")


@dataclass
class Prepared:
    model: nn.Module
    trainable: list[tuple[str, nn.Parameter, int]] = field(default_factory=list)  # (name, param, neuron axis)
    routed: bool = False
    # tensors that do not train but a resumed run must get back as they were (name -> the tensor itself): the delta
    # rule's fixed factors, which method.update_factor "gradient[-down]" derives from the data
    fixed: dict[str, torch.Tensor] = field(default_factory=dict)
    factor_rounds: int = 1  # rounds of fixed factors (method.factor_rounds): the trainer re-aligns between them


def _ffn_parameters(model: nn.Module, layers: list[int]) -> list[tuple[str, nn.Parameter, int]]:
    """(name, param, neuron axis) of the selected layers' neuron weights; the down bias is not a neuron."""
    family = family_of(model)
    out = []
    for i in layers:
        ffn = family.ffns(model)[i]
        for part in FFN_PARTS:
            attr = getattr(family, part)
            if attr is None:
                continue
            module = getattr(ffn, attr)
            out.append((f"layers.{i}.{attr}.weight", module.weight, family.neuron_axis(part)))
            if part != "down" and module.bias is not None:
                out.append((f"layers.{i}.{attr}.bias", module.bias, 0))
    return out


def _update_parameters(model: nn.Module, layers: list[int], modules) -> list[tuple[str, nn.Parameter, int]]:
    """(name, param, neuron axis) of the delta rule's updates, named `layers.i.update.<module>.<weight|bias|factor>`
    (a trained factor's unit is its neuron group, axis 0)."""
    family = family_of(model)
    parts = {getattr(family, part): part for part in FFN_PARTS if getattr(family, part)}
    out = []
    for i, module in zip(layers, modules, strict=True):
        for key, p in module.update.items():
            name, kind = key.split(":")
            out.append((f"layers.{i}.update.{name}.{kind}", p, family.neuron_axis(parts[name]) if kind == "weight"
                        else 0))
    return out


def _freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def prepare(model: nn.Module, method: MethodConfig, partition: Partition | None) -> Prepared:
    name = method.name
    if name in ("zero_shot", "few_shot"):
        _freeze_all(model)
        return Prepared(model)
    if name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Prepared(model, [(n, p, 0) for n, p in model.named_parameters()])
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        targets = method.lora_targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                          "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "c_attn",
                                          "c_proj", "c_fc"]
        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        if not present & set(targets):
            raise ValueError(f"method.lora_targets: none of {targets} is a module of this model")
        config = LoraConfig(r=method.lora_rank, lora_alpha=method.lora_alpha, lora_dropout=0.0,
                            target_modules=[t for t in targets if t in present])
        wrapped = get_peft_model(model, config)
        return Prepared(wrapped, [(n, p, 0) for n, p in wrapped.named_parameters() if p.requires_grad])
    if partition is None:
        raise ValueError(f"method {name} needs a partition (detect/score/partition stages)")
    layers, fixed = sorted(partition.layers), {}
    _freeze_all(model)
    if name == "layers":
        params = _ffn_parameters(model, layers)
    elif method.routing == "delta":
        modules = patch_delta(model, family_of(model), delta_tables(partition), method.update_rank,
                              method.train_factors, method.factor_rounds)
        params = _update_parameters(model, layers, modules)
        fixed = {f"layers.{i}.update.{key}": tensor for i, module in zip(layers, modules, strict=True)
                 for key, tensor in ({f"{name}.factor": factor for name, factor in module.fixed_factors().items()}
                                     | module.earlier_rounds()).items()}
    else:
        params = _ffn_parameters(model, layers)
        patch(model, family_of(model), partition.scale_tables())
    if method.attention_rank is not None:  # method landermt only (config): every pair shares it
        attention = patch_attention(model, family_of(model), layers, method.attention_rank)
        params += [(f"{path}.update", module.update, 0) for path, module in attention.items()]
    for _, p, _ in params:
        p.requires_grad_(True)
    if name == "layers":
        return Prepared(model, params)
    if name in ("ls", "lg"):
        for param_name, p, axis in params:
            general = partition.layers[int(param_name.split(".")[1])].general
            keep = general if name == "lg" else ~general
            shape = [1] * p.dim()
            shape[axis] = -1
            mask = keep.view(shape).to(p.dtype)
            p.register_hook(lambda grad, mask=mask: grad * mask)
    return Prepared(model, params, routed=METHOD_SPECS[name].routed, fixed=fixed,
                    factor_rounds=method.factor_rounds if fixed else 1)
