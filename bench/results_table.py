"""Collect eval.json of finished runs into the method × direction table of docs/RESULTS.md.

    python bench/results_table.py runs/quick-zero_shot runs/quick-few_shot runs/quick-landermt [--testset flores]

Writes bench/results/table_<testset>.json and the "Methods on <testset>" section of docs/RESULTS.md
(BLEU per direction and mean; mean chrF, off-target rate and perplexity change on held-out text).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from report import update_section  # bench/report.py, beside this script

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--testset", default="flores")
    args = parser.parse_args()
    rows = {}
    for run in args.runs:
        result = json.loads((run / "eval.json").read_text())
        config = yaml.safe_load((run / "config.yaml").read_text())
        scores = result["testsets"][args.testset]
        ppl = result["perplexity"]
        rows[f"{result['method']}" + (f" ({config['method']['car']})" if result["method"] in ("landermt", "ls", "lg")
                                      else "")] = {
            "bleu": {d: s["bleu"] for d, s in scores.items()},
            "mean_bleu": sum(s["bleu"] for s in scores.values()) / len(scores),
            "mean_chrf": sum(s["chrf"] for s in scores.values()) / len(scores),
            "off_target": sum(s["off_target"] for s in scores.values()) / len(scores),
            "perplexity_change": sum(v["after"] / v["base"] - 1 for v in ppl.values()) / len(ppl),
            "sentences": next(iter(scores.values()))["sentences"],
            "steps": config["train"]["steps"] if result["method"] not in ("zero_shot", "few_shot") else 0,
            "run": str(run),
        }
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / f"table_{args.testset}.json").write_text(json.dumps(rows, indent=2) + "\n")
    directions = list(next(iter(rows.values()))["bleu"])
    lines = ["| method | steps | " + " | ".join(directions) + " | mean BLEU | mean chrF | off-target | Δ ppl |",
             "|---|---:|" + "---:|" * (len(directions) + 4)]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['steps']} | " + " | ".join(f"{r['bleu'][d]:.1f}" for d in directions)
                     + f" | **{r['mean_bleu']:.2f}** | {r['mean_chrf']:.1f} | {100 * r['off_target']:.0f}% | "
                     f"{100 * r['perplexity_change']:+.0f}% |")
    sentences = next(iter(rows.values()))["sentences"]
    section = "\n".join([
        f"## Methods on {args.testset}",
        "",
        f"`python bench/results_table.py {' '.join(str(r) for r in args.runs)}`",
        f"(`bench/results/table_{args.testset}.json`).",
        f"First {sentences} sentences per direction; BLEU is sacreBLEU 13a (zh for Chinese targets); Δ ppl is the mean",
        "relative change of perplexity on held-out FLORES dev text per language (forgetting).",
        "",
        *lines,
        "",
    ])
    update_section(ROOT / "docs" / "RESULTS.md", f"## Methods on {args.testset}", section, "Results")
    print(section)


if __name__ == "__main__":
    main()
