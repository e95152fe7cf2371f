"""The LANDeRMT artifact: everything needed to route (and, once trained, run) a base model.

A directory with three files, never pickled:

* `manifest.json`: schema version, base model (name, weights sha256, type, sizes), languages,
  detected directions, selected layers, k, ε, CAR mode, c per routable pair and layer, D per
  direction, the prompt template, how scores were made and when/with what it was created.
* `partitions.safetensors`: per selected layer i, `layers.i.phi` [languages, p] float32 (Φ per
  language) and `layers.i.specific` [p] int64 (language index of each specific neuron, -1 for
  general ones: the general mask is `specific == -1`).
* `ffn.safetensors` (optional, written by training, routing rule `mask`): the FFN weights of the selected
  layers, `layers.i.<module>.<weight|bias>` with the family's module names. Absent means base weights.
* `update.safetensors` (optional, written by training, routing rule `delta`): only what differs from the
  base, the update trained − base of the same parameters under the same keys (the down bias, no neuron's,
  is never updated). Absent means a zero update: the base model. When attention was trained too
  (method.attention_rank) it also holds `layers.i.<attention projection path>.weight` (e.g.
  `layers.3.self_attn.q_proj.weight`): the language-general attention update (landermt.routing.AttentionUpdate).

The manifest's `routing` names the rule (landermt.routing); artifacts made before it existed are `mask`.

`load_artifact` validates schema, keys, shapes and values, and `Artifact.apply` checks the base
model's weights hash before patching; each failure names what mismatched.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from landermt.families import Family, family_of
from landermt.models import weights_sha256
from landermt.partition import CAR_MODES, GENERAL, LayerPartition, Partition, delta_tables
from landermt.routing import ROUTING_RULES, AttentionUpdate, DeltaFFN, RoutedFFN, patch, patch_attention, patch_delta

SCHEMA_VERSION = 1
MANIFEST, PARTITIONS, FFN, UPDATE = "manifest.json", "partitions.safetensors", "ffn.safetensors", "update.safetensors"


class ArtifactError(ValueError):
    """An artifact that is missing, corrupted, or does not fit the model it is applied to."""


@dataclass
class BaseModelInfo:
    name: str
    sha256: str
    model_type: str
    num_layers: int
    intermediate_size: int


@dataclass
class Manifest:
    base_model: BaseModelInfo
    languages: list[str]
    directions: list[str]  # the source-target directions layers were detected on
    layers: list[int]
    k: int
    epsilon: float
    car: str
    car_ratios: dict[str, dict[str, float]]  # routable pair "a-b" -> layer -> c
    differences: dict[str, list[float]]  # direction -> D (eq. 2), one value per layer i = 0 … L−2
    layer_rule: str
    prompt_template: str
    scoring: dict
    created: dict
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)
    routing: str = "mask"  # landermt.routing.ROUTING_RULES; absent in artifacts made before the delta rule

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, source: str) -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ArtifactError(f"{source}: expected a JSON object")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArtifactError(f"{source}: schema_version {version!r}, this code reads {SCHEMA_VERSION}")
        names = set(cls.__dataclass_fields__)
        missing = sorted(n for n in names - set(raw) if n not in ("extra", "routing"))
        unknown = sorted(set(raw) - names)
        if missing or unknown:
            raise ArtifactError(f"{source}: missing keys {missing}, unknown keys {unknown}")
        base = raw["base_model"]
        base_names = set(BaseModelInfo.__dataclass_fields__)
        if not isinstance(base, dict) or set(base) != base_names:
            raise ArtifactError(f"{source}: base_model must have exactly the keys {sorted(base_names)}")
        raw["base_model"] = BaseModelInfo(**base)
        manifest = cls(**raw)
        if manifest.routing not in ROUTING_RULES:
            rules = ", ".join(ROUTING_RULES)
            raise ArtifactError(f"{source}: routing is {manifest.routing!r}, expected one of {rules}")
        if manifest.car not in CAR_MODES:
            raise ArtifactError(f"{source}: car is {manifest.car!r}, expected one of {', '.join(CAR_MODES)}")
        if len(set(manifest.languages)) != len(manifest.languages) or len(manifest.languages) < 2:
            raise ArtifactError(f"{source}: languages must be at least two distinct codes")
        return manifest


@dataclass
class Artifact:
    manifest: Manifest
    partition: Partition
    ffn: dict[str, torch.Tensor] | None = None  # rule mask: trained FFN weights
    update: dict[str, torch.Tensor] | None = None  # rule delta: trained − base

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the artifact was built in: its base weights hash is of the model in this dtype."""
        return getattr(torch, self.manifest.created.get("dtype", "torch.bfloat16").removeprefix("torch."))

    def apply(self, model: nn.Module, verify_base: bool = True) -> list[RoutedFFN] | list[DeltaFFN]:
        """Check the base model, patch the selected layers by the manifest's rule, load what training made."""
        family = family_of(model)
        base = self.manifest.base_model
        layers = family.decoder_layers(model)
        size = family.intermediate_size(model)
        if (model.config.model_type, len(layers), size) != (base.model_type, base.num_layers, base.intermediate_size):
            raise ArtifactError(
                f"artifact is for a {base.model_type} model with {base.num_layers} layers of "
                f"{base.intermediate_size} FFN neurons, got {model.config.model_type} with "
                f"{len(layers)} layers of {size}"
            )
        if verify_base and (actual := weights_sha256(model)) != base.sha256:
            raise ArtifactError(
                f"base model weights sha256 {actual[:16]}… does not match the artifact's "
                f"{base.sha256[:16]}… ({base.name}, {self.manifest.created.get('dtype', '?')}): the artifact "
                f"was built on another model or dtype (this one is {next(model.parameters()).dtype})"
            )
        if self.manifest.routing == "delta":
            modules = patch_delta(model, family, delta_tables(self.partition))
            if self.update is not None:
                attention = (patch_attention(model, family, self.manifest.layers)
                             if attention_keys(self.update, family) else {})
                load_update(modules, self.manifest.layers, self.update, attention)
            return modules
        if self.ffn is not None:
            load_ffn_weights(model, family, self.ffn)
        return patch(model, family, self.partition.scale_tables())


