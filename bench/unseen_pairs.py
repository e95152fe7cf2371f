"""Unseen-pair composition: directions no training example had, served routed, against the base model.

    python bench/unseen_pairs.py [--artifact runs/step7-final/delta/artifact] [--directions de-fr,zh-de,ar-it]
                                 [--limit 50]

Training covers English with each other language only; the partition still routes every pair of its languages
(a row of de-fr uses G ∪ S_de ∪ S_fr and, under the delta rule, those neurons' trained updates). Each direction's
first LIMIT FLORES devtest sentences go through the real HTTP server (POST /translate, lists of texts, several
requests at once) in three modes on one loaded model:
  * routed: the artifact, as `python -m server --artifact` serves it;
  * base, same prompt: the untouched base model with the artifact's zero-shot prompt;
  * base, few-shot: the server without an artifact (its few-shot prompts).
Reported per mode: BLEU per direction, mean BLEU with its 95% bootstrap interval, the paired interval of routed
minus each base mode, chrF and off-target rate. Writes bench/results/unseen_pairs.json and the "Unseen pairs"
section of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
from pathlib import Path

import httpx
import torch
from report import update_section  # bench/report.py, beside this script
from serving import ServerThread, _free_port, torch_engine  # bench/serving.py: the real server in this process

from landermt.artifact import load_artifact
from landermt.families import family_of
from landermt.models import load_model
from landermt.routing import unpatch
from server.settings import Settings
from training.data import evaluation_set
from training.evaluate import paired_difference_interval, score, summary

ROOT = Path(__file__).resolve().parent.parent
TEXTS_PER_REQUEST, CONCURRENT_REQUESTS = 8, 4


async def translate_all(base: str, direction: str, texts: list[str]) -> list[str]:
    """Every text through POST /translate, TEXTS_PER_REQUEST a request, CONCURRENT_REQUESTS at a time."""
    source, target = direction.split("-")
    chunks = [texts[i : i + TEXTS_PER_REQUEST] for i in range(0, len(texts), TEXTS_PER_REQUEST)]
    limit = asyncio.Semaphore(CONCURRENT_REQUESTS)

    async def one(http: httpx.AsyncClient, chunk: list[str]) -> list[str]:
        async with limit:
            response = await http.post(f"{base}/translate", json={"q": chunk, "source": source, "target": target})
            response.raise_for_status()
            return response.json()["translatedText"]

    async with httpx.AsyncClient(timeout=1200) as http:
        answers = await asyncio.gather(*(one(http, chunk) for chunk in chunks))
    return [text for answer in answers for text in answer]


def serve(engine, lines: dict[str, list[tuple[str, str]]]) -> dict[str, dict]:
    """Scores per direction of one server mode."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp, ServerThread(engine, Path(tmp) / "jobs.sqlite3") as base:
        for direction, pairs in lines.items():
            outputs = asyncio.run(translate_all(base, direction, [source for source, _ in pairs]))
            results[direction] = score(outputs, [reference for _, reference in pairs], direction.split("-")[1]) | {
                "outputs": outputs}
            print(direction, results[direction]["bleu"], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default="runs/step7-final/delta/artifact")
    parser.add_argument("--directions", default="de-fr,zh-de,ar-it")
    parser.add_argument("--limit", type=int, default=50, help="FLORES devtest sentences per direction")
    args = parser.parse_args()

    artifact = load_artifact(args.artifact)
    directions = args.directions.split(",")
    trained = set(artifact.manifest.directions)
    if any(d in trained for d in directions):
        parser.error(f"{', '.join(d for d in directions if d in trained)}: trained, not unseen")
    for d in directions:
        artifact.partition.pair_id(*d.split("-"))  # routable: both languages in the partition
    model, tokenizer = load_model(None, artifact.dtype)
    artifact.apply(model)
    lines = {d: evaluation_set(None, "flores", *d.split("-"))[: args.limit] for d in directions}
    settings = Settings(artifact=args.artifact, port=_free_port(), max_batch_size=16, max_texts=TEXTS_PER_REQUEST)

    modes = {}
    print("routed", flush=True)
    modes["routed"] = serve(torch_engine(model, tokenizer, artifact, settings), lines)
    unpatch(model, family_of(model))  # the base weights, the same prompts: what the routed update adds
    print("base, same prompt", flush=True)
    modes["base, same prompt"] = serve(torch_engine(model, tokenizer, artifact, settings), lines)
    print("base, few-shot", flush=True)
    modes["base, few-shot"] = serve(torch_engine(model, tokenizer, None, settings), lines)

    rows = {}
    for name, results in modes.items():
        rows[name] = summary(results) | {"outputs": {d: r["outputs"] for d, r in results.items()}}
        if name != "routed":
            rows[name]["routed_minus_this_interval"] = [
                round(x, 2) for x in paired_difference_interval(modes["routed"], results)]
    machine = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "dtype": str(artifact.dtype),
               "torch": torch.__version__}
    result = {"machine": machine, "artifact": args.artifact, "testset": "flores devtest", "limit": args.limit,
              "directions": directions, "modes": rows}
    (ROOT / "bench" / "results" / "unseen_pairs.json").write_text(
        json.dumps(result, indent=2, ensure_ascii=False) + "\n")

    table = [f"| mode | {' | '.join(directions)} | mean BLEU (95% CI) | routed − this (paired 95% CI) | chrF "
             "| off-target |", "|---|" + "---:|" * (len(directions) + 4)]
    for name, r in rows.items():
        low, high = r["mean_bleu_interval"]
        paired = r.get("routed_minus_this_interval")
        cells = " | ".join(f"{r['bleu'][d]:.2f}" for d in directions)
        table.append(f"| {name} | {cells} | {r['mean_bleu']:.2f} "
                     f"({low:.1f}–{high:.1f}) | {f'{paired[0]:+.2f} to {paired[1]:+.2f}' if paired else ''} "
                     f"| {r['mean_chrf']:.1f} | {100 * r['off_target']:.1f}% |")
    section = "\n".join([
        "## Unseen pairs",
        "",
        f"`python bench/unseen_pairs.py --artifact {args.artifact} --limit {args.limit}` "
        f"(`bench/results/unseen_pairs.json`): {', '.join(directions)}, directions no training example had (the "
        "artifact was trained on English with each language), routed by composing the two languages' neurons "
        f"(G ∪ S_a ∪ S_b), first {args.limit} FLORES devtest sentences each, through the real HTTP server; against "
        "the base model with the same zero-shot prompt and the base model with the server's few-shot prompts. "
        f"{machine['cpu_count']}-core {machine['machine']} CPU, {machine['dtype']}.",
        "",
        *table,
        "",
    ])
    update_section(ROOT / "docs" / "RESULTS.md", "## Unseen pairs", section, "Results")
    print(section)


if __name__ == "__main__":
    main()
