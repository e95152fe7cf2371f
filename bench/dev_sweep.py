"""A FLORES dev-loss sweep: one short training run per variant of a config, compared on the dev set only.

    python bench/dev_sweep.py configs/sweeps/step7.yaml [--only NAME,NAME]

The sweep file names a base config, the steps every variant trains, how often dev loss is measured, and
the variants, each a mapping of `--set` overrides (`train.lr: 3.0e-4`, `method.name: lora`, ...). Every
variant is a `python -m training.run --skip-eval` into runs/sweep-SWEEP/NAME (resumable and cached like any
run; variants with the same partition settings share the scored partition). Devtest is never touched.

Writes bench/results/dev_sweep_SWEEP.json (per variant: dev loss per measured step, the best, median
seconds per step without the dev-loss steps, peak training memory) and the "Dev sweep (SWEEP)" section of
docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml
from report import update_section  # noqa: E402  (bench/report.py, beside this script)
from transfer import share_partition  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_variant(base: str, overrides: dict, output: Path) -> None:
    sets = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    command = [sys.executable, "-m", "training.run", "--config", base, "--output", str(output), "--resume",
               "--skip-eval"] + [arg for s in sets for arg in ("--set", s)]
    subprocess.run(command, check=True, cwd=ROOT)


def summary(output: Path) -> dict:
    """What the run's train_log.jsonl says: dev loss per step, the best, s/step, peak memory."""
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    seconds = [b["seconds"] - a["seconds"] for a, b in zip(log, log[1:], strict=False) if "dev_loss" not in b]
    dev = {str(entry["step"]): entry["dev_loss"] for entry in log if "dev_loss" in entry}  # str: as JSON has it
    return {"dev_loss": dev, "best_dev_loss": min(dev.values()), "steps": log[-1]["step"],
            "seconds_per_step": round(statistics.median(seconds), 2) if seconds else None,
            "peak_rss_mib": max(entry["peak_rss_mib"] or 0 for entry in log)}


def partition_key(overrides: dict) -> tuple:
    """Variants that agree on these share one scored partition."""
    return tuple(sorted((k, json.dumps(v)) for k, v in overrides.items() if k.startswith("method.")
                        and k not in ("method.name", "method.routing", "method.lora_rank", "method.lora_alpha",
                                      "method.lora_targets", "method.update_rank", "method.train_factors",
                                      "method.update_factor")))


def span(value: object) -> object:
    """[0, 1, ..., 17] as "0-17" (layer lists); anything else as it is."""
    if (isinstance(value, list) and len(value) > 2 and all(isinstance(v, int) for v in value)
            and value == list(range(value[0], value[-1] + 1))):
        return f"{value[0]}-{value[-1]}"
    return value


def markdown(name: str, sweep: dict, results: dict) -> str:
    steps = sorted({int(s) for r in results.values() for s in r["dev_loss"]})
    lines = [f"## Dev sweep ({name})", "",
             f"`python bench/dev_sweep.py configs/sweeps/{name}.yaml`: `{sweep['config']}` with the overrides below, "
             f"{sweep['steps']} steps each, FLORES dev loss (target tokens, the training runs' dev set). "
             "Devtest is not used. s/step is the median step without a dev-loss measurement.", "",
             "| variant | overrides | " + " | ".join(f"dev loss @{s}" for s in steps) + " | s/step | peak RSS |",
             "|---|---|" + "---:|" * (len(steps) + 2)]
    best = min(r["best_dev_loss"] for r in results.values())
    for variant, r in results.items():
        cells = [f"{r['dev_loss'][str(s)]:.3f}" if str(s) in r["dev_loss"] else "" for s in steps]
        if r["best_dev_loss"] == best:
            cells = [f"**{c}**" if c == f"{best:.3f}" else c for c in cells]
        over = ", ".join(f"`{k}={span(v)}`" for k, v in r["overrides"].items()) or "(none)"
        lines.append(f"| {variant} | {over} | " + " | ".join(cells)
                     + f" | {r['seconds_per_step']} | {r['peak_rss_mib'] / 1024:.1f} GiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep YAML (configs/sweeps/)")
    parser.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--report", action="store_true", help="rewrite the docs section from the results file only")
    args = parser.parse_args()
    path = Path(args.sweep)
    sweep = yaml.safe_load(path.read_text())
    name = path.stem
    results_path = ROOT / "bench" / "results" / f"dev_sweep_{name}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    chosen = [] if args.report else args.only.split(",") if args.only else list(sweep["variants"])
    shared: dict[tuple, Path] = {}
    for variant in chosen:
        overrides = {"train.steps": sweep["steps"], "train.eval_every": sweep["eval_every"],
                     **(sweep["variants"][variant] or {})}
        output = ROOT / "runs" / f"sweep-{name}" / variant
        output.mkdir(parents=True, exist_ok=True)
        key = partition_key(overrides)
        if key in shared:
            share_partition(shared[key], output)
        print(f"== {variant}: {overrides}", flush=True)
        run_variant(sweep["config"], overrides, output)
        shared.setdefault(key, output)
        results[variant] = {"overrides": sweep["variants"][variant] or {}, **summary(output)}
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        update_section(ROOT / "docs" / "RESULTS.md", f"## Dev sweep ({name})", markdown(name, sweep, results),
                       "Results")
    update_section(ROOT / "docs" / "RESULTS.md", f"## Dev sweep ({name})", markdown(name, sweep, results), "Results")
    print(markdown(name, sweep, results))


if __name__ == "__main__":
    main()