def ffn_weights(model: nn.Module, family: Family, layers: list[int]) -> dict[str, torch.Tensor]:
    """The FFN parameters of `layers`, keyed `layers.i.<module>.<weight|bias>`."""
    out = {}
    ffns = family.ffns(model)
    for i in layers:
        for name, param in ffns[i].named_parameters():
            out[f"layers.{i}.{name}"] = param.detach().cpu().contiguous()
    return out


def attention_keys(update: dict[str, torch.Tensor], family: Family) -> list[str]:
    """The keys of `update` that hold an attention update (`layers.i.<projection path>.weight`)."""
    return [key for key in update if key.split(".", 2)[-1].removesuffix(".weight") in family.attention]


def update_weights(modules: list[DeltaFFN], layers: list[int], attention: dict[str, AttentionUpdate] | None = None
                   ) -> dict[str, torch.Tensor]:
    """The dense update of each DeltaFFN (of `layers`, in order), keyed `layers.i.<module>.<weight|bias>`, and of
    each attention projection in `attention` (landermt.routing.patch_attention's keys), `<its key>.weight`."""
    with torch.no_grad():
        out = {f"layers.{i}.{key.replace(':', '.')}": p.detach().cpu().contiguous()
               for i, module in zip(layers, modules, strict=True) for key, p in module.dense_update().items()}
        out.update({f"{key}.weight": module.dense_update().detach().cpu().contiguous()
                    for key, module in (attention or {}).items()})
        return out


def load_update(modules: list[DeltaFFN], layers: list[int], weights: dict[str, torch.Tensor],
                attention: dict[str, AttentionUpdate] | None = None) -> None:
    """Copy `update_weights` output into the DeltaFFN (and AttentionUpdate) modules, checking every key and shape
    first."""
    targets = {f"layers.{i}.{key.replace(':', '.')}": p
               for i, module in zip(layers, modules, strict=True) for key, p in module.update.items()}
    targets.update({f"{key}.weight": module.update for key, module in (attention or {}).items()})
    for key, value in weights.items():
        if key not in targets:
            raise ArtifactError(f"{UPDATE}: {key} is not an updated parameter of this model's routed layers")
        if targets[key].shape != value.shape:
            raise ArtifactError(f"{UPDATE}: {key} has shape {tuple(value.shape)}, model has "
                                f"{tuple(targets[key].shape)}")
    with torch.no_grad():
        for key, value in weights.items():
            targets[key].copy_(value)


def load_ffn_weights(model: nn.Module, family: Family, weights: dict[str, torch.Tensor]) -> None:
    """Copy `ffn_weights` output back into the model, checking every key and shape first."""
    ffns = family.ffns(model)
    targets = {}
    for key, value in weights.items():
        _, index, name = key.split(".", 2)
        params = dict(ffns[int(index)].named_parameters()) if int(index) < len(ffns) else {}
        if name not in params:
            raise ArtifactError(f"{FFN}: {key} is not an FFN parameter of this model")
        if params[name].shape != value.shape:
            raise ArtifactError(f"{FFN}: {key} has shape {tuple(value.shape)}, model has {tuple(params[name].shape)}")
        targets[key] = params[name]
    with torch.no_grad():
        for key, param in targets.items():
            param.copy_(weights[key])


