"""Evaluation: translate test sets, score BLEU / chrF, off-target rate, and forgetting.

    python -m training.evaluate --artifact DIR --testset flores [--model DIR] [--directions en-de,de-en]
                                [--limit N] [--unrouted] [--output FILE.json]

BLEU is sacreBLEU with tokenize=13a (zh for Chinese targets), chrF with default settings; both
signatures are reported. Each direction keeps every output and its sentence-level BLEU statistics,
from which the mean BLEU over directions gets a 95% bootstrap confidence interval (1,000 resamples
of each direction's sentences, as sacreBLEU's --confidence does for one test set). The off-target
rate is the share of outputs that landermt.langid (py3langid, offline) identifies as another language
than the target, choosing among the project's six languages and those of the evaluated directions.
Forgetting is perplexity on held-out monolingual text per language, with and without the finetuned weights.
`--unrouted` serves the artifact's trained FFN weights to every direction with no routing mask (every
neuron, no CAR scaling), to measure what the routing itself adds or costs.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sacrebleu
import torch
from tqdm import tqdm

from landermt.artifact import load_artifact
from landermt.cli import user_errors
from landermt.decode import Request, RunningBatch
from landermt.generate import decoded, stop_token_ids
from landermt.langid import off_target_rate
from landermt.loss import target_loss
from landermt.models import load_model
from landermt.prompts import IGNORE, PromptEncoder, batches, new_token_budget, text_example
from landermt.routing import route
from training.config import DataConfig
from training.data import TESTSETS, evaluation_set

LANGUAGES = ("en", *DataConfig().languages)  # the project's six: off-target outputs are identified among them


@dataclass(frozen=True)
class Sentence:
    """One sentence to translate: its direction, text, routing id (None: no routing) and few-shot examples."""

    source_lang: str
    target_lang: str
    text: str
    pair_id: int | None = None
    shots: tuple[tuple[str, str], ...] = ()


def translate_all(model, tokenizer, template: str, sentences: list[Sentence], batch_size: int = 16,
                  max_new_tokens: int = 256, desc: str = "translate", beams: int = 1) -> list[str]:
    """Greedy on the continuous-batching decoder (landermt.decode, the server's code path), every direction in
    one stream: up to `batch_size` rows at once, of any pairs, a finished row's place taken by the next sentence
    at the next step; prompts and each row's new-token budget as the server makes them (PromptEncoder,
    new_token_budget). Longest prompts go first, so rows of similar length share the batch. Each output equals
    that sentence alone. `beams` > 1: beam search of that width (the server's `num_beams`); a sentence then takes
    `beams` of the batch's `batch_size` rows."""
    shots = {(s.source_lang, s.target_lang): list(s.shots) for s in sentences}
    prompts = PromptEncoder(tokenizer, template, lambda source, target: shots[source, target])
    requests = []
    for i, s in enumerate(sentences):
        prompt = prompts.encode(s.source_lang, s.target_lang, s.text)
        requests.append(Request(i, prompt.ids, s.pair_id, new_token_budget(prompt.source_tokens, max_new_tokens),
                                beams))
    routed = {s.pair_id is not None for s in sentences}
    if len(routed) > 1:
        raise ValueError("sentences must all be routed or all unrouted")
    waiting = sorted(requests, key=lambda r: -r.prompt_tokens)
    batch = RunningBatch(model, tokenizer.pad_token_id, stop_token_ids(tokenizer), routed=routed == {True})
    outputs: list[str] = [""] * len(sentences)
    with tqdm(total=len(sentences), desc=desc, unit="sentence", leave=False) as bar:
        while waiting or len(batch):
            admitted = []
            while (waiting and (not (len(batch) or admitted) or len(batch) + beams * (len(admitted) + 1) <= batch_size)
                   and batch.can_admit(waiting[0].prompt_tokens)):
                admitted.append(waiting.pop(0))
            done = batch.step(admitted)
            for request in done:
                outputs[request.key] = decoded(tokenizer, request.prompt_tokens, request.new).text
            bar.update(len(done))
    return outputs


def translate(model, tokenizer, template: str, source_lang: str, target_lang: str, sources: list[str],
              pair_id: int | None = None, batch_size: int = 16, max_new_tokens: int = 256,
              shots: list[tuple[str, str]] = (), desc: str | None = None) -> list[str]:
    """`translate_all` for one direction."""
    sentences = [Sentence(source_lang, target_lang, text, pair_id, tuple(shots)) for text in sources]
    return translate_all(model, tokenizer, template, sentences, batch_size, max_new_tokens,
                         desc or f"translate {source_lang}-{target_lang}")


def bleu_metric(target_lang: str) -> sacrebleu.metrics.BLEU:
    return sacrebleu.metrics.BLEU(tokenize="zh" if target_lang == "zh" else "13a")


def score(hypotheses: list[str], references: list[str], target_lang: str,
          languages: Iterable[str] = LANGUAGES) -> dict:
    """BLEU, chrF and the off-target rate, a wrong language being one of `languages` (and the target)."""
    bleu, chrf = bleu_metric(target_lang), sacrebleu.metrics.CHRF()
    b, c = bleu.corpus_score(hypotheses, [references]), chrf.corpus_score(hypotheses, [references])
    return {"bleu": round(b.score, 2), "chrf": round(c.score, 2), "off_target": round(
        off_target_rate(hypotheses, target_lang, languages), 4), "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()), "sentences": len(hypotheses),
        "bleu_stats": bleu._extract_corpus_statistics(hypotheses, [references])}  # what sacreBLEU resamples


def bootstrap_mean_bleu(runs: list[dict[str, dict]], samples: int = 1000, seed: int = 0) -> np.ndarray | None:
    """Bootstrap resamples of the mean BLEU over directions, shape (len(runs), samples): each resample draws
    every direction's sentences with replacement and recomputes its corpus BLEU from the sentence statistics,
    the same draws for every run (they must score the same sentences), so differences between runs are paired.
    None when a direction has no statistics (results written before they were kept)."""
    if not runs or not runs[0] or any("bleu_stats" not in r for run in runs for r in run.values()):
        return None
    rng = np.random.default_rng(seed)
    means = np.zeros((len(runs), samples))
    for direction in runs[0]:
        metric = bleu_metric(direction.split("-")[1])
        stats = [np.array(run[direction]["bleu_stats"], dtype=np.int64) for run in runs]
        if len({len(s) for s in stats}) != 1:
            raise ValueError(f"{direction}: the runs scored different numbers of sentences")
        draws = rng.integers(0, len(stats[0]), size=(samples, len(stats[0])))
        for index, run_stats in enumerate(stats):
            means[index] += [metric._compute_score_from_stats(run_stats[d].sum(axis=0)).score for d in draws]
    return means / len(runs[0])


def mean_bleu_interval(results: dict[str, dict], samples: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """95% bootstrap interval of the mean BLEU over directions (bootstrap_mean_bleu)."""
    means = bootstrap_mean_bleu([results], samples, seed)
    return None if means is None else _central_95(means[0])


def paired_difference_interval(results: dict[str, dict], baseline: dict[str, dict], samples: int = 1000,
                               seed: int = 0) -> tuple[float, float] | None:
    """95% paired bootstrap interval of mean BLEU(results) − mean BLEU(baseline) on the same sentences: an
    interval that excludes 0 is a difference the sentence sample supports (Koehn 2004's paired resampling)."""
    means = bootstrap_mean_bleu([results, baseline], samples, seed)
    return None if means is None else _central_95(means[0] - means[1])


def _central_95(resamples: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(resamples, 2.5)), float(np.percentile(resamples, 97.5))


@torch.no_grad()
def perplexity(model, tokenizer, lines: list[str], batch_size: int = 16, pair_id: int | None = None) -> float:
    """exp(mean token NLL) of plain text, every row routed through `pair_id` (None: no routing)."""
    examples = [text_example(tokenizer, line, 256) for line in lines]
    total, tokens = 0.0, 0
    for batch in tqdm(list(batches(examples, batch_size, tokenizer.pad_token_id)), desc="perplexity", unit="batch",
                      leave=False):
        with route(None if pair_id is None else torch.full((len(batch["input_ids"]),), pair_id)):
            total += target_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], "sum").item()
        tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
    return math.exp(total / max(tokens, 1))


