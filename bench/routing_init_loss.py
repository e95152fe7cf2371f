"""How much does routing hurt before any finetuning? Dev target loss of the default model with
the routed CAR FFN in different layer sets, CAR modes and Φ normalisations.

    python bench/routing_init_loss.py

Scores Φ (eq. 4) for all 18 layers once (120 sentences per language), then for each setting
builds the partition (eq. 5, ε = 0.9), patches the model and measures the mean target-token loss
on 48 FLORES dev examples (6 directions × 8). Then, at the tuned setting (layers 12-15, raw Φ),
the same loss for a range of ε: the share of general neurons decides how many neurons each pair
loses. Writes bench/results/routing_init_loss.json and the matching section of docs/RESULTS.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from report import update_section  # bench/report.py, beside this script

from landermt.data import sample, training_corpora
from landermt.families import family_of
from landermt.models import load_model
from landermt.partition import CAR_MODES, Partition, build_partition
from landermt.prompts import DEFAULT_TEMPLATE, batches, collate, text_example, translation_example
from landermt.routing import patch, unpatch
from landermt.score import neuron_awareness
from training.data import flores
from training.finetune import Batch, mean_target_loss

ROOT = Path(__file__).resolve().parent.parent
LANGUAGES = ("en", "ar", "de", "fr", "it", "zh")
DIRECTIONS = [("en", "de"), ("de", "en"), ("en", "zh"), ("zh", "en"), ("en", "ar"), ("fr", "en")]
LAYER_SETS = {"0-3 (detected)": [0, 1, 2, 3], "4-7": [4, 5, 6, 7], "8-11": [8, 9, 10, 11],
              "12-15": [12, 13, 14, 15], "14-17": [14, 15, 16, 17]}
EPSILONS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
EPSILON_LAYERS = "12-15"


def dev_examples(tokenizer) -> list[tuple[tuple[str, str], dict]]:
    """((source, target), example) for the first 8 FLORES dev sentences of each of DIRECTIONS."""
    return [((s, t), translation_example(tokenizer, DEFAULT_TEMPLATE, s, t, a, b, 160))
            for s, t in DIRECTIONS for a, b in flores(None, "dev", s, t)[:8]]


def dev_loss(model, tokenizer, items: list, partition: Partition | None) -> float:
    """Mean target-token loss over `items` in batches of 8; each row routed to its pair, or unrouted."""
    losses = []
    for start in range(0, len(items), 8):
        chunk = items[start : start + 8]
        ids = torch.tensor([partition.pair_id(*p) for p, _ in chunk]) if partition else None
        with torch.no_grad():
            batch = Batch(collate([e for _, e in chunk], tokenizer.pad_token_id), ids)
            losses.append(mean_target_loss(model, batch).item())
    return sum(losses) / len(losses)


def main() -> None:
    model, tokenizer = load_model()
    family = family_of(model)
    corpora = training_corpora()
    scores: dict[int, list[torch.Tensor]] = {i: [] for i in range(18)}
    for seed, lang in enumerate(LANGUAGES):
        texts = [t for c in corpora if lang in (c.first, c.second) for t in c.side(lang)]
        examples = [text_example(tokenizer, t, 128) for t in sample(texts, 120, seed)]
        phi = neuron_awareness(model, family, batches(examples, 16, tokenizer.pad_token_id), list(range(18)),
                               desc=f"score {lang}")
        for i in range(18):
            scores[i].append(phi[i])
    items = dev_examples(tokenizer)

    def routed_loss(phi: dict[int, torch.Tensor], epsilon: float, car: str) -> float:
        partition = build_partition(phi, LANGUAGES, epsilon, car)
        patch(model, family, partition.scale_tables())
        loss = dev_loss(model, tokenizer, items, partition)
        unpatch(model, family)
        return round(loss, 3)

    results = {"base (no routing)": dev_loss(model, tokenizer, items, None), "settings": {}, "epsilon": {}}
    for name, layers in LAYER_SETS.items():
        for normalisation in ("raw", "per-language mean"):
            phi = {i: torch.stack(scores[i]) for i in layers}
            if normalisation != "raw":
                phi = {i: p / p.mean(dim=1, keepdim=True) for i, p in phi.items()}
            for car in CAR_MODES:
                key = f"{name} | {normalisation} | {car}"
                results["settings"][key] = routed_loss(phi, 0.9, car)
                print(f"{key}: {results['settings'][key]}", flush=True)
    phi = {i: torch.stack(scores[i]) for i in LAYER_SETS[EPSILON_LAYERS]}
    for epsilon in EPSILONS:
        results["epsilon"][str(epsilon)] = {car: routed_loss(phi, epsilon, car) for car in CAR_MODES}
        print(f"ε={epsilon}: {results['epsilon'][str(epsilon)]}", flush=True)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "routing_init_loss.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results)


def write_markdown(results: dict) -> None:
    rows = ["| layers | Φ | paper | swapped | off |", "|---|---|---:|---:|---:|"]
    for name in LAYER_SETS:
        for normalisation in ("raw", "per-language mean"):
            cells = [results["settings"][f"{name} | {normalisation} | {car}"] for car in CAR_MODES]
            rows.append(f"| {name} | {normalisation} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    section = "\n".join([
        "## Routing before finetuning (dev target loss)",
        "",
        "`python bench/routing_init_loss.py` (`bench/results/routing_init_loss.json`): Gemma 3 270M, bf16, 48 FLORES",
        f"dev examples (6 directions × 8); the unpatched model scores **{results['base (no routing)']:.2f}**.",
        "",
        *rows,
        "",
        f"The share of general neurons at layers {EPSILON_LAYERS} (raw Φ): with ε → 1 each pair loses fewer neurons, "
        "and at ε = 1 plain masking (`off`) is the unpatched model.",
        "",
        "| ε | " + " | ".join(CAR_MODES) + " |",
        "|---:|" + "---:|" * len(CAR_MODES),
        *(f"| {epsilon} | " + " | ".join(f"{loss:.2f}" for loss in cells.values()) + " |"
          for epsilon, cells in results["epsilon"].items()),
        "",
    ])
    update_section(ROOT / "docs" / "RESULTS.md", "## Routing before finetuning", section, "Results")


if __name__ == "__main__":
    main()
