"""Detect → score → partition on parallel data, written as an artifact (no finetuning yet).

    python -m landermt.build --output artifacts/gemma3-base [--model DIR] [--data DIR]

Each stage shows a progress bar; time and peak memory are printed and stored in the manifest.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import time
from pathlib import Path

import torch
import transformers

from landermt import __version__
from landermt.artifact import BaseModelInfo, Manifest, save_artifact
from landermt.cli import user_errors
from landermt.data import ParallelCorpus, sample, training_corpora
from landermt.detect import SHARED_LAYER_RULE, layer_activations, layer_differences, shared_layers
from landermt.families import family_of
from landermt.models import load_model, resolve_dtype, weights_sha256
from landermt.partition import CAR_MODES, build_partition
from landermt.prompts import DEFAULT_TEMPLATE, batches, text_example, translation_example
from landermt.score import neuron_awareness


def directions_of(corpora: list[ParallelCorpus]) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(source, target, [(source text, target text)]) for both directions of every corpus."""
    out = []
    for c in corpora:
        out.append((c.first, c.second, c.pairs))
        out.append((c.second, c.first, [(b, a) for a, b in c.pairs]))
    return out


def build(
    model, tokenizer, corpora: list[ParallelCorpus], *, k: int = 4, epsilon: float = 0.9, car: str = "paper",
    detect_samples: int = 64, score_samples: int = 200, objective: str = "lm", batch_size: int = 16,
    max_length: int = 128, template: str = DEFAULT_TEMPLATE, seed: int = 0, model_name: str = "",
    layers: list[int] | None = None,
) -> tuple[Manifest, object]:
    """The three method stages on `model`; returns (manifest, partition). `layers` overrides the
    detected layer set (a setting chosen on dev); detection still runs and is recorded, unless
    `detect_samples` is 0 (then `layers` is required and no D is recorded)."""
    if detect_samples == 0 and layers is None:
        raise ValueError("detect_samples 0 skips layer detection: give the layers")
    family = family_of(model)
    pad = tokenizer.pad_token_id
    directions = directions_of(corpora)
    languages = tuple(dict.fromkeys(lang for c in corpora for lang in (c.first, c.second)))
    base_sha = weights_sha256(model)
    seconds = {}
    start = time.monotonic()

    differences = {}
    for src, tgt, pairs in directions if detect_samples else []:
        examples = [translation_example(tokenizer, template, src, tgt, s, t, max_length)
                    for s, t in sample(pairs, detect_samples, seed)]
        acts = layer_activations(model, family, batches(examples, batch_size, pad),
                                 total=-(-len(examples) // batch_size), desc=f"detect {src}-{tgt}")
        differences[f"{src}-{tgt}"] = layer_differences(acts)
    detected = shared_layers(differences, k) if differences else None
    layer_rule = SHARED_LAYER_RULE if layers is None else (
        f"configured (detected: {detected})" if detected else "configured (not detected)")
    layers = detected if layers is None else sorted(layers)
    if not all(0 <= i < len(family.decoder_layers(model)) for i in layers):
        raise ValueError(f"layers {layers} out of range for a model with {len(family.decoder_layers(model))} layers")
    seconds["detect"] = round(time.monotonic() - start, 1)
    print(f"selected layers ({layer_rule}): {layers}", flush=True)

    phi = {i: [] for i in layers}
    tokens = {}
    for index, lang in enumerate(languages):
        if objective == "lm":
            texts = [t for c in corpora if lang in (c.first, c.second) for t in c.side(lang)]
            examples = [text_example(tokenizer, t, max_length) for t in sample(texts, score_samples, seed + index)]
        else:  # translation loss with `lang` as target
            pairs = [(s, src, t) for src, tgt, ps in directions if tgt == lang for s, t in ps]
            examples = [translation_example(tokenizer, template, src, lang, s, t, max_length)
                        for s, src, t in sample(pairs, score_samples, seed + index)]
        tokens[lang] = sum(len(e.input_ids) for e in examples)
        scores = neuron_awareness(model, family, batches(examples, batch_size, pad), layers,
                                  total=-(-len(examples) // batch_size), desc=f"score {lang}")
        for i in layers:
            phi[i].append(scores[i])
    seconds["score"] = round(time.monotonic() - start - seconds["detect"], 1)
    partition = build_partition({i: torch.stack(v) for i, v in phi.items()}, languages, epsilon, car)

    manifest = Manifest(
        base_model=BaseModelInfo(
            name=model_name or str(getattr(model, "name_or_path", "")), sha256=base_sha,
            model_type=model.config.model_type, num_layers=len(family.decoder_layers(model)),
            intermediate_size=family.intermediate_size(model),
        ),
        languages=list(languages),
        directions=[f"{src}-{tgt}" for src, tgt, _ in directions],
        layers=layers,
        k=k,
        epsilon=epsilon,
        car=car,
        car_ratios={pair: {str(i): c for i, c in by_layer.items()}
                    for pair, by_layer in partition.car_ratios().items()},
        differences={d: v.tolist() for d, v in differences.items()},
        layer_rule=layer_rule,
        prompt_template=template,
        scoring={"objective": objective, "samples_per_language": score_samples, "tokens": tokens,
                 "detect_samples_per_direction": detect_samples, "max_length": max_length, "seed": seed},
        created={"at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                 "landermt": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                 "dtype": str(next(model.parameters()).dtype), "stage_seconds": seconds},
    )
    return manifest, partition


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m landermt.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="artifact directory to write")
    parser.add_argument("--model", default=None, help="local Hugging Face model directory (default: Gemma 3 270M)")
    parser.add_argument("--data", default=None, help="data directory (default: $LANDERMT_DATA or ../shared/data)")
    parser.add_argument("--k", type=int, default=4, help="layers to select (default 4)")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="use these layers instead of the detected ones (e.g. chosen on dev)")
    parser.add_argument("--epsilon", type=float, default=0.9, help="share of language-general neurons (default 0.9)")
    parser.add_argument("--car", choices=CAR_MODES, default="paper")
    parser.add_argument("--objective", choices=("lm", "translation"), default="lm",
                        help="scoring loss: monolingual LM (default) or translation into the language")
    parser.add_argument("--detect-samples", type=int, default=64, help="examples per direction for detection")
    parser.add_argument("--score-samples", type=int, default=200, help="sentences per language for scoring")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="auto: bfloat16 where the hardware has it natively, else float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    start = time.monotonic()
    with user_errors(parser):
        corpora = training_corpora(args.data)
        model, tokenizer = load_model(args.model, resolve_dtype(args.dtype))
        manifest, partition = build(
            model, tokenizer, corpora, k=args.k, epsilon=args.epsilon, car=args.car,
            detect_samples=args.detect_samples, score_samples=args.score_samples, objective=args.objective,
            batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
            model_name=args.model or "gemma-3-270m (default)", layers=args.layers,
        )
    elapsed = time.monotonic() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    manifest.created.update(seconds=round(elapsed, 1), peak_rss_mib=round(peak_mib), machine=platform.machine(),
                            threads=torch.get_num_threads())
    save_artifact(Path(args.output), manifest, partition)
    print(f"wrote {args.output} in {elapsed:.0f} s, peak memory {peak_mib:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
