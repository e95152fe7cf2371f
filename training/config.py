"""Run configuration: YAML validated by pydantic. Unknown keys and bad values are errors that name
the key path (e.g. `train.lr: Input should be greater than 0`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from training.data import TESTSETS


@dataclass(frozen=True)
class MethodSpec:
    """What one method needs and makes; training/methods.py builds it, training/run.py runs it."""

    partition: bool  # needs the detect / score / partition stages
    finetuned: bool
    routed: bool  # rows carry their pair's id, and the run writes a servable artifact
    trains: str
    saved: str


_ROUTED_SAVE = "artifact/: update.safetensors (routing delta) or ffn.safetensors (mask)"
METHOD_SPECS: dict[str, MethodSpec] = {
    "zero_shot": MethodSpec(False, False, False, "nothing", "nothing"),
    "few_shot": MethodSpec(False, False, False, "nothing (k FLORES dev examples in the prompt)", "nothing"),
    "full": MethodSpec(False, True, False, "every parameter", "trained.safetensors"),
    "lora": MethodSpec(False, True, False, "PEFT LoRA adapters on attention and MLP",
                       "trained.safetensors (adapters; merged for evaluation)"),
    "layers": MethodSpec(True, True, False, "all FFN neurons of the selected layers", "trained.safetensors"),
    "ls": MethodSpec(True, True, True, "the pair's language-specific neurons", _ROUTED_SAVE),
    "lg": MethodSpec(True, True, True, "the language-general neurons", _ROUTED_SAVE),
    "landermt": MethodSpec(True, True, True, "general + the pair's specific neurons", _ROUTED_SAVE),
}
Method = Literal[tuple(METHOD_SPECS)]
METHODS: tuple[str, ...] = tuple(METHOD_SPECS)
FINETUNED: tuple[str, ...] = tuple(name for name, spec in METHOD_SPECS.items() if spec.finetuned)
NEURON_METHODS: tuple[str, ...] = tuple(name for name, spec in METHOD_SPECS.items() if spec.partition)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelConfig(Strict):
    """A random model built on the fly (smoke tests): Gemma-3-style, tokenizer trained on the data."""

    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(128, gt=0)
    num_layers: int = Field(4, ge=2)
    vocab_size: int = Field(1000, ge=300)
    seed: int = 0


class ModelConfig(Strict):
    path: str | None = None  # None: the default model (Gemma 3 270M); else a local HF directory
    tiny: TinyModelConfig | None = None
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: landermt.models.resolve_dtype


class DataConfig(Strict):
    root: str | None = None  # None: $LANDERMT_DATA or ../shared/data
    languages: list[str] = ["de", "fr", "it", "ar", "zh"]  # each paired with English, both directions
    max_examples_per_direction: int | None = Field(None, gt=0)
    min_chars: int = Field(2, ge=1)
    max_chars: int = Field(400, gt=0)
    max_length_ratio: float = Field(3.0, gt=1.0)  # drop pairs whose character lengths differ more
    max_tokens: int = Field(256, gt=8)
    dev_examples_per_direction: int = Field(50, ge=0)  # FLORES dev lines for periodic evaluation
    # Finetune (and pick the best checkpoint) on these directions only, e.g. [en-de] for the transfer matrix;
    # detection, scoring and evaluation still cover every direction. None: all of them.
    train_directions: list[str] | None = None

    def directions(self) -> list[str]:
        """Both directions of every language paired with English: en-de, de-en, en-fr, ..."""
        return [d for lang in self.languages for d in (f"en-{lang}", f"{lang}-en")]

    def trained_directions(self) -> list[str]:
        return self.train_directions or self.directions()


# method.update_factor -> the FFN parts whose fixed factors come from the loss gradient (training.finetune.Trainer.
# align_factors, over ALIGN_BATCHES batches of the data order)
ALIGNED_PARTS = {"random": (), "gradient": ("up", "gate", "down"), "gradient-down": ("down",)}
ALIGN_BATCHES = 16


class MethodConfig(Strict):
    name: Method = "landermt"
    k: int = Field(4, ge=1)
    layers: list[int] | None = None  # None: the k detected layers; else these (a setting chosen on dev)
    epsilon: float = Field(0.9, ge=0.0, le=1.0)
    car: Literal["paper", "swapped", "off"] = "paper"  # rule mask only: the delta rule scales nothing
    routing: Literal["delta", "mask"] = "delta"  # landermt.routing: route the update (delta) or the neuron (mask)
    # rule delta: each neuron's update as `update_rank` trained numbers times a fixed random factor
    # (landermt.routing.DeltaFFN), one rank for every part or one per part ({up: 8, gate: 8, down: 32}: each of up,
    # gate and down named); None: a dense update
    update_rank: PositiveInt | dict[Literal["up", "gate", "down"], PositiveInt] | None = None
    # with update_rank: the second factor trains too, one per neuron group (the general neurons, each language's
    # specific ones), as LoRA's does (landermt.routing.DeltaFFN); False: one fixed random factor per weight
    train_factors: bool = False
    # with update_rank and fixed factors: "random" (noise), or "gradient": each factor spans the directions of the base
    # weight's loss gradient on the first batches (landermt.routing.aligned_factor; LoRA-GA's choice); "gradient-down":
    # only the down projection's (its output side), up and gate keep noise
    update_factor: Literal["random", "gradient", "gradient-down"] = "random"  # parts aligned: ALIGNED_PARTS
    # with update_factor gradient: rounds of factors; > 1 re-aligns them (to the loss gradient at the current weights)
    # factor_rounds - 1 times, evenly over training, keeping the earlier rounds' update frozen (DeltaFFN.retire)
    factor_rounds: int = Field(1, ge=1)
    # rule delta, method landermt: a language-general update of the routed layers' attention projections too
    # (landermt.routing.AttentionUpdate), factored at this rank; None: attention stays the base model's
    attention_rank: int | None = Field(None, ge=1)
    objective: Literal["lm", "translation"] = "lm"
    detect_samples: int = Field(64, ge=0)  # 0: no layer detection (then `layers` must be given)
    score_samples: int = Field(200, ge=1)
    few_shot: int = Field(5, ge=1)  # examples from FLORES dev, method few_shot
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    # module names LoRA adapts; None: attention and MLP (every family's names, training/methods.py)
    lora_targets: list[str] | None = None


class TrainConfig(Strict):
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    steps: int = Field(100, ge=1)  # optimizer steps in total (all directions mixed)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    eval_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(25, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    bucket_batches: int = Field(64, ge=1)  # batches per length-sorted chunk of the data order; 1: no bucketing
    # with method.factor_rounds > 1: warm the learning rate up again after each re-alignment, over the first
    # warmup (warmup_ratio·steps) steps of the round (ReLoRA's jagged schedule: each round's numbers start from zero
    # with fresh optimizer state)
    rewarm_rounds: bool = False


class EvalConfig(Strict):
    testsets: list[Literal[TESTSETS]] = ["flores"]  # training/data.py; flores_dev: dev lines for choosing by BLEU
    limit: int | None = Field(None, gt=0)  # sentences per direction; None: all
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    perplexity_lines: int = Field(100, ge=1)  # held-out monolingual lines per language


class RunConfig(Strict):
    name: str = "run"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.model.path and self.model.tiny:
            raise ValueError("model: give either path or tiny, not both")
        if self.method.layers is not None and (not self.method.layers or min(self.method.layers) < 0
                                               or len(set(self.method.layers)) != len(self.method.layers)):
            raise ValueError("method.layers: give distinct non-negative layer indices, or leave it out")
        if self.method.attention_rank is not None and (self.method.name, self.method.routing) != ("landermt", "delta"):
            raise ValueError("method.attention_rank: only for method landermt under routing delta")
        if isinstance(self.method.update_rank, dict) and len(self.method.update_rank) != 3:
            raise ValueError(f"method.update_rank: name a rank for each of up, gate and down, or give one number; "
                             f"got {self.method.update_rank}")
        if self.method.train_factors and self.method.update_rank is None:
            raise ValueError("method.train_factors: needs method.update_rank (the factors' rank)")
        if self.method.update_factor != "random" and (self.method.update_rank is None or self.method.train_factors):
            raise ValueError(f"method.update_factor: {self.method.update_factor} needs method.update_rank and fixed "
                             "factors (train_factors false)")
        if self.method.factor_rounds > 1 and self.method.update_factor != "gradient":
            raise ValueError("method.factor_rounds: more than one round needs method.update_factor gradient")
        if self.method.factor_rounds > self.train.steps:
            raise ValueError(f"method.factor_rounds: {self.method.factor_rounds} rounds need at least as many "
                             f"train.steps, got {self.train.steps}")
        if self.train.rewarm_rounds and self.method.factor_rounds == 1:
            raise ValueError("train.rewarm_rounds: needs method.factor_rounds > 1 (it warms up each new round)")
        if "en" in self.data.languages:
            raise ValueError("data.languages lists the languages paired with English; drop 'en'")
        unknown = set(self.data.train_directions or []) - set(self.data.directions())
        if unknown or self.data.train_directions == []:
            raise ValueError(f"data.train_directions: {', '.join(sorted(unknown)) or '(empty)'} not among "
                             f"{', '.join(self.data.directions())} (the directions of data.languages)")
        return self


class ConfigError(ValueError):
    pass


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """The YAML file, with `overrides` ("train.lr=3e-4", values parsed as YAML) applied before validation."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read YAML ({e})") from None
    for assignment in overrides:
        key, sep, value = assignment.partition("=")
        *sections, leaf = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {}) if isinstance(node, dict) else None
        if not sep or not key or not isinstance(node, dict):
            raise ConfigError(f"--set {assignment}: expected SECTION.KEY=VALUE, e.g. train.lr=3e-4")
        node[leaf] = yaml.safe_load(value)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
                             for err in e.errors())
        raise ConfigError(f"{path}: {problems}") from None
