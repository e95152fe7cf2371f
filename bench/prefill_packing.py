"""What packing new rows' prefill into the decode step saves the torch engine, on this machine.

    python bench/prefill_packing.py [--repeats 5] [--artifact runs/quick-tuned-landermt/artifact] [--sentences 6]

A step of the torch engine's running batch (landermt/decode.py) that admits rows does two things: prefill the new
rows' prompts and give every running row its next token. *Separate*: a forward over the new prompts
(`RunningBatch.admit`), then the decode step's forward over the running rows (`decode`), as the engine did before
Step 9. *Packed*: one forward over the real tokens of both (`RunningBatch.step`, landermt/packing.py). Timed on the
default model, each running row with CACHE_TOKENS tokens already cached, the two variants in turn in each round
(median of `--repeats` rounds, after one untimed round); the decode step alone is the reference. Then the
same FLORES devtest sentences (`--sentences` per direction, three directions) are translated routed by the
artifact through the evaluation's decoder both ways, in float32 (the artifact widened exactly): the outputs must
be identical strings.

Writes bench/results/prefill_packing.json and the "Prefill packing" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from report import update_section  # bench/report.py, beside this script

from landermt import packing
from landermt.artifact import load_artifact
from landermt.decode import Request, RunningBatch
from landermt.models import load_model
from training.data import evaluation_set
from training.evaluate import Sentence, translate_all

ROOT = Path(__file__).resolve().parent.parent
CACHE_TOKENS = 96  # a running row's prompt and translation so far (FLORES prompts are ~50-80 tokens)
SHAPES = [(8, 1, 24), (16, 1, 24), (16, 1, 48), (12, 4, 48)]  # (running rows, admitted rows, prompt tokens each)
DIRECTIONS = ("en-de", "zh-en", "en-ar")


def identical_outputs(artifact_dir: str, per_direction: int) -> dict:
    """Routed float32 translations with packed and with separate prefill: how many are the same string."""
    artifact = load_artifact(artifact_dir)
    model, tokenizer = load_model(None, artifact.dtype)
    artifact.apply(model)
    model.float()  # exact: the same weights, wider
    sentences = [Sentence(*d.split("-"), source, artifact.partition.pair_id(*d.split("-")))
                 for d in DIRECTIONS for source, _ in evaluation_set(None, "flores", *d.split("-"))[:per_direction]]
    template = artifact.manifest.prompt_template
    packed = translate_all(model, tokenizer, template, sentences, 8, desc="packed")
    can_pack, packing.can_pack = packing.can_pack, lambda model: False
    try:
        separate = translate_all(model, tokenizer, template, sentences, 8, desc="separate")
    finally:
        packing.can_pack = can_pack
    return {"artifact": artifact_dir, "sentences": len(sentences),
            "identical": sum(a == b for a, b in zip(packed, separate, strict=True))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--artifact", default="runs/quick-tuned-landermt/artifact")
    parser.add_argument("--sentences", type=int, default=6, help="FLORES devtest sentences per direction")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(None)
    vocabulary = len(tokenizer)

    def requests(n: int, tokens: int) -> list[Request]:  # random ids: the cost is the same; no stop token below
        return [Request(i, torch.randint(0, vocabulary, (tokens,)).tolist(), None, 10_000) for i in range(n)]

    def running(rows: int) -> RunningBatch:
        batch = RunningBatch(model, tokenizer.pad_token_id, [], routed=False)
        batch.admit(requests(rows, CACHE_TOKENS - 1))
        return batch

    variants = {"decode": lambda batch, new: batch.decode(),
                "separate": lambda batch, new: (batch.admit(new), batch.decode()),
                "packed": lambda batch, new: batch.step(new)}
    rows = []
    for running_rows, admitted, prompt in SHAPES:
        seconds = {name: [] for name in variants}
        for _ in range(args.repeats + 1):
            for name, run in variants.items():
                batch, new = running(running_rows), requests(admitted, prompt)
                started = time.perf_counter()
                run(batch, new)
                seconds[name].append(time.perf_counter() - started)
        median = {name: statistics.median(times[1:]) for name, times in seconds.items()}
        rows.append({"running_rows": running_rows, "admitted_rows": admitted, "prompt_tokens": prompt,
                     **{f"{name}_s": round(s, 4) for name, s in median.items()},
                     "packed_vs_separate": round(median["packed"] / median["separate"], 3)})
        print(rows[-1], flush=True)
    parity = identical_outputs(args.artifact, args.sentences)
    print(parity, flush=True)
    machine = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "dtype": str(next(model.parameters()).dtype)}
    out = ROOT / "bench" / "results" / "prefill_packing.json"
    out.write_text(json.dumps({"machine": machine, "cache_tokens": CACHE_TOKENS, "repeats": args.repeats,
                               "shapes": rows, "float32_parity": parity}, indent=2) + "\n")
    table = ["| running rows | admitted rows × prompt tokens | decode step alone s | separate s | packed s "
             "| packed / separate |", "|" + "---:|" * 6]
    table += [f"| {r['running_rows']} | {r['admitted_rows']} × {r['prompt_tokens']} | {r['decode_s']:.3f} "
              f"| {r['separate_s']:.3f} | {r['packed_s']:.3f} | {r['packed_vs_separate']:.2f} |" for r in rows]
    section = "\n".join([
        "## Prefill packing",
        "",
        f"`python bench/prefill_packing.py` (`bench/results/prefill_packing.json`): the default model, "
        f"{machine['cpu_count']}-core {machine['machine']} CPU, {machine['dtype']}, {machine['threads']} threads; "
        f"running rows with {CACHE_TOKENS} cached tokens each; median of {args.repeats} rounds, the variants in "
        "turn in each. One engine step that admits rows: *separate* (a prefill forward over the new prompts, then "
        "the decode step) against *packed* (one forward over the real tokens of both, landermt/packing.py).",
        "",
        *table,
        "",
        f"Routed by `{parity['artifact']}` in float32, packed and separate prefill gave **{parity['identical']} of "
        f"{parity['sentences']}** identical translations ({', '.join(DIRECTIONS)}).",
        "",
    ])
    update_section(ROOT / "docs" / "BENCHMARKS.md", "## Prefill packing", section, "Benchmarks")
    print(section)


if __name__ == "__main__":
    main()
