"""CAR modes after finetuning: the dev target loss of trained artifacts under each way of routing.

    python bench/routing_after_training.py [ARTIFACT ...]

For each artifact (default: the `landermt`, `lg` and `ls` runs of configs/quick-tuned.yaml) the
trained FFN weights are loaded into the default model, which is then evaluated on the same 48
FLORES dev examples as bench/routing_init_loss.py with every CAR mode (eqs. 8–9 with c; eqs. 8–9
with c and 1 − c swapped; plain masking) and unrouted (all neurons of every layer, no masking).
The artifacts were trained under one mode, so the table shows what the routing of a trained model
costs or gains at inference. Writes bench/results/routing_after_training.json and the matching
section of docs/RESULTS.md; rows for artifacts measured before and not named again are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from report import update_section  # bench/report.py, beside this script
from routing_init_loss import dev_examples, dev_loss

from landermt.artifact import load_artifact
from landermt.families import family_of
from landermt.models import load_model
from landermt.partition import CAR_MODES
from landermt.routing import patch, unpatch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARTIFACTS = [f"runs/quick-tuned-{m}/artifact" for m in ("landermt", "lg", "ls")]
COLUMNS = (*CAR_MODES, "unrouted")


def losses_of(directory: str) -> dict:
    """Dev loss of one artifact's trained weights under each CAR mode and unrouted."""
    artifact = load_artifact(directory)
    if artifact.ffn is None:
        raise SystemExit(f"{directory}: no ffn.safetensors, so nothing was trained; pass a finetuned artifact")
    model, tokenizer = load_model(dtype=artifact.dtype)
    family = family_of(model)
    artifact.apply(model)  # checks the base model and loads the trained FFN weights
    unpatch(model, family)
    items = dev_examples(tokenizer)
    row = {"trained with": artifact.manifest.car, "layers": artifact.manifest.layers}
    for car in CAR_MODES:
        partition = dataclasses.replace(artifact.partition, car=car)
        patch(model, family, partition.scale_tables())
        row[car] = round(dev_loss(model, tokenizer, items, partition), 3)
        unpatch(model, family)
        print(f"{directory} | {car}: {row[car]}", flush=True)
    row["unrouted"] = round(dev_loss(model, tokenizer, items, None), 3)
    print(f"{directory} | unrouted: {row['unrouted']}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="*", default=DEFAULT_ARTIFACTS, help="finetuned artifact directories")
    args = parser.parse_args()
    path = ROOT / "bench" / "results" / "routing_after_training.json"
    results = json.loads(path.read_text()) if path.exists() else {}  # rows of artifacts not named are kept
    results.update({directory: losses_of(directory) for directory in args.artifacts})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results)


def base_loss() -> float:
    """The unpatched base model's loss on the same examples, from bench/routing_init_loss.py's results."""
    return json.loads((ROOT / "bench" / "results" / "routing_init_loss.json").read_text())["base (no routing)"]


def write_markdown(results: dict) -> None:
    rows = ["| artifact | trained with | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for directory, row in results.items():
        best = min(row[c] for c in COLUMNS)
        cells = [f"**{row[c]:.2f}**" if row[c] == best else f"{row[c]:.2f}" for c in COLUMNS]
        rows.append(f"| `{directory}` | {row['trained with']} | " + " | ".join(cells) + " |")
    section = "\n".join([
        "## Routing after finetuning (dev target loss)",
        "",
        f"`python bench/routing_after_training.py {' '.join(results)}` (`bench/results/routing_after_training.json`):",
        "the trained FFN weights of each artifact under every CAR mode and unrouted, on the 48 FLORES dev examples",
        f"of the section above, where the base model scores {base_loss():.2f} (lower is better; best per row in bold).",
        "",
        *rows,
        "",
    ])
    update_section(ROOT / "docs" / "RESULTS.md", "## Routing after finetuning", section, "Results")


if __name__ == "__main__":
    main()
