"""Do the delta's fixed factors go stale? The share of each FFN weight's loss gradient that lies in the span of its
fixed factor, before training and with the trained update.

    python bench/factor_drift.py runs/step7-1200/delta-gradient-factors runs/step7-1200/delta-rounds

A neuron's update moves only along its weight's fixed factor (landermt.routing.DeltaFFN, rank r): the input side for
up and gate, the output side for down. `method.update_factor: gradient` sets that factor to the top-r directions of
the base weights' loss gradient, so at step 0 it holds most of the gradient; as training moves the weights the
gradient turns, and what it asks outside the factor's span the update cannot follow. Measured on 16 batches of the
data order no run trained on (from batch --first-batch), the gradient summed over them as the alignment does: the
share of its squared norm inside the span of the factor the run ended with, and, for comparison, inside its own top
r singular directions (the most any rank-r factor could hold). "base" is the first run with its update (and earlier
rounds) zeroed and, for a run in rounds of factors, its first round's factor in place. Means over the routed layers.
Writes bench/results/factor_drift.json and the "Factor drift" section of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from report import update_section  # bench/report.py, beside this script

from landermt.models import weights_sha256
from landermt.routing import DeltaFFN
from training.config import ALIGN_BATCHES, load_config
from training.finetune import order_batches, summed_gradients
from training.run import Run, finetune_data, load_base, stage_finetune, stage_partition

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("up", "gate", "down")


def gradients(model, examples, config, pair_id, pad_id: int, first: int) -> dict[tuple[int, str], torch.Tensor]:
    """{(module index, weight name): the base weight's loss gradient summed over ALIGN_BATCHES batches from `first`}."""
    modules = [m for m in model.modules() if isinstance(m, DeltaFFN)]
    weights = {(i, name): getattr(m, name).weight for i, m in enumerate(modules) for name in m.factored}
    batches = order_batches(examples, [len(e.input_ids) for _, e in examples], config, first, ALIGN_BATCHES, pad_id,
                            pair_id)
    return dict(zip(weights, summed_gradients(model, batches, list(weights.values())), strict=True))


def neuron_axis(module: DeltaFFN, name: str) -> int:
    return module.family.neuron_axis(module.parts[name])


def shares(module: DeltaFFN, name: str, gradient: torch.Tensor) -> tuple[float, float]:
    """(share of the gradient's squared norm in the span of `name`'s fixed factor, share in its own top r)."""
    axis = neuron_axis(module, name)
    factor = getattr(module, f"{name}_factor")[0].float()  # [r, d_in] (axis 0) or [d_out, r] (axis 1)
    basis, _ = torch.linalg.qr(factor.T if axis == 0 else factor)
    inside = gradient @ basis if axis == 0 else basis.T @ gradient
    singular = torch.linalg.svdvals(gradient)
    rank = basis.shape[1]
    total = float(singular.square().sum())
    return float(inside.square().sum()) / total, float(singular[:rank].square().sum()) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished delta runs with gradient factors")
    parser.add_argument("--first-batch", type=int, default=2000, help="batches no run trained on (1,200 steps: 0-1199)")
    args = parser.parse_args()

    rows = {}
    for number, output in enumerate(args.runs):
        config = load_config(output / "config.yaml")
        run = Run(config, output)
        model, tokenizer = load_base(run)
        sha = weights_sha256(model)
        artifact = stage_partition(run, model, tokenizer, sha)
        model, _ = stage_finetune(run, model, tokenizer, artifact, False, sha)  # cached: the trained weights
        examples, _ = finetune_data(config, tokenizer)  # the run's data order (its trained directions)

        def pair_id(pair, partition=artifact.partition) -> int:
            return partition.pair_id(pair.source_lang, pair.target_lang)

        modules = [m for m in model.modules() if isinstance(m, DeltaFFN)]
        states = ["trained", "base"] if number == 0 else ["trained"]
        for state in states:
            if state == "base":
                with torch.no_grad():
                    for module in modules:
                        for name in module.factored:
                            if hasattr(module, f"{name}_earlier_factor"):  # rounds: the first round's factor
                                axis, factor = neuron_axis(module, name), getattr(module, f"{name}_factor")
                                factor.copy_(getattr(module, f"{name}_earlier_factor").narrow(
                                    1 + axis, 0, factor.shape[1 + axis]))
                        for tensor in [*module.update.values(), *module.earlier_rounds().values()]:
                            tensor.zero_()
            grads = gradients(model, examples, config.train, pair_id, tokenizer.pad_token_id, args.first_batch)
            measured = {part: [] for part in PARTS}
            for (index, name), gradient in grads.items():
                module = modules[index]
                measured[module.parts[name]].append(shares(module, name, gradient))
            row = {part: {"in_factor": round(sum(a for a, _ in v) / len(v), 3),
                          "top_r": round(sum(b for _, b in v) / len(v), 3)} for part, v in measured.items() if v}
            rows[f"{output} ({state})"] = row
            print(output, state, json.dumps(row), flush=True)

    out = ROOT / "bench" / "results" / "factor_drift.json"
    out.write_text(json.dumps({"first_batch": args.first_batch, "batches": ALIGN_BATCHES, "runs": rows}, indent=2)
                   + "\n")
    table = ["| run (state) | up: in factor | gate: in factor | down: in factor | top r (up / gate / down) |",
             "|---|---:|---:|---:|---:|"]
    for name, row in rows.items():
        table.append(f"| {name} | " + " | ".join(f"{row[p]['in_factor']:.0%}" for p in PARTS) + " | "
                     + " / ".join(f"{row[p]['top_r']:.0%}" for p in PARTS) + " |")
    section = "\n".join([
        "## Factor drift",
        "",
        f"`python bench/factor_drift.py {' '.join(map(str, args.runs))}` (`bench/results/factor_drift.json`): the "
        "share of each FFN weight's loss gradient (summed over 16 batches no run trained on, from batch "
        f"{args.first_batch}) inside the span of the run's fixed factor, and inside the gradient's own top r "
        "directions (the most a rank-r factor could hold); means over the 18 routed layers. \"base\": the update "
        "zeroed and the first factor in place (step 0).",
        "",
        *table,
        "",
    ])
    update_section(ROOT / "docs" / "RESULTS.md", "## Factor drift", section, "Results")
    print(section)


if __name__ == "__main__":
    main()
