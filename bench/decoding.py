"""Choosing the server's default decoding on FLORES dev: greedy against beam search of widths 2 and 4.

    python bench/decoding.py [--artifact runs/quick-tuned-landermt/artifact] [--limit 20] [--beams 1 2 4]

Every width translates the same first LIMIT FLORES **dev** sentences of each of the artifact's directions through
the evaluation's decoder (training.evaluate.translate_all: the server's continuous-batching decoder, its prompts
and token budget), routed by the artifact. Reported per width: mean BLEU with its 95% bootstrap interval, mean
chrF, off-target rate, sentences/s and the outputs that loop (a 4-gram repeated three times or more). Devtest is
never touched. Writes bench/results/decoding.json and the "Decoding" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from report import update_section  # bench/report.py, beside this script

from landermt.artifact import load_artifact
from landermt.models import load_model
from training.data import flores
from training.evaluate import Sentence, paired_difference_interval, score, summary, translate_all

ROOT = Path(__file__).resolve().parent.parent


def loops(text: str, n: int = 4, times: int = 3) -> bool:
    """Whether some word n-gram occurs `times` times or more (a translation that repeats itself)."""
    words = text.split() if " " in text.strip() else list(text)  # Chinese: characters
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return any(grams.count(g) >= times for g in set(grams))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default="runs/quick-tuned-landermt/artifact")
    parser.add_argument("--limit", type=int, default=20, help="FLORES dev sentences per direction")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=32, help="rows per step (a sentence takes one per beam)")
    args = parser.parse_args()

    artifact = load_artifact(args.artifact)
    model, tokenizer = load_model(None, artifact.dtype)
    artifact.apply(model)
    directions = artifact.manifest.directions
    lines = {d: flores(None, "dev", *d.split("-"))[: args.limit] for d in directions}
    sentences = [Sentence(*d.split("-"), source, artifact.partition.pair_id(*d.split("-")))
                 for d in directions for source, _ in lines[d]]
    rows, first = {}, None
    for beams in args.beams:
        started = time.monotonic()
        outputs = iter(translate_all(model, tokenizer, artifact.manifest.prompt_template, sentences, args.batch_size,
                                     desc=f"beams {beams}", beams=beams))
        seconds = time.monotonic() - started
        results = {}
        for d in directions:
            hyps = [next(outputs) for _ in lines[d]]
            results[d] = score(hyps, [reference for _, reference in lines[d]], d.split("-")[1]) | {"outputs": hyps}
        rows[str(beams)] = summary(results) | {
            "looping_outputs": sum(loops(h) for r in results.values() for h in r["outputs"]),
            "sentences": len(sentences), "seconds": round(seconds, 1),
            "sentences_per_s": round(len(sentences) / seconds, 3),
        }
        first = first or results  # the first width (greedy by default) is what the others are compared with
        rows[str(beams)]["mean_bleu_difference_interval"] = [round(b, 2) for b in
                                                             paired_difference_interval(results, first)]
        print(beams, {k: v for k, v in rows[str(beams)].items() if k != "bleu"}, flush=True)
    result = {"machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "dtype": str(artifact.dtype),
                          "torch": torch.__version__},
              "artifact": args.artifact, "testset": "flores dev", "limit": args.limit, "widths": rows}
    out = ROOT / "bench" / "results" / "decoding.json"
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    table = [f"| decoding | mean BLEU (95% CI) | − width {args.beams[0]} (paired 95% CI) | mean chrF | off-target "
             "| looping outputs | sentences/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for beams, r in rows.items():
        low, high = r["mean_bleu_interval"]
        below, above = r["mean_bleu_difference_interval"]
        table.append(f"| {'greedy' if beams == '1' else f'beam {beams}'} | {r['mean_bleu']:.2f} ({low:.1f}–{high:.1f}) "
                     f"| {below:+.2f} to {above:+.2f} | {r['mean_chrf']:.1f} | {100 * r['off_target']:.1f}% "
                     f"| {r['looping_outputs']} | {r['sentences_per_s']:.2f} |")
    m = result["machine"]
    section = "\n".join([
        "## Decoding",
        "",
        f"`python bench/decoding.py --artifact {args.artifact} --limit {args.limit}` (`bench/results/decoding.json`): "
        f"the first {args.limit} FLORES **dev** sentences of each of {len(directions)} directions, routed, through the "
        f"evaluation's decoder (the server's); {m['cpu_count']}-core {m['machine']} CPU, {m['dtype']}. "
        "A looping output repeats a 4-gram (Chinese: 4 characters) three times or more.",
        "",
        *table,
        "",
    ])
    update_section(ROOT / "docs" / "BENCHMARKS.md", "## Decoding", section, "Benchmarks")
    print(section)


if __name__ == "__main__":
    main()
