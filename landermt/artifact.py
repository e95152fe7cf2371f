"""The LANDeRMT artifact: everything needed to route (and, once trained, run) a base model.

A directory with three files, never pickled:

* `manifest.json`: schema version, base model (name, weights sha256, type, sizes), languages,
  detected directions, selected layers, k, ε, CAR mode, c per routable pair and layer, D per
  direction, the prompt template, how scores were made and when/with what it was created.
* `partitions.safetensors`: per selected layer i, `layers.i.phi` [languages, p] float32 (Φ per
  language) and `layers.i.specific` [p] int64 (language index of each specific neuron, -1 for
  general ones: the general mask is `specific == -1`).
* `ffn.safetensors` (optional, written by training): the FFN weights of the selected layers,
  `layers.i.<module>.<weight|bias>` with the family's module names. Absent means base weights.

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
from landermt.partition import CAR_MODES, GENERAL, LayerPartition, Partition
from landermt.routing import RoutedFFN, patch

SCHEMA_VERSION = 1
MANIFEST, PARTITIONS, FFN = "manifest.json", "partitions.safetensors", "ffn.safetensors"


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
        missing = sorted(n for n in names - set(raw) if n not in ("extra",))
        unknown = sorted(set(raw) - names)
        if missing or unknown:
            raise ArtifactError(f"{source}: missing keys {missing}, unknown keys {unknown}")
        base = raw["base_model"]
        base_names = set(BaseModelInfo.__dataclass_fields__)
        if not isinstance(base, dict) or set(base) != base_names:
            raise ArtifactError(f"{source}: base_model must have exactly the keys {sorted(base_names)}")
        raw["base_model"] = BaseModelInfo(**base)
        manifest = cls(**raw)
        if manifest.car not in CAR_MODES:
            raise ArtifactError(f"{source}: car is {manifest.car!r}, expected one of {', '.join(CAR_MODES)}")
        if len(set(manifest.languages)) != len(manifest.languages) or len(manifest.languages) < 2:
            raise ArtifactError(f"{source}: languages must be at least two distinct codes")
        return manifest


@dataclass
class Artifact:
    manifest: Manifest
    partition: Partition
    ffn: dict[str, torch.Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the artifact was built in: its base weights hash is of the model in this dtype."""
        return getattr(torch, self.manifest.created.get("dtype", "torch.bfloat16").removeprefix("torch."))

    def apply(self, model: nn.Module, verify_base: bool = True) -> list[RoutedFFN]:
        """Check the base model, load trained FFN weights if any, patch the selected layers."""
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


def save_artifact(
    directory: str | Path, manifest: Manifest, partition: Partition, ffn: dict[str, torch.Tensor] | None = None
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, part in partition.layers.items():
        tensors[f"layers.{i}.phi"] = part.phi.float().contiguous()
        tensors[f"layers.{i}.specific"] = part.specific.long().contiguous()
    save_file(tensors, directory / PARTITIONS)
    if ffn is not None:
        save_file(ffn, directory / FFN)
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
    ffn = _read_tensors(directory / FFN) if (directory / FFN).exists() else None
    if ffn is not None:
        layer_keys = {key.split(".")[1] for key in ffn}
        if layer_keys != {str(i) for i in manifest.layers}:
            raise ArtifactError(f"{FFN}: holds layers {sorted(layer_keys)}, manifest selects {manifest.layers}")
    return Artifact(manifest, partition, ffn)
