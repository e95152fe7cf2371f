"""Would a repetition guard help? Stored FLORES **dev** outputs, each cut where it starts to loop, scored again.

    python bench/loop_guard.py [RUN ...]    # default: runs/step7-dev/lora runs/step7-dev/delta

A greedy output is a prefix of itself, so a decoder that stopped a row as soon as it loops would have produced
exactly the stored output cut at that point: the guard can be judged on stored outputs without translating again.
The rule: the earliest point at which the words so far (Chinese: characters) end with one span of p words repeated
`repeats` times in a row, with p × repeats ≥ `min_words`; the output keeps the first copy and drops the rest.
Reported per setting and run: mean BLEU with the guard, its paired 95% bootstrap interval against the same run
without it, and how many outputs and words it cut. Writes bench/results/loop_guard.json and the "Repetition
guard" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from report import update_section  # bench/report.py, beside this script

from training.data import evaluation_set
from training.evaluate import paired_difference_interval, score, summary

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [(2, 4), (2, 8), (3, 4), (3, 8)]  # (repeats, min_words)
MAX_PERIOD = 30  # words in the repeated span


def loop_cut(words: list[str], repeats: int, min_words: int) -> int:
    """How many leading words to keep: all of them, or up to the first copy of the earliest loop."""
    for end in range(1, len(words) + 1):
        for period in range(max(1, -(-min_words // repeats)), min(MAX_PERIOD, end // repeats) + 1):
            span = words[end - period : end]
            if all(words[end - (k + 1) * period : end - k * period] == span for k in range(1, repeats)):
                return end - (repeats - 1) * period
    return len(words)


def guarded(text: str, repeats: int, min_words: int) -> str:
    chinese = " " not in text.strip()
    words = list(text) if chinese else text.split(" ")
    return ("" if chinese else " ").join(words[: loop_cut(words, repeats, min_words)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path,
                        default=[Path("runs/step7-dev/lora"), Path("runs/step7-dev/delta")])
    parser.add_argument("--testset", default="flores_dev", help="a dev test set: the guard is chosen on dev only")
    args = parser.parse_args()

    rows = {}
    for run in args.runs:
        stored = json.loads((run / "eval.json").read_text())["testsets"][args.testset]
        references = {d: [ref for _, ref in evaluation_set(None, args.testset, *d.split("-"))][: len(r["outputs"])]
                      for d, r in stored.items()}
        plain = {d: score(r["outputs"], references[d], d.split("-")[1]) for d, r in stored.items()}
        row = {"unguarded": summary(plain)["mean_bleu"]}
        for repeats, min_words in SETTINGS:
            cut = {d: [guarded(h, repeats, min_words) for h in r["outputs"]] for d, r in stored.items()}
            scores = {d: score(cut[d], references[d], d.split("-")[1]) for d in stored}
            pairs = [(h, c) for d, r in stored.items() for h, c in zip(r["outputs"], cut[d], strict=True)]
            row[f"repeats {repeats}, min {min_words} words"] = {
                "mean_bleu": summary(scores)["mean_bleu"],
                "difference_interval": [round(x, 2) for x in paired_difference_interval(scores, plain)],
                "outputs_cut": sum(h != c for h, c in pairs),
                "words_cut": sum(len(h.split()) - len(c.split()) for h, c in pairs),
                "outputs": len(pairs)}
        rows[str(run)] = row
        print(run, json.dumps(row), flush=True)
    out = ROOT / "bench" / "results" / "loop_guard.json"
    out.write_text(json.dumps({"testset": args.testset, "max_period": MAX_PERIOD, "runs": rows}, indent=2) + "\n")

    table = ["| run | setting | mean BLEU | − unguarded (paired 95% CI) | outputs cut | words cut |",
             "|---|---|---:|---:|---:|---:|"]
    for run, row in rows.items():
        table.append(f"| {run} | none | {row['unguarded']:.2f} | | | |")
        for setting, r in row.items():
            if setting != "unguarded":
                low, high = r["difference_interval"]
                table.append(f"| {run} | {setting} | {r['mean_bleu']:.2f} | {low:+.2f} to {high:+.2f} "
                             f"| {r['outputs_cut']} of {r['outputs']} | {r['words_cut']} |")
    section = "\n".join([
        "## Repetition guard",
        "",
        f"`python bench/loop_guard.py {' '.join(map(str, args.runs))}` (`bench/results/loop_guard.json`): each run's "
        f"stored greedy outputs on {args.testset} (FLORES dev, never devtest) cut where they start to loop — the "
        "earliest point at which the words so far end with one span repeated `repeats` times in a row, at least "
        f"`min` words in all, spans of up to {MAX_PERIOD} words (Chinese: characters) — and scored again. A greedy "
        "decoder that stopped a row there would have produced exactly these outputs. A guard earns its place in the "
        "shared decoder only if its interval lies above 0 for every method.",
        "",
        *table,
        "",
    ])
    update_section(ROOT / "docs" / "BENCHMARKS.md", "## Repetition guard", section, "Benchmarks")
    print(section)


if __name__ == "__main__":
    main()
