"""The transfer matrix of the paper's Fig. 3: finetune on one direction, measure the gain on all.

    python bench/transfer.py [--config configs/quick-tuned.yaml] [--name NAME] [--directions en-de,en-zh]
                             [--steps 100] [--limit 20]

For each training direction d: `python -m training.run` on the config with
`data.train_directions: [d]` (detection, scoring and the partition still cover every language, so
the routing is the one served), `--steps` optimizer steps and `--limit` FLORES devtest sentences per
direction, into runs/transfer-NAME/d (NAME: `--name`, default the config's name). The baseline is
the same config's zero-shot run. Cell (d, e) is BLEU on e after finetuning on d minus zero-shot
BLEU on e. Runs resume and cache like any
training run; the partition is computed once (or taken from `--partition-from`, a finished run of
the same config) and copied to the others. Rows of an earlier results file are kept when it was made
with the same config, method, steps and limit and its zero-shot BLEU equals this run's, so the matrix
can be filled a few directions at a time (runs/ is not kept between machines).

Writes bench/results/transfer_NAME.json, docs/figures/transfer_NAME.png and the "Transfer (NAME)"
section of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from report import update_section  # noqa: E402  (bench/report.py, beside this script)

from training.config import load_config  # noqa: E402
from training.run import STAGES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = ("artifact/manifest.json", "artifact/partitions.safetensors", "base_perplexity.json")


def train(config: dict, output: Path) -> dict:
    """One training.run into `output` (resumable, cached): its FLORES scores per direction."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / "input.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    subprocess.run([sys.executable, "-m", "training.run", "--config", str(path), "--output", str(output), "--resume"],
                   check=True, cwd=ROOT)
    return json.loads((output / "eval.json").read_text())["testsets"]["flores"]


def share_partition(source: Path, target: Path) -> None:
    """Seed `target` with the partition (and base perplexity, if measured) `source` computed; training.run
    reuses them only if their recorded inputs match its own (else it recomputes)."""
    if not all((source / name).exists() for name in SHARED[:2]) or (target / STAGES).exists():
        return
    stages = json.loads((source / STAGES).read_text())
    for name in SHARED:
        if (source / name).exists():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / name, target / name)
    (target / STAGES).write_text(json.dumps({k: stages[k] for k in ("partition", "base_perplexity") if k in stages},
                                            indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quick-tuned.yaml")
    parser.add_argument("--name", default=None,
                        help="names the runs, results and section (default: the config's name); give a new one when "
                             "the config file changed, to keep the earlier matrix")
    parser.add_argument("--directions", default=None, help="training directions, comma-separated (default: all)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per training direction")
    parser.add_argument("--limit", type=int, default=20, help="FLORES devtest sentences per evaluated direction")
    parser.add_argument("--partition-from", type=Path, default=None,
                        help="a finished run of the same config whose partition to reuse")
    args = parser.parse_args()
    base = load_config(args.config)
    everything = base.data.directions()
    trained = args.directions.split(",") if args.directions else everything
    if unknown := sorted(set(trained) - set(everything)):
        parser.error(f"--directions: {', '.join(unknown)} not among {', '.join(everything)}")
    config = base.model_dump()
    name = args.name or base.name
    config["name"] = f"transfer-{name}"
    config["train"]["steps"] = args.steps
    config["train"]["eval_every"] = min(config["train"]["eval_every"], args.steps)
    config["eval"]["limit"] = args.limit
    runs = ROOT / "runs" / config["name"]

    zero_shot = train(config | {"method": config["method"] | {"name": "zero_shot"}}, runs / "zero_shot")
    gains: dict[str, dict[str, float]] = {}
    for i, d in enumerate(trained):
        source = runs / trained[0] if i else args.partition_from
        if source is not None:
            share_partition(source, runs / d)
        scores = train(config | {"data": config["data"] | {"train_directions": [d]}}, runs / d)
        gains[d] = {e: round(scores[e]["bleu"] - zero_shot[e]["bleu"], 2) for e in everything}

    result = {"config": args.config, "method": base.method.name, "steps": args.steps, "limit": args.limit,
              "settings": {"method": config["method"], "lr": config["train"]["lr"]},
              "zero_shot_bleu": {e: zero_shot[e]["bleu"] for e in everything}, "gain": gains}
    path = ROOT / "bench" / "results" / f"transfer_{name}.json"
    earlier = kept_rows(path, result)
    result["gain"] = {d: (gains | earlier)[d] for d in everything if d in gains | earlier}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    figure = ROOT / "docs" / "figures" / f"transfer_{name}.png"
    plot(result["gain"], everything, figure)
    write_markdown(result, name, figure)


def kept_rows(path: Path, result: dict) -> dict[str, dict[str, float]]:
    """Rows of an earlier results file that this run did not redo, if that file is comparable."""
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    same = ("config", "method", "settings", "steps", "limit", "zero_shot_bleu")
    if any(earlier.get(key) != result[key] for key in same):
        print(f"{path}: made with other settings or another zero-shot baseline; its rows are dropped", file=sys.stderr)
        return {}
    return {d: g for d, g in earlier["gain"].items() if d not in result["gain"]}


def plot(gains: dict[str, dict[str, float]], columns: list[str], path: Path) -> None:
    rows = list(gains)
    values = [[gains[r][c] for c in columns] for r in rows]
    bound = max(1.0, max(abs(v) for row in values for v in row))
    fig, ax = plt.subplots(figsize=(2 + 0.8 * len(columns), 2 + 0.6 * len(rows)))
    image = ax.imshow(values, cmap="RdBu", vmin=-bound, vmax=bound)
    ax.set_xticks(range(len(columns)), columns, rotation=45)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("evaluated direction")
    ax.set_ylabel("finetuned direction")
    for y, row in enumerate(values):
        for x, v in enumerate(row):
            ax.text(x, y, f"{v:+.1f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, label="BLEU gain over zero-shot")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_markdown(r: dict, name: str, figure: Path) -> None:
    columns = list(r["zero_shot_bleu"])
    subset = f" --directions {','.join(r['gain'])}" if len(r["gain"]) < len(columns) else ""
    table = ["| finetuned on | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns),
             "| (zero-shot BLEU) | " + " | ".join(f"{r['zero_shot_bleu'][c]:.1f}" for c in columns) + " |"]
    table += [f"| {d} | " + " | ".join(f"{g[c]:+.1f}" for c in columns) + " |" for d, g in r["gain"].items()]
    section = "\n".join([
        f"## Transfer ({name})", "",
        f"`python bench/transfer.py --config {r['config']} --name {name}{subset} --steps {r['steps']} "
        f"--limit {r['limit']}` (`bench/results/transfer_{name}.json`): {r['method']} (rule "
        f"{r['settings']['method']['routing']}, lr {r['settings']['lr']:g}) finetuned on one direction for "
        f"{r['steps']} steps, "
        f"BLEU gain over zero-shot on each direction (first {r['limit']} FLORES devtest sentences), as in the "
        "paper's Fig. 3.", "", *table, "", f"![transfer]({figure.relative_to(ROOT / 'docs')})", ""])
    update_section(ROOT / "docs" / "RESULTS.md", f"## Transfer ({name})", section, "Results")


if __name__ == "__main__":
    main()