def summary(results: dict[str, dict]) -> dict:
    """What a table row shows of `results` (direction -> score()): BLEU per direction, and over the directions mean
    BLEU with its 95% bootstrap interval (None without sentence statistics), mean chrF and the off-target rate."""
    n, interval = len(results), mean_bleu_interval(results)
    return {"bleu": {d: r["bleu"] for d, r in results.items()},
            "mean_bleu": round(sum(r["bleu"] for r in results.values()) / n, 2),
            "mean_bleu_interval": interval and [round(x, 2) for x in interval],
            "mean_chrf": round(sum(r["chrf"] for r in results.values()) / n, 2),
            "off_target": round(sum(r["off_target"] for r in results.values()) / n, 4)}


def markdown_table(results: dict[str, dict]) -> str:
    rows = ["| direction | BLEU | chrF | off-target |", "|---|---:|---:|---:|"]
    for direction, r in results.items():
        rows.append(f"| {direction} | {r['bleu']:.2f} | {r['chrf']:.2f} | {100 * r['off_target']:.1f}% |")
    if results:
        mean = summary(results)
        interval = mean["mean_bleu_interval"]
        ci = f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""
        rows.append(f"| **mean** | {mean['mean_bleu']:.2f}{ci} | {mean['mean_chrf']:.2f} "
                    f"| {100 * mean['off_target']:.1f}% |")
        if interval:
            rows.append("\nMean BLEU with its 95% bootstrap interval (1,000 resamples of each direction's sentences).")
    return "\n".join(rows)