def save_artifact(directory: str | Path, manifest: Manifest, partition: Partition,
                  ffn: dict[str, torch.Tensor] | None = None, update: dict[str, torch.Tensor] | None = None) -> Path:
    """`ffn` for rule mask, `update` for rule delta (the manifest's `routing`)."""
    if (ffn if manifest.routing == "delta" else update) is not None:
        raise ValueError(f"routing {manifest.routing!r} stores {'update' if manifest.routing == 'delta' else 'ffn'}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)  # until it is written again, the directory is incomplete
    tensors = {}
    for i, part in partition.layers.items():
        tensors[f"layers.{i}.phi"] = part.phi.float().contiguous()
        tensors[f"layers.{i}.specific"] = part.specific.long().contiguous()
    save_file(tensors, directory / PARTITIONS)
    for name, weights in ((FFN, ffn), (UPDATE, update)):  # an artifact saved again keeps no stale weights
        (directory / name).unlink(missing_ok=True)
        if weights is not None:
            save_file(weights, directory / name)
    (directory / MANIFEST).write_text(manifest.to_json() + "\n")  # last: marks the artifact complete
    return directory


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable or corrupted safetensors file ({e})") from None


def load_artifact(directory: str | Path) -> Artifact:
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST}; not a LANDeRMT artifact (or an incomplete one)")
    manifest = Manifest.from_json((directory / MANIFEST).read_text(), str(directory / MANIFEST))
    if not (directory / PARTITIONS).is_file():
        raise ArtifactError(f"{directory}: {PARTITIONS} is missing")
    tensors = _read_tensors(directory / PARTITIONS)
    expected = {f"layers.{i}.{n}" for i in manifest.layers for n in ("phi", "specific")}
    if set(tensors) != expected:
        raise ArtifactError(
            f"{PARTITIONS}: keys do not match manifest layers {manifest.layers} "
            f"(missing {sorted(expected - set(tensors))}, unexpected {sorted(set(tensors) - expected)})"
        )
    n_lang, p = len(manifest.languages), manifest.base_model.intermediate_size
    layers = {}
    for i in manifest.layers:
        phi, specific = tensors[f"layers.{i}.phi"], tensors[f"layers.{i}.specific"]
        if tuple(phi.shape) != (n_lang, p) or tuple(specific.shape) != (p,):
            raise ArtifactError(
                f"{PARTITIONS}: layer {i} has phi {tuple(phi.shape)} and specific {tuple(specific.shape)}, "
                f"expected ({n_lang}, {p}) and ({p},)"
            )
        if specific.min() < GENERAL or specific.max() >= n_lang:
            raise ArtifactError(f"{PARTITIONS}: layer {i} assigns neurons to languages outside 0…{n_lang - 1}")
        n_general = int((specific == GENERAL).sum())
        if n_general != math.floor(manifest.epsilon * p):
            raise ArtifactError(
                f"{PARTITIONS}: layer {i} has {n_general} general neurons, ε={manifest.epsilon} "
                f"implies {math.floor(manifest.epsilon * p)}"
            )
        layers[i] = LayerPartition(phi=phi, specific=specific)
    partition = Partition(tuple(manifest.languages), layers, manifest.epsilon, manifest.car)
    for pair, by_layer in partition.car_ratios().items():
        for i, c in by_layer.items():
            stored = manifest.car_ratios.get(pair, {}).get(str(i))
            if stored is None or not math.isclose(stored, c, rel_tol=1e-5, abs_tol=1e-9):
                raise ArtifactError(f"{MANIFEST}: c for {pair} layer {i} is {stored}, the partition gives {c:.6g}")
    own, other = (UPDATE, FFN) if manifest.routing == "delta" else (FFN, UPDATE)
    if (directory / other).exists():
        raise ArtifactError(f"{directory}: {other} does not belong to an artifact with routing {manifest.routing!r}")
    weights = _read_tensors(directory / own) if (directory / own).exists() else None
    if weights is not None:
        layer_keys = {key.split(".")[1] for key in weights}
        if layer_keys != {str(i) for i in manifest.layers}:
            raise ArtifactError(f"{own}: holds layers {sorted(layer_keys)}, manifest selects {manifest.layers}")
    if manifest.routing == "delta":
        return Artifact(manifest, partition, update=weights)
    return Artifact(manifest, partition, ffn=weights)