def evaluate_directions(model, tokenizer, template: str, directions: list[str], testset_name: str,
                        data_root: str | None, limit: int | None, pair_id, batch_size: int = 16,
                        max_new_tokens: int = 256, shots=None, beams: int = 1,
                        known: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """{direction: scores}; `pair_id(src, tgt)` gives the routing id (None: base path);
    `shots(src, tgt)` gives few-shot examples; `known[direction]` are outputs already made for the first sentences
    of a direction by this same evaluation (only the sentences after them are translated)."""
    lines = {d: evaluation_set(data_root, testset_name, *d.split("-"))[:limit] for d in directions}
    reused = {d: (known or {}).get(d, [])[:len(lines[d])] for d in directions}
    sentences = [Sentence(*d.split("-"), source, pair_id(*d.split("-")), tuple(shots(*d.split("-")) if shots else ()))
                 for d in directions for source, _ in lines[d][len(reused[d]):]]
    # all directions in one stream: no per-direction tail
    hyps = iter(translate_all(model, tokenizer, template, sentences, batch_size, max_new_tokens,
                              f"translate {testset_name}", beams))
    languages = {*LANGUAGES, *(code for d in directions for code in d.split("-"))}
    results = {}
    for direction in directions:
        pairs = lines[direction]
        outputs = reused[direction] + [next(hyps) for _ in pairs[len(reused[direction]):]]
        results[direction] = score(outputs, [r for _, r in pairs], direction.split("-")[1], languages) | {
            "outputs": outputs, "examples": [{"source": s, "reference": r, "output": h}
                                             for (s, r), h in list(zip(pairs, outputs, strict=True))[:3]]}
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--testset", choices=TESTSETS, default="flores")
    parser.add_argument("--model", default=None, help="base model directory (default: Gemma 3 270M)")
    parser.add_argument("--directions", default=None, help="comma-separated, e.g. en-de,de-en (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="sentences per direction")
    parser.add_argument("--data", default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--beams", type=int, default=1, help="1: greedy; n: beam search of width n")
    parser.add_argument("--unrouted", action="store_true",
                        help="trained weights, but every neuron for every direction (no routing mask)")
    parser.add_argument("--output", default=None, help="JSON file (a .md table is written beside it)")
    args = parser.parse_args(argv)

    with user_errors(parser):
        artifact = load_artifact(args.artifact)
        m = artifact.manifest
        directions = args.directions.split(",") if args.directions else m.directions
        for direction in directions:
            src, _, tgt = direction.partition("-")
            try:
                artifact.partition.pair_id(src, tgt)
            except (KeyError, ValueError) as error:
                parser.error(f"direction {direction!r} is not servable: {error}")
        if args.unrouted and m.routing == "delta":
            parser.error("--unrouted is for mask artifacts: a delta artifact unrouted is the base model itself")
        model, tokenizer = load_model(args.model, artifact.dtype)
        artifact.apply(model)
        pair_id = (lambda src, tgt: None) if args.unrouted else artifact.partition.pair_id
        results = evaluate_directions(model, tokenizer, m.prompt_template, directions, args.testset, args.data,
                                      args.limit, pair_id, args.batch_size, beams=args.beams)
    table = markdown_table(results)
    print(table)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        Path(args.output).with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
